"""Artifact builds: atomic, skipped when the inputs are unchanged, refused when an export is altered."""
from __future__ import annotations

import json
import shutil

import pytest

from engines import build as build_mod
from engines import ort_backend
from engines.build import BuildOptions, build_from_export, build_from_model
from runtime.errors import BuildError
from runtime.manifest import load_manifest

CPU = BuildOptions(backend="onnxruntime", device="cpu")  # the suite builds for this machine, whatever it has
FORCE = BuildOptions(backend="onnxruntime", device="cpu", force=True)
TINY = BuildOptions(backend="onnxruntime", device="cpu", refit="refit")  # how conftest builds the session's tiny


def test_rebuild_with_unchanged_inputs_is_skipped(tiny_export, tiny_artifact, caplog, monkeypatch):
    before = (tiny_artifact / "manifest.json").read_bytes()
    # a skip reads export.json only; hashing every graph of the export is for builds
    monkeypatch.setattr(build_mod, "_verify_export", lambda *a: (_ for _ in ()).throw(AssertionError("hashed")))
    with caplog.at_level("DEBUG", logger="engines"):
        result = build_from_export(tiny_export, tiny_artifact, TINY)
    assert result.skipped
    assert "is up to date" in caplog.text
    assert (tiny_artifact / "manifest.json").read_bytes() == before


def test_refit_modes_are_checked_before_any_work(tiny_export, tiny_fp16_export, tmp_path):
    with pytest.raises(BuildError, match="was not exported refittable.*kiln export MODEL --refit refit"):
        build_from_export(tiny_fp16_export, tmp_path / "a", TINY)
    with pytest.raises(BuildError, match="--refit identical is TensorRT's"):
        build_from_export(tiny_export, tmp_path / "b", BuildOptions(backend="onnxruntime", device="cpu", refit="identical"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_changed_artifact_is_rebuilt(tiny_export, tiny_artifact, tmp_path):
    folder = shutil.copytree(tiny_artifact, tmp_path / "a")
    (folder / "unet.onnx").write_bytes(b"damaged")
    result = build_from_export(tiny_export, folder, CPU)
    assert not result.skipped
    assert load_manifest(folder).data["build_key"] == result.build_key
    assert (folder / "unet.onnx").stat().st_size > 1000


def test_force_rebuilds(tiny_export, tiny_artifact, tmp_path):
    folder = shutil.copytree(tiny_artifact, tmp_path / "a")
    assert not build_from_export(tiny_export, folder, FORCE).skipped


def test_model_build_skips_before_exporting(sd15_artifact, monkeypatch):
    import exporters.export

    def no_export(*args, **kwargs):
        raise AssertionError("an up-to-date artifact must not be exported again")

    monkeypatch.setattr(exporters.export, "export_model", no_export)
    assert build_from_model("tiny-sd15", sd15_artifact, CPU).skipped


def test_interrupted_build_leaves_nothing(tiny_export, tmp_path, monkeypatch):
    real = ort_backend.engine_from_onnx
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ort_backend, "engine_from_onnx", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        build_from_export(tiny_export, tmp_path / "out", CPU)
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_old_artifact(tiny_export, tiny_artifact, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_artifact, tmp_path / "a")
    before = sorted(p.name for p in folder.iterdir())
    monkeypatch.setattr(ort_backend, "engine_from_onnx", lambda *a, **k: (_ for _ in ()).throw(BuildError("boom")))
    with pytest.raises(BuildError, match="boom"):
        build_from_export(tiny_export, folder, FORCE)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_altered_export_is_refused(tiny_export, tmp_path):
    export = shutil.copytree(tiny_export, tmp_path / "exp")
    (export / "unet" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(BuildError, match=r"incomplete or altered[\s\S]*unet/model.onnx"):
        build_from_export(export, tmp_path / "out", CPU)
    assert not (tmp_path / "out").exists()


def test_unknown_backend_and_device():
    import onnxruntime

    with pytest.raises(BuildError, match="unknown backend 'openvino'; choose auto, onnxruntime, tensorrt"):
        BuildOptions(backend="openvino")
    with pytest.raises(BuildError, match="device must be cpu or cuda, got 'rocm'"):
        BuildOptions(device="rocm")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here; the missing-provider error cannot be provoked")
    with pytest.raises(BuildError, match="no CUDAExecutionProvider"):
        build_mod.backend_identity(BuildOptions(backend="onnxruntime", device="cuda"))


def test_report_records_parity(tiny_artifact):
    report = json.loads((tiny_artifact / "report.json").read_text())
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert [r["point"] for r in report["export_parity"][name]] == ["min", "opt", "max"]
        (engine,) = report["engine_parity"][name]
        assert engine["ok"] and engine["max_abs_err"] < engine["tolerance"]


def test_sigterm_during_a_build_leaves_nothing_behind(tiny_export, tmp_path):
    """kiln build, stopped with SIGTERM as it builds: the same cleanup as Ctrl-C, exit 128 + 15."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen([sys.executable, "-m", "kiln", "build", str(tiny_export), "--out", str(tmp_path / "out"),
                                "--backend", "onnxruntime"], cwd=root, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("[1/"):
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read()
    assert process.wait(60) == 143, rest
    assert "stopped by SIGTERM: nothing half-written was kept" in rest
    assert list(tmp_path.iterdir()) == []


@pytest.mark.model
def test_tracing_files_go_beside_the_output(tmp_path, monkeypatch):
    import tempfile

    from exporters.export import ExportOptions, export_model
    from exporters.resolve import resolve_model

    folders = []
    real = tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        folders.append(kwargs.get("dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    source, profile = resolve_model("tiny")
    export_model(source, profile, tmp_path / "exp", ExportOptions(components=("text_encoder",), check_points=("min",)))
    assert folders and all(f is not None and str(f).startswith(str(tmp_path.resolve())) for f in folders), folders
