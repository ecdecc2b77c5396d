"""The `kiln` command and the README's commands, as a user runs them."""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from kiln.cli import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["export", "build", "inspect", "generate", "bench", "serve", "loadtest"]
HEAVY = ("torch", "diffusers", "onnx", "onnxruntime", "tensorrt", "transformers", "fastapi", "ray", "uvicorn", "matplotlib",
         "peft", "sklearn")


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "kiln", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_every_module_imports():
    import engines
    import exporters
    import kiln
    import runtime

    names = [m.name for pkg in (kiln, exporters, engines, runtime)
             for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".") if not m.name.endswith("__main__")]
    assert {"exporters.export", "engines.build", "runtime.pipeline", "kiln.cli", "exporters.families.sd",
            "runtime.families.sd"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_help_works_without_heavy_packages():
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from kiln.cli import cli\n"
        f"for args in [[]] + [[c] for c in {COMMANDS!r}]:\n"
        "    r = CliRunner().invoke(cli, args + ['--help'])\n"
        "    assert r.exit_code == 0 and 'Usage:' in r.output, (args, r.output)\n"
        "import runtime\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_errors_are_one_message_and_a_nonzero_exit(tmp_path):
    out = _run("build", "no-such-model", "--out", str(tmp_path / "x"))
    assert out.returncode == 2
    assert "error: MODEL 'no-such-model' is neither a profile" in out.stderr and "Valid profiles:" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "x").exists()


def test_generate_inspect_and_build_skip(tiny_artifact, tiny_export, tmp_path):
    runner = CliRunner()
    png = tmp_path / "fox.png"
    r = runner.invoke(cli, ["generate", str(tiny_artifact), "a red fox", "--steps", "3", "--seed", "1", "--height", "64",
                            "--width", "192", "--scheduler", "dpm++2m", "-o", str(png), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == [str(png)]
    assert Image.open(png).size == (192, 64)

    r = runner.invoke(cli, ["generate", str(tiny_artifact), "a red fox", "--height", "100"])
    assert r.exit_code == 2 and "a multiple of 64" in r.output

    Image.open(png).save(tmp_path / "init.png")
    r = runner.invoke(cli, ["generate", str(tiny_artifact), "a watercolour", "--init-image", str(tmp_path / "init.png"),
                            "--strength", "0.5", "--steps", "4", "-o", str(tmp_path / "i2i.png")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "i2i.png").size == (192, 64)

    r = runner.invoke(cli, ["inspect", str(tiny_artifact)])
    assert r.exit_code == 0
    assert "onnxruntime" in r.output and "CPUExecutionProvider" in r.output
    assert "unet" in r.output and "sample 1x4x8x8..8x4x32x32" in r.output
    r = runner.invoke(cli, ["inspect", str(tiny_artifact), "--json"])
    data = json.loads(r.stdout)
    assert data["manifest"]["format_version"] == 1 and "engine_parity" in data["report"]

    r = runner.invoke(cli, ["build", str(tiny_export), "--out", str(tiny_artifact), "--backend", "onnxruntime",
                            "--refit", "refit", "--json"])
    result = json.loads(r.stdout)
    assert r.exit_code == 0 and result["skipped"] is True and (result["backend"], result["device"]) == ("onnxruntime", "cpu")

    r = runner.invoke(cli, ["generate", str(tiny_artifact), "x", "--scheduler", "nope"])
    assert r.exit_code == 2 and "unknown scheduler 'nope'" in r.output


def test_readme_shows_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make engines") < readme.index("make test") < readme.index("## ")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_engines(digits_artifact, tmp_path):
    """`make engines` on an up-to-date artifact of the default model (digits): skips the build,
    generates the proof image, which the digits classifier reads as the prompted 3, and inspects."""
    from digits.metric import classify

    out = shutil.copytree(digits_artifact, tmp_path / "digits")
    kiln = f"{sys.executable} -m kiln"
    r = subprocess.run(["make", "engines", "INSTALL=", f"KILN={kiln}", f"OUT={out}", "BACKEND=onnxruntime"], cwd=ROOT,
                       capture_output=True,
                       text=True, timeout=600, env=os.environ)
    assert r.returncode == 0, r.stderr
    assert "is up to date; skipped" in r.stdout
    sample = Image.open(out / "sample.png")
    assert sample.size == (64, 64) and list(classify([sample])) == [3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "tiny", "--out", "{tmp}/o", "--profile", "{tmp}/bad.toml"], "shapes.height"),
        (["build", "{tmp}/empty", "--out", "{tmp}/o"], "has no model_index.json"),
        (["export", "someone/unreachable-model", "--out", "{tmp}/o"], "pass the local folder as MODEL"),
        (["export", "tiny", "--out", "{tmp}/o", "--check", "min,biggest"], "check points must be a non-empty subset"),
        (["inspect", "{tmp}/empty"], "has no manifest.json"),
        (["generate", "{tmp}/empty", "a cat"], "has no manifest.json"),
    ],
)
def test_bad_input_exits_2_with_one_message(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.toml").write_text("[shapes]\nbatch = [1, 1, 4]\nheight = [512, 64, 64]\nwidth = [64, 64, 64]\n")
    r = CliRunner().invoke(cli, [a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert "\nerror: " in "\n" + r.output and message in r.output.split("error: ", 1)[1]
    assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_inspect_shows_quality(tiny_fp16_artifact, tiny_fp16_export, tmp_path):
    r = CliRunner().invoke(cli, ["inspect", str(tiny_fp16_artifact)])
    assert r.exit_code == 0
    assert "cos vs fp32" in r.output and "images vs fp32 engines: PSNR" in r.output
    unet_row = next(line for line in r.output.splitlines() if line.startswith("unet "))
    assert " fp16 " in unet_row
    r = CliRunner().invoke(cli, ["build", str(tiny_fp16_export), "--out", str(tmp_path / "x"), "--precision", "int8"])
    assert r.exit_code == 2 and "apply when exporting" in r.output


def test_old_import_paths_the_readme_lists_still_work():
    from exporters.check import tolerance  # noqa: F401
    from exporters.quality import COSINE_GATES, cosine, psnr  # noqa: F401
    from exporters.resolve import resolve_model
    from exporters.source import ModelDims  # noqa: F401
    from exporters.source import resolve_model as old_resolve
    from runtime.batcher import QueueFullError  # noqa: F401
    from runtime.families.sd import EnginePipeline
    from runtime.pipeline import EngineImg2ImgPipeline, check_request  # noqa: F401
    from runtime.pipeline import EnginePipeline as old_pipeline
    from runtime.trt_engine import last_errors, parser_errors, trt_logger  # noqa: F401

    assert old_resolve is resolve_model and old_pipeline is EnginePipeline
