"""The TensorRT runtime without TensorRT: compatibility decisions, buffer arithmetic, and (against
the recording stand-in only) how engines are loaded, share scratch and are driven."""
from __future__ import annotations

import json
import re
import types

import pytest
import torch

from runtime import trt_engine
from runtime.errors import ArtifactError, ShapeError
from runtime.trt_compat import TrtDevice, check_compatible, version_key
from runtime.trt_engine import align, load_engines, max_io_nbytes, scratch_nbytes, tensor_nbytes
from tests.records import component_info, write_artifact

BUILT = {"name": "tensorrt", "version": "11.4.0.106", "gpu": "NVIDIA H200", "compute_capability": [9, 0],
         "hardware_compatibility_level": "none"}
H200 = TrtDevice("11.4.0.106", "NVIDIA H200", (9, 0))


# ---- compatibility decisions --------------------------------------------------------------------


def test_same_machine_is_compatible():
    assert check_compatible(BUILT, H200) == []
    assert check_compatible(BUILT, TrtDevice("11.4.0.106.post1", "NVIDIA H200", (9, 0))) == []
    assert version_key("11.4.0.106") == (11, 4, 0, 106)


def test_other_tensorrt_version_is_refused_naming_both():
    with pytest.raises(ArtifactError, match=r"built with TensorRT 11\.4\.0\.106 and this machine has TensorRT 11\.3\.0\.99"):
        check_compatible(BUILT, TrtDevice("11.3.0.99", "NVIDIA H200", (9, 0)))


def test_other_compute_capability_is_refused_naming_both():
    with pytest.raises(ArtifactError) as err:
        check_compatible(BUILT, TrtDevice("11.4.0.106", "NVIDIA L4", (8, 9)))
    message = str(err.value)
    assert "compute capability 9.0 (NVIDIA H200)" in message and "(NVIDIA L4) is compute capability 8.9" in message
    assert "Rebuild it on this machine" in message


def test_both_mismatches_are_reported_at_once():
    with pytest.raises(ArtifactError, match=r"TensorRT 10\.16\.1\.11[\s\S]*compute capability 8\.6"):
        check_compatible(BUILT, TrtDevice("10.16.1.11", "NVIDIA A10", (8, 6)))


def test_hardware_compatible_engines_move_between_generations():
    ampere_plus = {**BUILT, "compute_capability": [8, 0], "hardware_compatibility_level": "ampere-plus"}
    assert check_compatible(ampere_plus, H200) == []
    with pytest.raises(ArtifactError, match=r"Ampere and newer[\s\S]*compute capability 7\.5"):
        check_compatible(ampere_plus, TrtDevice("11.4.0.106", "Tesla T4", (7, 5)))
    same_cc = {**BUILT, "hardware_compatibility_level": "same-compute-capability"}
    assert check_compatible(same_cc, TrtDevice("11.4.0.106", "NVIDIA H100 80GB HBM3", (9, 0))) == []


def test_another_gpu_of_the_same_capability_warns():
    (warning,) = check_compatible(BUILT, TrtDevice("11.4.0.106", "NVIDIA H100 80GB HBM3", (9, 0)))
    assert "tuned on NVIDIA H200" in warning and "a rebuild here may be faster" in warning


def test_unknown_hardware_level_is_an_artifact_error():
    with pytest.raises(ArtifactError, match="unknown hardware_compatibility_level 'hopper-plus'"):
        check_compatible({**BUILT, "hardware_compatibility_level": "hopper-plus"}, H200)


# ---- buffer arithmetic ----------------------------------------------------------------------------


def test_buffer_arithmetic():
    assert [align(n) for n in (0, 1, 256, 257)] == [0, 256, 256, 512]
    assert tensor_nbytes((2, 4, 16, 16), "float32") == 2 * 4 * 16 * 16 * 4
    assert tensor_nbytes((8, 77), "int32") == 8 * 77 * 4
    assert tensor_nbytes((2, 4), "float16") == 16
    with pytest.raises(ShapeError, match="dynamic dimension"):
        tensor_nbytes((-1, 4), "float32")
    # engines that run one at a time share the largest need, not the sum
    assert scratch_nbytes({"text_encoder": 1000, "unet": 5000, "vae_decoder": 4097}) == 5120
    assert scratch_nbytes({}) == 0
    unet = component_info("unet")
    # tiny at the profile's max: UNet batch 8 (4 images x 2 for guidance), 32x32 latents, 77x32 text
    sample = 8 * 4 * 32 * 32 * 4
    assert max_io_nbytes(unet) == sample + 8 * 4 + 8 * 77 * 32 * 4 + sample


# ---- loading and driving, against the recording stand-in -------------------------------------------


def _trt_artifact(tmp_path, fake, **engine_extra):
    """A TensorRT artifact of tiny with stand-in plan files, each configured in the stand-in."""
    manifest = write_artifact(tmp_path / "trt", dict(BUILT), ".plan")
    scratch = {"text_encoder": 3000, "unet": 70000, "vae_decoder": 50000, "vae_encoder": 100}
    for name, c in manifest.components.items():
        io = {t.name: {"float32": "FLOAT", "int32": "INT32"}[t.dtype] for t in c.inputs + c.outputs}
        fake.state.engines[name.encode()] = {"name": name, "io": io, "scratch": scratch[name], **engine_extra,
                                             "output_shapes": {}}
    return manifest


@pytest.fixture
def on_cpu(monkeypatch):
    """Run the engine plumbing on CPU tensors: the machine reports the build's GPU, the stream is a
    stand-in with a handle, scratch comes from host memory."""
    monkeypatch.setattr(trt_engine, "device_here", lambda index=None: H200)
    monkeypatch.setattr(trt_engine, "_current_stream", lambda device: types.SimpleNamespace(cuda_stream=4242))
    monkeypatch.setattr(trt_engine, "_allocate_scratch", lambda n: torch.empty(max(n, 256), dtype=torch.uint8))


def test_engines_share_one_scratch_sized_for_the_largest(fake_tensorrt, tmp_path, on_cpu):
    manifest = _trt_artifact(tmp_path, fake_tensorrt)
    names = ["text_encoder", "unet", "vae_decoder"]
    engines = load_engines(manifest.folder, manifest.backend, {n: manifest.components[n] for n in names},
                           cuda_graphs=False)
    scratch = {id(e.scratch) for e in engines.values()}
    assert len(scratch) == 1 and engines["unet"].scratch.numel() == align(70000)
    calls = fake_tensorrt.calls
    ptr = engines["unet"].scratch.data_ptr()
    assert [c for c in calls if c[0] == "set_device_memory"] == [
        ("set_device_memory", "text_encoder", ptr, 3000), ("set_device_memory", "unet", ptr, 70000),
        ("set_device_memory", "vae_decoder", ptr, 50000)]
    assert {c[2] for c in calls if c[0] == "create_execution_context"} == {"USER_MANAGED"}
    # every plan is deserialized before any context exists: the scratch size needs all of them
    kinds = [c[0] for c in calls]
    assert max(i for i, k in enumerate(kinds) if k == "deserialize_cuda_engine") < kinds.index("create_execution_context")


def test_each_call_sets_shapes_and_addresses_then_enqueues(fake_tensorrt, tmp_path, on_cpu):
    manifest = _trt_artifact(tmp_path, fake_tensorrt)
    fake_tensorrt.state.engines[b"text_encoder"]["output_shapes"] = {"text_embeddings": (2, 77, 32)}
    engine = load_engines(manifest.folder, manifest.backend, {"text_encoder": manifest.components["text_encoder"]},
                          cuda_graphs=False)["text_encoder"]
    fake_tensorrt.calls.clear()
    ids = torch.zeros(2, 77, dtype=torch.int64)
    out = engine(input_ids=ids)
    assert out["text_embeddings"].shape == (2, 77, 32) and out["text_embeddings"].dtype == torch.float32
    expected = [("set_input_shape", "input_ids", (2, 77)), ("set_tensor_address", "input_ids"),
                ("set_tensor_address", "text_embeddings"), ("execute_async_v3", 4242)]
    assert fake_tensorrt.calls == expected
    fake_tensorrt.calls.clear()
    engine(input_ids=ids)
    assert fake_tensorrt.calls == expected  # shapes are set on every call, buffers are reused
    with pytest.raises(ShapeError, match=r"input 'input_ids' has shape \[5, 77\], outside the range"):
        engine(input_ids=torch.zeros(5, 77, dtype=torch.int64))


def test_an_engine_whose_tensors_differ_from_the_manifest_is_refused(fake_tensorrt, tmp_path, on_cpu):
    manifest = _trt_artifact(tmp_path, fake_tensorrt)
    fake_tensorrt.state.engines[b"unet"]["io"]["sample"] = "HALF"
    with pytest.raises(ArtifactError, match=r"differ from the manifest[\s\S]*sample\s+float32\s+float16"):
        load_engines(manifest.folder, manifest.backend, {"unet": manifest.components["unet"]})


def test_incompatible_artifact_is_refused_before_deserializing(fake_tensorrt, tmp_path, on_cpu):
    manifest = _trt_artifact(tmp_path, fake_tensorrt)
    backend = {**manifest.backend, "version": "10.16.1.11"}
    with pytest.raises(ArtifactError, match="TensorRT 10.16.1.11 and this machine has TensorRT 11.4.0.106"):
        load_engines(manifest.folder, backend, {"unet": manifest.components["unet"]})
    assert not any(c[0] == "deserialize_cuda_engine" for c in fake_tensorrt.calls)


def test_weight_streaming_budget(fake_tensorrt, tmp_path, on_cpu):
    manifest = _trt_artifact(tmp_path, fake_tensorrt, streamable=10**6, scratch_streaming=90000)
    unet = {"unet": manifest.components["unet"]}
    engines = load_engines(manifest.folder, manifest.backend, unet, weight_streaming_budget="auto")
    assert ("weight_streaming_budget_v2", "unet", 12345) in fake_tensorrt.calls
    # the budget is set before the scratch is sized: streaming needs scratch of its own
    assert engines["unet"].scratch.numel() == align(90000)
    load_engines(manifest.folder, manifest.backend, unet, weight_streaming_budget={"unet": 5 * 10**5})
    assert ("weight_streaming_budget_v2", "unet", 5 * 10**5) in fake_tensorrt.calls


def test_weight_streaming_needs_an_engine_built_for_it(fake_tensorrt, tmp_path, on_cpu):
    manifest = _trt_artifact(tmp_path, fake_tensorrt)
    with pytest.raises(ArtifactError, match="not built for weight streaming; rebuild with --weight-streaming"):
        load_engines(manifest.folder, manifest.backend, {"unet": manifest.components["unet"]}, weight_streaming_budget=10**6)


def test_loading_a_tensorrt_artifact_here_fails_with_the_reason(fake_tensorrt, tmp_path):
    """No stand-in device: on a machine without CUDA the message says so (the real path)."""
    from runtime import load_pipeline

    manifest = _trt_artifact(tmp_path, fake_tensorrt)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the no-GPU message cannot be provoked")
    with pytest.raises(ArtifactError, match="TensorRT engines need a CUDA GPU, and torch sees none here"):
        load_pipeline(manifest.folder)


def test_inspect_shows_the_tensorrt_record(fake_tensorrt, tmp_path):
    from click.testing import CliRunner

    from kiln.cli import cli

    manifest = _trt_artifact(tmp_path, fake_tensorrt)
    data = json.loads((manifest.folder / "manifest.json").read_text())
    data["backend"].update(builder_optimization_level=3, workspace_bytes=None, tf32=False, refit="refit",
                           strip_plan=False, weight_streaming=True)
    (manifest.folder / "manifest.json").write_text(json.dumps(data))
    r = CliRunner().invoke(cli, ["inspect", str(manifest.folder)])
    assert r.exit_code == 0, r.output
    assert "tensorrt 11.4.0.106 (NVIDIA H200)" in r.output
    assert "NVIDIA H200 (compute capability 9.0)" in r.output
    assert re.search(r"hardware compat\s+none", r.output)
    assert "opt level 3, workspace TensorRT default, flags: weight_streaming, refit=refit" in r.output


def test_cuda_graphs_capture_once_per_shape_and_replay(fake_tensorrt, tmp_path, on_cpu, monkeypatch):
    """Capture and replay order, with torch's graph API replaced by recorders (no CUDA here)."""
    import contextlib

    calls = fake_tensorrt.calls

    class Graph:
        def replay(self):
            calls.append(("replay",))

    @contextlib.contextmanager
    def capture(graph):
        calls.append(("capture_begin",))
        yield
        calls.append(("capture_end",))

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    manifest = _trt_artifact(tmp_path, fake_tensorrt)
    spec = fake_tensorrt.state.engines[b"text_encoder"]
    spec["output_shapes"] = {"text_embeddings": (1, 77, 32)}
    engine = load_engines(manifest.folder, manifest.backend, {"text_encoder": manifest.components["text_encoder"]},
                          cuda_graphs=True)["text_encoder"]
    one, two = torch.zeros(1, 77, dtype=torch.int64), torch.zeros(2, 77, dtype=torch.int64)

    def run(ids):
        calls.clear()
        engine(input_ids=ids)
        return [c[0] for c in calls]

    bind = ["set_input_shape", "set_tensor_address", "set_tensor_address"]
    assert run(one) == bind + ["execute_async_v3", "capture_begin", "execute_async_v3", "capture_end"]
    assert run(one) == ["replay"]
    spec["output_shapes"] = {"text_embeddings": (2, 77, 32)}
    assert run(two) == bind + ["execute_async_v3", "capture_begin", "execute_async_v3", "capture_end"]
    # back to the first shape: the context was set up for the second, so one plain enqueue, then replays
    spec["output_shapes"] = {"text_embeddings": (1, 77, 32)}
    assert run(one) == bind + ["execute_async_v3"]
    assert run(one) == ["replay"]


def test_lora_refit_sets_named_weights_then_what_tensorrt_still_needs(fake_tensorrt, tmp_path, on_cpu, monkeypatch):
    """TrtEngine.refit: trt.Refitter, set_named_weights per changed weight, get_missing_weights,
    the base value of each weight TensorRT still needs (one fused with a changed weight), then
    refit_cuda_engine; captured CUDA graph states are dropped."""
    import numpy as np

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    manifest = _trt_artifact(tmp_path, fake_tensorrt, refittable=True)
    engine = load_engines(manifest.folder, manifest.backend, {"unet": manifest.components["unet"]},
                          cuda_graphs=False)["unet"]
    fake_tensorrt.state.refit_missing = ["unet.fused.bias"]
    fake_tensorrt.calls.clear()
    new = np.ones((4, 3), dtype=np.float16)
    engine.refit({"unet.to_q.weight": new}, base=lambda name: np.zeros(4, np.float16) if name == "unet.fused.bias" else None)
    assert fake_tensorrt.calls == [
        ("Refitter", "unet"), ("set_named_weights", "unet.to_q.weight", "float16", (4, 3)), ("get_missing_weights",),
        ("set_named_weights", "unet.fused.bias", "float16", (4,)), ("refit_cuda_engine",)]
    with pytest.raises(ArtifactError, match=r"needs weights the artifact's refit record lacks.*unet\.fused\.bias"):
        engine.refit({"unet.to_q.weight": new}, base=lambda name: None)


def test_lora_refit_of_an_engine_built_without_refit_is_refused(fake_tensorrt, tmp_path, on_cpu, monkeypatch):
    import numpy as np

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    manifest = _trt_artifact(tmp_path, fake_tensorrt)
    engine = load_engines(manifest.folder, manifest.backend, {"unet": manifest.components["unet"]},
                          cuda_graphs=False)["unet"]
    with pytest.raises(ArtifactError, match="not refittable; rebuild with --refit refit"):
        engine.refit({"w": np.ones(2, np.float32)})
