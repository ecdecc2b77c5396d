"""The digits judge wired into kiln: `kiln bench --schedulers` and `--journey` report digit
accuracy and Fréchet distance, and an int8 build's report.json the accuracy of int8 against fp32."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kiln.cli import cli


def _bench(*args):
    return CliRunner().invoke(cli, ["bench", *map(str, args)])


def test_judged_scheduler_sweep(digits_artifact, tmp_path):
    r = _bench(digits_artifact, "--schedulers", "--step-counts", "2,8", "--json", "--plot", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    sweep = json.loads(r.stdout)
    assert sweep["judge"] == "digit accuracy" and sweep["model"] == "builtin:digits" and "reference" not in sweep
    assert {(row["scheduler"], row["steps"]) for row in sweep["rows"]} == {
        (s, n) for s in ("ddim", "euler-a", "dpm++2m-karras", "unipc") for n in (2, 8)}
    for row in sweep["rows"]:
        assert row["images"] == 40 and 0 <= row["accuracy"] <= 1 and row["frechet"] >= 0 and row["seconds"] > 0
    by = {(row["scheduler"], row["steps"]): row for row in sweep["rows"]}
    assert by[("dpm++2m-karras", 8)]["frechet"] < by[("ddim", 2)]["frechet"] / 2  # more steps, digits more like real ones
    assert "needs an LCM-distilled model" in sweep["skipped"]["lcm"]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    r = _bench(digits_artifact, "--schedulers", "--step-counts", "2")
    assert r.exit_code == 0 and "accuracy %" in r.output and "Fréchet" in r.output


def test_lcm_sweep_runs_only_lcm(digits_lcm_artifact):
    r = _bench(digits_lcm_artifact, "--schedulers", "--step-counts", "1,4", "--json")
    assert r.exit_code == 0, r.output
    sweep = json.loads(r.stdout)
    assert [(row["scheduler"], row["steps"]) for row in sweep["rows"]] == [("lcm", 1), ("lcm", 4)]
    assert set(sweep["skipped"]) == {"ddim", "euler-a", "dpm++2m-karras", "unipc"}
    assert all("runs only LCMScheduler" in why for why in sweep["skipped"].values())


def test_journey(digits_artifact, digits_lcm_artifact, tmp_path):
    r = _bench(digits_artifact, "--journey", digits_lcm_artifact, "--runs", "1", "--json", "--plot", tmp_path / "j.png")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    stops = [(row["stop"], row["runtime"], row["steps"]) for row in report["rows"]]
    assert stops == [("DDIM 50", "diffusers (PyTorch)", 50), ("DDIM 50", "kiln", 50), ("DPM++ 2M Karras 20", "kiln", 20),
                     ("LCM 4", "kiln", 4), ("LCM 1", "kiln", 1)]
    first = report["rows"][0]
    assert first["speedup"] == 1.0
    for row in report["rows"]:
        assert row["images"] == 40 and 0 <= row["accuracy"] <= 1
        assert row["speedup"] == pytest.approx(first["seconds_per_image"] / row["seconds_per_image"])
    # the same weights and scheduler through diffusers and through kiln's engines draw the same digits
    assert abs(report["rows"][0]["accuracy"] - report["rows"][1]["accuracy"]) <= 0.05
    assert (tmp_path / "j.png").read_bytes()[:4] == b"\x89PNG"


def test_journey_refuses_the_lcm_as_its_start(digits_lcm_artifact):
    r = _bench(digits_lcm_artifact, "--journey", digits_lcm_artifact)
    assert r.exit_code == 2 and "starts from the model it was distilled from" in r.output


def test_judged_quality_of_the_same_engines(digits_artifact):
    """pipeline_judged on one set of engines twice: the same figures (the wiring, not the model)."""
    from exporters.judges import judge_for
    from exporters.quality import pipeline_judged
    from runtime.manifest import load_manifest

    manifest = load_manifest(digits_artifact)
    result = pipeline_judged(manifest, manifest, judge_for("builtin:digits"), 64, 64)
    assert result["fp32"] == result["exported"] and result["steps"] == 20 and result["fp32"]["images"] == 40


@pytest.mark.slow
def test_int8_report_has_accuracy_against_fp32(tmp_path):
    from engines.build import BuildOptions, build_from_model
    from exporters.export import ExportOptions

    folder = build_from_model("digits", tmp_path / "digits-int8", BuildOptions(backend="onnxruntime", device="cpu"),
                              export_options=ExportOptions(precision="int8")).folder
    r = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert r.exit_code == 0, r.output
    judged = json.loads((folder / "report.json").read_text())["quality"]["judged"]
    assert judged["judge"] == "digit accuracy" and judged["exported"]["images"] == 40
    assert judged["exported"]["accuracy"] >= judged["fp32"]["accuracy"] - 0.1
    assert "digit accuracy:" in r.output and "with fp32 engines" in r.output
