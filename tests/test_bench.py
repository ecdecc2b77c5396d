"""`kiln bench` on tiny: its JSON schema and its errors (the figures themselves are benchmarks)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kiln.bench.run import BenchError, BenchOptions
from kiln.cli import cli


def _bench(*args):
    return CliRunner().invoke(cli, ["bench", *map(str, args)])


@pytest.mark.slow
def test_bench_json_schema(tiny_artifact, tmp_path):
    r = _bench(tiny_artifact, "--batch", "1,2", "--steps", "2", "--runs", "2", "--json", "--plot", tmp_path / "b.png")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["baseline"] == "torch" and report["backend"] == "onnxruntime" and report["size"] == [128, 128]
    assert report["matmul_peak_gflops"] > 0
    assert [e["batch"] for e in report["batches"]] == [1, 2]
    for entry in report["batches"]:
        assert entry["unet_flops_per_step"] > 0
        assert set(entry["speedup"]) == {"text_encoder", "unet_step", "vae_decode", "end_to_end"}
        assert entry["max_pixel_diff"] <= 2 / 255  # the two pipelines made the same images
        for who in ("kiln", "torch"):
            s = entry[who]
            assert set(s["latency_s"]) == {"text_encoder", "unet_step", "vae_decode", "end_to_end"}
            assert s["unet_calls"] == 2  # one per step, both halves of guidance in one batch
            assert 0 <= s["overhead_fraction"] < 1 and s["stage_sum_s"] > 0
            assert s["throughput_images_per_s"] == pytest.approx(entry["batch"] / s["latency_s"]["end_to_end"])
            assert s["gflops_per_s"] > 0 and s["peak_memory_bytes"] > 0
        assert entry["speedup"]["unet_step"] == pytest.approx(
            entry["torch"]["latency_s"]["unet_step"] / entry["kiln"]["latency_s"]["unet_step"])
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_table_without_baseline(tiny_artifact):
    r = _bench(tiny_artifact, "--baseline", "none", "--steps", "2", "--runs", "1")
    assert r.exit_code == 0, r.output
    assert "UNet, per step" in r.output and "end to end" in r.output and "speed-up" in r.output


@pytest.mark.slow
def test_scheduler_sweep_json(tiny_artifact):
    r = _bench(tiny_artifact, "--schedulers", "--step-counts", "2,4", "--reference-steps", "6", "--json")
    assert r.exit_code == 0, r.output
    sweep = json.loads(r.stdout)
    assert sweep["reference"]["steps"] == 6
    assert {(row["scheduler"], row["steps"]) for row in sweep["rows"]} == {
        (s, n) for s in ("ddim", "euler-a", "dpm++2m-karras", "unipc") for n in (2, 4)}
    assert all(row["seconds"] > 0 and row["psnr_db"] > 0 for row in sweep["rows"])
    assert "lcm" in sweep["skipped"] and sweep["judge"] is None and "accuracy" not in sweep["rows"][0]


def test_bench_on_a_bad_folder_is_one_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    r = _bench(tmp_path)
    assert r.exit_code == 2 and r.output.startswith("error: cannot benchmark") and "not valid JSON" in r.output
    r = _bench(tmp_path / "missing")
    assert r.exit_code == 2 and "has no manifest.json" in r.output


def test_bench_options_are_checked():
    with pytest.raises(BenchError, match=r"batch[\s\S]*positive integers[\s\S]*runs"):
        BenchOptions(batches=(0,), runs=0)
    r = _bench("x", "--batch", "one")
    assert r.exit_code == 2 and "comma-separated integers" in r.output


@pytest.mark.slow
def test_unet_step_compares_artifacts(tiny_artifact, tiny_fp16_artifact):
    r = _bench(tiny_artifact, tiny_fp16_artifact, "--unet-step", "--batch", "2", "--runs", "3", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["unet_batch"] == 2 and report["size"] == [128, 128] and report["runs"] == 3
    assert [row["precision"] for row in report["rows"]] == ["fp32", "fp16"]
    assert all(0 < row["min_s"] <= row["median_s"] <= row["max_s"] for row in report["rows"])
    r = _bench(tiny_artifact, tiny_fp16_artifact)
    assert r.exit_code == 2 and "several FOLDERS are compared only with --unet-step" in r.output
    r = _bench(tiny_artifact, "--unet-step", "--plot", "x.png")
    assert r.exit_code == 2 and "--plot draws the stage benchmark" in r.output
