"""The TensorRT builder without TensorRT: shape translation, options, timing-cache keys, backend
choice, and (against the recording stand-in only) the order of builder calls."""
from __future__ import annotations

import json
import logging

import pytest

from engines import trt_backend
from engines.build import BuildOptions, build_from_export, resolve_options
from engines.select import Choice, Machine, choose_backend
from engines.trt_backend import TrtOptions, engine_from_onnx, profile_shapes, timing_cache_path
from runtime.errors import BuildError, MissingDependencyError
from tests.records import export_components

BACKEND = {"name": "tensorrt", "version": "11.4.0.106", "gpu": "NVIDIA H200", "compute_capability": [9, 0]}


def test_profile_shapes_are_the_manifest_ranges_with_the_unet_batch_doubled():
    """tiny.toml: batch 1/1/4, height and width 64/128/256, VAE factor 8."""
    components = export_components()
    unet = {name: (lo, opt, hi) for name, lo, opt, hi in profile_shapes(components["unet"]["inputs"])}
    assert unet == {
        "sample": ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32)),
        "timestep": ((1,), (2,), (8,)),
        "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (8, 77, 32)),
    }
    (text,) = profile_shapes(components["text_encoder"]["inputs"])
    assert text == ("input_ids", (1, 77), (1, 77), (4, 77))
    (latent,) = profile_shapes(components["vae_decoder"]["inputs"])
    assert latent == ("latent", (1, 4, 8, 8), (1, 4, 16, 16), (4, 4, 32, 32))


def test_profile_shapes_refuse_what_tensorrt_would():
    bad = [{"name": "sample", "min": [2, 4, 8, 8], "opt": [1, 4, 16, 16], "max": [8, 4, 32, 32]},
           {"name": "timestep", "min": [1], "opt": [2], "max": [8, 1]}]
    with pytest.raises(BuildError, match=r"min <= opt <= max[\s\S]*sample[\s\S]*timestep"):
        profile_shapes(bad)


def test_options_are_validated_together_and_map_to_builder_flags():
    with pytest.raises(BuildError) as err:
        TrtOptions(optimization_level=7, hardware_compat="turing", strip_plan=True, workspace_gib=0)
    for field in ("optimization_level", "hardware_compat", "strip_plan", "workspace_gib"):
        assert field in str(err.value)
    assert TrtOptions().flags() == []
    assert TrtOptions(tf32=True, refit="identical", strip_plan=True, weight_streaming=True).flags() == [
        "TF32", "REFIT_IDENTICAL", "STRIP_PLAN", "WEIGHT_STREAMING"]
    assert TrtOptions(workspace_gib=1.5).workspace_bytes == 3 * 2**29


def test_timing_cache_is_keyed_by_gpu_model_and_tensorrt_version(tmp_path, monkeypatch):
    a = timing_cache_path(tmp_path, "11.4.0.106", "NVIDIA H200", [9, 0])
    assert a == tmp_path / "timing-trt11.4.0.106-nvidia-h200-sm90.cache"
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kc"))
    assert timing_cache_path(None, "11.4.0.106", "NVIDIA H200", [9, 0]) == tmp_path / "kc" / "tensorrt" / a.name
    assert a != timing_cache_path(tmp_path, "11.3.0.99", "NVIDIA H200", [9, 0])
    assert a != timing_cache_path(tmp_path, "11.4.0.106", "NVIDIA H100 80GB HBM3", [9, 0])


def test_int8_for_tensorrt_must_be_the_symmetric_recipe():
    trt_backend.check_precision("unet", "int8", {"int8": {"recipe": "tensorrt"}})
    with pytest.raises(BuildError, match=r"'ort-cpu' int8 recipe[\s\S]*--int8-recipe tensorrt"):
        trt_backend.check_precision("unet", "int8", {"int8": {"recipe": "ort-cpu"}})


def test_tensorrt_build_without_tensorrt_says_how_to_install(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text(json.dumps({"kind": "kiln-export", "format_version": 1, "export_key": "0" * 64,
                                                    "components": export_components()}))
    with pytest.raises(MissingDependencyError, match=r"pip install 'kiln\[tensorrt\]' --extra-index-url https://pypi.nvidia.com"):
        build_from_export(export, tmp_path / "out", BuildOptions(backend="tensorrt"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "machine, requested, device, expected",
    [
        (Machine("11.4.0.106", None, "NVIDIA H200", ("CPUExecutionProvider",)), "auto", None, ("tensorrt", "cuda")),
        (Machine(None, "ImportError: no tensorrt", "NVIDIA H200", ("CUDAExecutionProvider", "CPUExecutionProvider")),
         "auto", None, ("onnxruntime", "cuda")),
        (Machine(None, "ImportError: no tensorrt", "NVIDIA H200", ("CPUExecutionProvider",)), "auto", None,
         ("onnxruntime", "cpu")),
        (Machine("11.4.0.106", None, None, ("CPUExecutionProvider",)), "auto", None, ("onnxruntime", "cpu")),
        (Machine("11.4.0.106", None, "NVIDIA H200", ()), "auto", "cpu", ("onnxruntime", "cpu")),
        (None, "onnxruntime", None, ("onnxruntime", "cpu")),
        (None, "tensorrt", None, ("tensorrt", "cuda")),
    ],
)
def test_backend_choice(machine, requested, device, expected):
    choice = choose_backend(requested, device, machine)
    assert (choice.backend, choice.device) == expected
    assert choice.reason


def test_backend_choice_says_why():
    no_trt = Machine(None, "ImportError: libnvinfer.so.11: cannot open shared object file", None, ("CPUExecutionProvider",))
    choice = choose_backend("auto", None, no_trt)
    assert "libnvinfer.so.11" in choice.reason and "no CUDA GPU" in choice.reason
    gpu_no_ep = Machine(None, "ImportError: x", "NVIDIA L4", ("CPUExecutionProvider",))
    assert "install onnxruntime-gpu" in choose_backend("auto", None, gpu_no_ep).reason
    with pytest.raises(BuildError, match="neither TensorRT on a GPU"):
        choose_backend("auto", "cuda", no_trt)
    with pytest.raises(BuildError, match="tensorrt backend builds for CUDA GPUs"):
        choose_backend("tensorrt", "cpu")


def test_auto_resolves_and_logs_the_choice(monkeypatch, caplog):
    monkeypatch.setattr("engines.build.choose_backend", lambda b, d: Choice("onnxruntime", "cpu", "because tested"))
    with caplog.at_level(logging.INFO, logger="engines"):
        options = resolve_options(BuildOptions())
    assert (options.backend, options.device) == ("onnxruntime", "cpu")
    assert "backend: onnxruntime on cpu (because tested)" in caplog.text


# ---- call order, against the recording stand-in (not TensorRT) ------------------------------------


def _build(fake, tmp_path, options=TrtOptions()):
    """The UNet's export record through the builder; the stand-in parser never reads the file."""
    entry = export_components()["unet"]
    out = tmp_path / "unet.plan"
    files = engine_from_onnx(tmp_path / entry["onnx"], out, entry["inputs"], options, BACKEND, cache_dir=tmp_path)
    return files, out


def test_builder_call_order(fake_tensorrt, tmp_path):
    files, out = _build(fake_tensorrt, tmp_path, TrtOptions(workspace_gib=2, optimization_level=5, refit="refit",
                                                           weight_streaming=True))
    assert files == [out] and out.read_bytes() == b"PLAN"
    calls = fake_tensorrt.calls
    names = [c[0] for c in calls]
    assert calls[names.index("create_network")] == ("create_network", 0)  # strongly typed, no flags
    assert names.index("parser.set_flag") < names.index("parse_from_file")  # the flag must precede parsing
    assert ("parser.set_flag", "NATIVE_INSTANCENORM") in calls
    assert ("parse_from_file", str(tmp_path / "unet" / "model.onnx")) in calls  # by path: external data resolves
    assert ("set_memory_pool_limit", "WORKSPACE", 2 * 2**30) in calls
    assert ("set", "Config", "builder_optimization_level", 5) in calls
    assert ("clear_flag", "TF32") in calls
    assert [c[1] for c in calls if c[0] == "set_flag"] == ["REFIT", "WEIGHT_STREAMING"]
    shapes = [c[1:] for c in calls if c[0] == "set_shape"]
    assert shapes[0] == ("sample", (1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))
    assert [s[0] for s in shapes] == ["sample", "timestep", "encoder_hidden_states"]
    order = [names.index(n) for n in ("set_shape", "add_optimization_profile", "set_timing_cache", "build_serialized_network")]
    assert order == sorted(order)


def test_timing_cache_is_loaded_and_saved(fake_tensorrt, tmp_path):
    cache = timing_cache_path(tmp_path, BACKEND["version"], BACKEND["gpu"], BACKEND["compute_capability"])
    _build(fake_tensorrt, tmp_path)
    assert ("create_timing_cache", b"") in fake_tensorrt.calls
    assert cache.read_bytes() == b"+timings"
    fake_tensorrt.calls.clear()
    _build(fake_tensorrt, tmp_path)
    assert ("create_timing_cache", b"+timings") in fake_tensorrt.calls  # the second build starts from the first's
    assert cache.read_bytes() == b"+timings+timings"


def test_builder_failures_are_build_errors(fake_tensorrt, tmp_path):
    fake_tensorrt.state.parse_ok = False
    with pytest.raises(BuildError, match=r"could not parse [\s\S]*UNSUPPORTED_NODE"):
        _build(fake_tensorrt, tmp_path)
    fake_tensorrt.state.parse_ok, fake_tensorrt.state.build_ok = True, False
    with pytest.raises(BuildError, match="could not build an engine"):
        _build(fake_tensorrt, tmp_path)
    assert not (tmp_path / "unet.plan").exists()


def test_sdxl_unet_profiles_carry_the_added_conditions(fake_tensorrt, tiny_sdxl_artifact, tiny_sdxl_turbo_artifact,
                                                       tmp_path):
    """SDXL's text_embeds and time_ids are optimization-profile inputs like any other: doubled for
    guidance, not doubled in a UNet built for guidance off (Turbo); the builder sets every one."""
    for folder, g in ((tiny_sdxl_artifact, 2), (tiny_sdxl_turbo_artifact, 1)):
        inputs = json.loads((folder / "manifest.json").read_text())["components"]["unet"]["inputs"]
        shapes = {name: (lo, opt, hi) for name, lo, opt, hi in profile_shapes(inputs)}
        assert shapes["text_embeds"] == ((1, 40), (g, 40), (4 * g, 40))
        assert shapes["time_ids"] == ((1, 6), (g, 6), (4 * g, 6))
        assert shapes["encoder_hidden_states"] == ((1, 77, 80), (g, 77, 80), (4 * g, 77, 80))
        fake_tensorrt.calls.clear()
        engine_from_onnx(folder / "unet.onnx", tmp_path / f"unet-{g}.plan", inputs, TrtOptions(), BACKEND,
                         cache_dir=tmp_path)
        assert [c[1] for c in fake_tensorrt.calls if c[0] == "set_shape"] == [
            "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
