"""The click parameter types kiln's commands share: comma lists, byte sizes and served LoRAs."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from kiln.params import ByteSize, CommaList, NamedLoraParam


@click.command()
@click.option("--batch", type=CommaList(click.IntRange(min=1)), default="1")
@click.option("--budget", type=ByteSize(keywords=("auto",)), default=None)
def probe(batch, budget):
    click.echo(repr((batch, budget)))


def _run(*args):
    return CliRunner().invoke(probe, list(args))


@pytest.mark.parametrize("args, expected", [
    ((), ((1,), None)),
    (("--batch", "1,2,4"), ((1, 2, 4), None)),
    (("--batch", " 2 , 8 ,"), ((2, 8), None)),
    (("--budget", "2e9"), ((1,), 2_000_000_000)),
    (("--budget", "512MiB"), ((1,), 512 * 2**20)),
    (("--budget", "1.5 GB"), ((1,), 1_500_000_000)),
    (("--budget", "4096"), ((1,), 4096)),
    (("--budget", "auto"), ((1,), "auto")),
])
def test_values_convert(args, expected):
    r = _run(*args)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(expected)


@pytest.mark.parametrize("args, message", [
    (("--batch", "1,x"), "Invalid value for '--batch': expected comma-separated integers such as 1,2,4"),
    (("--batch", "0"), "Invalid value for '--batch'"),
    (("--batch", ","), "expected at least 1 comma-separated integers"),
    (("--budget", "lots"), "Invalid value for '--budget': expected a size in bytes such as 2e9, 512MiB or 2GB or 'auto'"),
    (("--budget", "2 parsecs"), "Invalid value for '--budget'"),
])
def test_bad_values_name_the_option(args, message):
    r = _run(*args)
    assert r.exit_code == 2 and message in r.output, r.output


def test_guidance_off_with_a_recommended_guidance_above_one_is_refused():
    import pytest

    from exporters.profile import profile_from_dict
    from runtime.errors import ProfileError

    shapes = {"batch": [1, 1, 2], "height": [64, 64, 64], "width": [64, 64, 64]}
    with pytest.raises(ProfileError, match=r"generation.guidance_scale\s+<= 1 when guidance = false"):
        profile_from_dict("p", {"shapes": shapes, "generation": {"guidance": False, "guidance_scale": 5.0}}, source="x")


def test_requests_without_a_negative_prompt_that_sdxl_zeroes_do_not_share_a_call():
    from dataclasses import replace

    from runtime.batcher import ImageRequest

    zeroed = replace(ImageRequest("a"), zero_negative=True)  # as normalize_request marks them for SDXL
    assert zeroed.group_key() != ImageRequest("a", negative_prompt="b").group_key()
    assert ImageRequest("a").group_key() == ImageRequest("b", negative_prompt="d").group_key()  # SD: "" is the same


@click.command()
@click.option("--lora", "loras", type=NamedLoraParam(), multiple=True)
def serve_probe(loras):
    click.echo(repr(loras))


def test_named_loras_for_serving():
    r = CliRunner().invoke(serve_probe, ["--lora", "style=./s.safetensors:0.8", "--lora", "detail=org/detail"])
    assert r.exit_code == 0 and r.output.strip() == repr((("style", "./s.safetensors", 0.8), ("detail", "org/detail", 1.0)))
    for bad in ("./s.safetensors", "=x.safetensors", "style="):
        r = CliRunner().invoke(serve_probe, ["--lora", bad])
        assert r.exit_code == 2 and "expected NAME=FILE_OR_HUB_ID[:SCALE]" in r.output
