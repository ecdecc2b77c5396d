"""Artifacts that cannot point outside themselves, and malformed manifests and reports as typed
errors: every path the runtime opens is relative, inside the folder after symlinks, and listed."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from kiln.cli import cli
from runtime import load_pipeline
from runtime.errors import ArtifactError
from runtime.manifest import file_entries, load_manifest
from tests.records import write_artifact

ORT = {"name": "onnxruntime", "version": "1.32.0", "execution_provider": "CPUExecutionProvider"}


def _edit(folder, change):
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _relist(folder):
    """Recompute the files table, as a forger who controls the whole folder would."""
    def change(data):
        data["files"] = file_entries(folder, [p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                              if p.is_file() and p.name != "manifest.json"])
    _edit(folder, change)


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    return shutil.copytree(tiny_artifact, tmp_path / "art")


def test_an_engine_path_outside_the_folder_is_refused(artifact):
    def outside(data):
        data["files"] = {}
        data["components"]["unet"]["file"] = "../../../../etc/passwd"
    _edit(artifact, outside)
    with pytest.raises(ArtifactError, match=r"not safe to load[\s\S]*\.\./\.\./\.\./\.\./etc/passwd\s+unet: a file listed"):
        load_pipeline(artifact)


@pytest.mark.parametrize("path", ["/etc/passwd", "../secret.onnx", "a/../../b.onnx", "./unet.onnx", "C:\\\\x.onnx"])
def test_paths_that_are_not_plain_relative_ones_are_refused(artifact, path):
    def listed(data):
        data["files"][path] = data["files"]["unet.onnx"]
        data["components"]["unet"]["file"] = path
    _edit(artifact, listed)
    with pytest.raises(ArtifactError, match="not a plain relative path inside the folder"):
        load_pipeline(artifact)


def test_a_symlink_out_of_the_folder_is_refused(artifact, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(artifact / "unet.onnx", outside)
    (artifact / "unet.onnx").unlink()
    os.symlink(outside, artifact / "unet.onnx")
    with pytest.raises(ArtifactError, match=r"unet\.onnx .* resolves outside the folder"):
        load_pipeline(artifact)
    (artifact / "tokenizer").rename(tmp_path / "tokenizer")
    os.symlink(tmp_path / "tokenizer", artifact / "tokenizer")
    with pytest.raises(ArtifactError, match=r"tokenizer .* resolves outside the folder"):
        load_pipeline(artifact, verify=False)


def test_a_file_a_loader_would_read_must_be_listed(artifact):
    (artifact / "tokenizer" / "added_tokens.json").write_text('{"<evil>": 9}')
    with pytest.raises(ArtifactError, match=r"tokenizer/added_tokens\.json .* not listed \(a loader would read it\)"):
        load_pipeline(artifact)


def test_external_data_an_engine_names_must_be_listed(artifact, tmp_path):
    """A graph whose external weights lie in an unlisted file is refused, even with every checksum right."""
    import onnx

    path = artifact / "text_encoder.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, location="hidden.bin", size_threshold=0)
    _relist(artifact)
    def unlist(data):
        del data["files"]["hidden.bin"]
    _edit(artifact, unlist)
    with pytest.raises(ArtifactError, match=r"text_encoder\.onnx\s+hidden\.bin\s+outside the folder or not listed"):
        load_pipeline(artifact)


def test_checksums_are_verified_before_any_engine_is_parsed(artifact, monkeypatch):
    import runtime.integrity

    parsed = []
    monkeypatch.setattr(runtime.integrity, "onnx_external_locations", lambda path: parsed.append(path) or set())
    (artifact / "vae_decoder.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(ArtifactError, match="failed its checksum check"):
        load_pipeline(artifact)
    assert parsed == []


@pytest.mark.parametrize("change, found", [
    (lambda d: d["components"]["unet"].pop("precision"), r"components\.unet\.precision\s+one of .*\s+missing"),
    (lambda d: d.pop("model"), r"model\s+an object\s+missing"),
    (lambda d: d["components"]["unet"]["inputs"][0].update(min=[1, 2]), r"inputs\[0\]\.min\s+4 non-negative ints"),
    (lambda d: d["files"]["unet.onnx"].update(sha256="nope"), r"files\['unet\.onnx'\]\.sha256\s+64 hex digits"),
    (lambda d: d["profile"]["shapes"].update(height=[512, 64, 64]), r"profile\.shapes\.height"),
])
def test_a_malformed_manifest_is_one_error_listing_the_problems(tmp_path, change, found):
    manifest = write_artifact(tmp_path / "a", ORT, ".onnx")
    _edit(manifest.folder, change)
    with pytest.raises(ArtifactError, match=r"is not a manifest this kiln can read:[\s\S]*" + found):
        load_manifest(manifest.folder)
    r = CliRunner().invoke(cli, ["inspect", str(manifest.folder)])
    assert r.exit_code == 2 and "Traceback" not in r.output and "not a manifest this kiln can read" in r.output


def test_every_problem_at_once_and_non_objects(tmp_path):
    manifest = write_artifact(tmp_path / "a", ORT, ".onnx")
    _edit(manifest.folder, lambda d: (d.pop("dims"), d["backend"].pop("execution_provider")))
    with pytest.raises(ArtifactError, match=r"dims\s+an object\s+missing[\s\S]*backend\.execution_provider"):
        load_manifest(manifest.folder)
    (manifest.folder / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"\(manifest\)\s+a JSON object\s+list"):
        load_manifest(manifest.folder)


@pytest.mark.parametrize("report, message", [
    ("{broken", "report.json is not valid JSON"),
    ("[]", r"\(report\)\s+a JSON object"),
    ('{"engine_parity": {"unet": [{"oops": 1}]}}', r"engine_parity\.unet\s+a list of rows with max_abs_err"),
])
def test_a_malformed_report_is_a_typed_error(tmp_path, report, message):
    manifest = write_artifact(tmp_path / "a", ORT, ".onnx")
    (manifest.folder / "report.json").write_text(report)
    r = CliRunner().invoke(cli, ["inspect", str(manifest.folder)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    import re

    assert re.search(message, r.output), r.output


def test_the_scheduler_folder_may_name_only_a_scheduler(artifact):
    config = artifact / "scheduler" / "scheduler_config.json"
    data = json.loads(config.read_text())
    data["_class_name"] = "UNet2DConditionModel"  # a diffusers class, not a scheduler
    config.write_text(json.dumps(data))
    _relist(artifact)
    with pytest.raises(ArtifactError, match="unknown scheduler class 'UNet2DConditionModel'"):
        load_pipeline(artifact)


def test_model_folders_load_safetensors_only(tmp_path):
    from exporters.builtin import ensure_builtin
    from exporters.resolve import resolve_model
    from runtime.errors import ModelSourceError

    folder = shutil.copytree(ensure_builtin("tiny"), tmp_path / "m")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelSourceError, match=r"weights only as pickles[\s\S]*unet\s+diffusion_pytorch_model\.bin"):
        resolve_model(str(folder))


def test_external_data_in_subgraphs_and_functions_is_found(tmp_path):
    """A location hidden in an If branch's initializer is read by ONNX Runtime as any other: it counts."""
    from onnx import TensorProto, helper

    from runtime.integrity import onnx_external_locations

    hidden = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    hidden.ClearField("float_data")
    hidden.data_location = TensorProto.EXTERNAL
    hidden.external_data.add(key="location", value="../../etc/passwd")
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [hidden])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=other)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert onnx_external_locations(path) == {"../../etc/passwd"}


def test_only_the_tokenizers_kiln_uses_are_loaded(artifact):
    config = artifact / "tokenizer" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"  # a transformers tokenizer, but not one kiln's families use
    config.write_text(json.dumps(data))
    _relist(artifact)
    with pytest.raises(ArtifactError, match=r"tokenizer class 'PreTrainedTokenizerFast' is not one kiln loads"):
        load_pipeline(artifact)


@pytest.mark.parametrize("content, message", [("{nope", "is not valid JSON"), ("[1]", "must hold a JSON object")])
def test_a_damaged_scheduler_config_is_an_artifact_error(artifact, content, message):
    (artifact / "scheduler" / "scheduler_config.json").write_text(content)
    _relist(artifact)
    with pytest.raises(ArtifactError, match=message):
        load_pipeline(artifact)


def test_component_configs_that_cannot_build_the_pipeline_are_an_artifact_error(artifact):
    _edit(artifact, lambda d: d["components"]["vae_decoder"].update(config={}))
    with pytest.raises(ArtifactError, match=r"the sd pipeline could not be assembled from the manifest's component configs"):
        load_pipeline(artifact)
