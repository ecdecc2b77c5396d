"""Shared fixtures: the built-in tiny models, exported and built once per test session, and the
tiers: a test that uses a model fixture is marked `model` (and `slow` for the costly ones), so
`make test-fast` (-m "not slow and not model and not gpu") runs only the unit tests."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cpu_build_options():
    """The CPU suite's artifacts are ONNX Runtime CPU builds on every machine (auto would pick
    TensorRT where it is installed; the gpu tests build those)."""
    from engines.build import BuildOptions

    return BuildOptions(backend="onnxruntime", device="cpu")


def _gpu_unavailable() -> str | None:
    """Why the `gpu` tests cannot run here, or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from a libraries wheel that did not install
        return (f"tensorrt does not import ({type(exc).__name__}: {exc}); install it with "
                "pip install 'kiln[tensorrt]' --extra-index-url https://pypi.nvidia.com")
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


# fixtures that export or build a model; the second group takes minutes rather than seconds
MODEL_FIXTURES = {"tiny_export", "tiny_artifact", "tiny_fp16_export", "tiny_fp16_artifact", "digits_artifact",
                  "digits_lcm_artifact", "tiny_sdxl_artifact", "tiny_sdxl_turbo_artifact", "lora_artifacts",
                  "streamed_fp16_export", "refittable"}
SLOW_FIXTURES = {"sd15_artifact", "artifacts", "tiny_int8_export", "sdxl_controlnet_artifact"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & (MODEL_FIXTURES | SLOW_FIXTURES):
            item.add_marker(pytest.mark.model)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if "slow" in item.keywords and "model" not in item.keywords:
            item.add_marker(pytest.mark.model)  # every slow test here exports, builds or runs a model
    gpu_items = [item for item in items if "gpu" in item.keywords]
    reason = _gpu_unavailable() if gpu_items else None
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


@pytest.fixture(scope="session", autouse=True)
def kiln_cache(tmp_path_factory) -> Path:
    """Built-in models are cached under a session folder unless KILN_CACHE_DIR is set (CI sets it)."""
    if "KILN_CACHE_DIR" not in os.environ:
        os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("kiln-cache"))
    return Path(os.environ["KILN_CACHE_DIR"])


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """`kiln export tiny --refit refit`: the SD 2.1-shaped model's checked ONNX folder, its UNet's and
    text encoder's weights recorded for LoRA refits (builds without --refit ignore the record)."""
    from exporters.export import ExportOptions, export_model
    from exporters.resolve import resolve_model

    source, profile = resolve_model("tiny")
    return export_model(source, profile, tmp_path_factory.mktemp("export") / "tiny", ExportOptions(refit=True))


@pytest.fixture(scope="session")
def tiny_artifact(tiny_export, tmp_path_factory) -> Path:
    """`kiln build <export folder> --refit refit`: ONNX Runtime engines for tiny, LoRAs swappable."""
    from engines.build import build_from_export

    return build_from_export(tiny_export, tmp_path_factory.mktemp("artifacts") / "tiny",
                             replace(cpu_build_options(), refit="refit")).folder


@pytest.fixture(scope="session")
def sd15_artifact(tmp_path_factory) -> Path:
    """`kiln build tiny-sd15`: the SD 1.5-shaped model, exported and built in one step."""
    from engines.build import build_from_model

    return build_from_model("tiny-sd15", tmp_path_factory.mktemp("artifacts") / "tiny-sd15", cpu_build_options()).folder


@pytest.fixture(scope="session")
def artifacts(tiny_artifact, sd15_artifact) -> dict[str, Path]:
    return {"tiny": tiny_artifact, "tiny-sd15": sd15_artifact}


@pytest.fixture(scope="session")
def digits_artifact(tmp_path_factory) -> Path:
    """`kiln build digits`: the trained embedded default (committed weights)."""
    from engines.build import build_from_model

    return build_from_model("digits", tmp_path_factory.mktemp("artifacts") / "digits", cpu_build_options()).folder


@pytest.fixture(scope="session")
def digits_lcm_artifact(tmp_path_factory) -> Path:
    """`kiln build digits-lcm`: the latent consistency model distilled from digits."""
    from engines.build import build_from_model

    return build_from_model("digits-lcm", tmp_path_factory.mktemp("artifacts") / "digits-lcm", cpu_build_options()).folder


PIPELINE = ("text_encoder", "unet", "vae_decoder")  # what text-to-image needs; skips the VAE encoder's export
XL_PIPELINE = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


@pytest.fixture(scope="session")
def tiny_sdxl_artifact(tmp_path_factory) -> Path:
    """`kiln build tiny-sdxl`: the SDXL-shaped model, every component (img2img too), each graph
    checked against PyTorch at the opt shapes (the SD fixtures check min and max too)."""
    from engines.build import build_from_model
    from exporters.export import ExportOptions

    return build_from_model("tiny-sdxl", tmp_path_factory.mktemp("artifacts") / "tiny-sdxl", cpu_build_options(),
                            export_options=ExportOptions(check_points=("opt",))).folder


@pytest.fixture(scope="session")
def tiny_sdxl_turbo_artifact(tmp_path_factory) -> Path:
    """`kiln build tiny-sdxl-turbo`: text-to-image engines, the UNet built for guidance off."""
    from engines.build import build_from_model
    from exporters.export import ExportOptions

    options = ExportOptions(components=XL_PIPELINE, check_points=("opt",))
    return build_from_model("tiny-sdxl-turbo", tmp_path_factory.mktemp("artifacts") / "tiny-sdxl-turbo",
                            cpu_build_options(), export_options=options).folder


# tiny-sd15 as in profiles/tiny-sd15.toml, its VAE decoder built up to 128x128 only: the UNet's 256x256
# runs with tiled decoding (enable_vae_tiling), as a per-component profile allows
TILED_SD15_PROFILE = """
[model]
source = "builtin:tiny-sd15"
[shapes]
batch  = [1, 1, 4]
height = [64, 128, 256]
width  = [64, 128, 256]
[shapes.vae_decoder]
height = [64, 128, 128]
width  = [64, 128, 128]
"""


def _controlnet_build(model: str, components: tuple[str, ...], tmp_path_factory, lora=None, profile=None) -> dict:
    """Two seeded ControlNets for MODEL and its engines built with both (`kiln build MODEL
    --controlnet A --controlnet B`, and `--lora FILE:0.8 --refit refit` where a LoRA is given)."""
    from engines.build import build_from_model
    from exporters.builtin import ensure_builtin
    from exporters.export import ExportOptions
    from tests.controlnets import make_controlnet

    controlnets = [make_controlnet(ensure_builtin(model), tmp_path_factory.mktemp("controlnet") / f"{model}-{i}",
                                   seed=40 + i) for i in range(2)]
    options = ExportOptions(components=(*components, "controlnet_0", "controlnet_1"), check_points=("opt",),
                            loras=((str(lora), 0.8),) if lora else (), refit=lora is not None,
                            controlnets=tuple(map(str, controlnets)))
    build = replace(cpu_build_options(), refit="refit") if lora else cpu_build_options()
    folder = build_from_model(model, tmp_path_factory.mktemp("artifacts") / f"{model}-controlnet", build, profile,
                              options).folder
    return {"artifact": folder, "controlnets": controlnets}


@pytest.fixture(scope="session")
def lora_artifacts(tmp_path_factory) -> dict:
    """Per model (tiny-sd15, tiny-sdxl): a seeded random LoRA (tests/loras.py) and text-to-image
    engines built with it fused at scale 0.8, refittable (`kiln build MODEL --lora FILE:0.8 --refit
    refit`): the fused LoRA is part of the base weights other LoRAs are swapped onto.

    tiny-sd15's is also the ControlNet and tiling artifact: built with two seeded ControlNets
    (tests/controlnets.py; its UNet takes their residuals, zeros in plain text-to-image), its VAE
    encoder (ControlNet img2img), and a profile that builds the VAE decoder smaller than the UNet
    (TILED_SD15_PROFILE). One build serves the LoRA, refit, ControlNet and tiling tests: exports are
    most of the suite's time."""
    from engines.build import build_from_model
    from exporters.builtin import ensure_builtin
    from exporters.export import ExportOptions
    from tests.loras import make_lora

    out = {}
    lora = make_lora(ensure_builtin("tiny-sd15"), tmp_path_factory.mktemp("lora") / "tiny-sd15", seed=5)
    profile = tmp_path_factory.mktemp("profile") / "tiny-sd15-tiled.toml"
    profile.write_text(TILED_SD15_PROFILE, encoding="utf-8")
    out["tiny-sd15"] = {"lora": lora, **_controlnet_build("tiny-sd15", (*PIPELINE, "vae_encoder"), tmp_path_factory,
                                                          lora=lora, profile=profile)}
    lora = make_lora(ensure_builtin("tiny-sdxl"), tmp_path_factory.mktemp("lora") / "tiny-sdxl", seed=5)
    options = ExportOptions(components=XL_PIPELINE, check_points=("opt",), loras=((str(lora), 0.8),), refit=True)
    folder = build_from_model("tiny-sdxl", tmp_path_factory.mktemp("artifacts") / "tiny-sdxl-lora",
                              replace(cpu_build_options(), refit="refit"), export_options=options).folder
    out["tiny-sdxl"] = {"lora": lora, "artifact": folder}
    return out


@pytest.fixture(scope="session")
def sdxl_controlnet_artifact(tmp_path_factory) -> dict:
    """tiny-sdxl's text-to-image engines with two seeded ControlNets (the slow tier: two more
    SDXL-shaped UNet encoders to export)."""
    return _controlnet_build("tiny-sdxl", XL_PIPELINE, tmp_path_factory)


@pytest.fixture(scope="session")
def refittable(request):
    """MODEL → its refittable text-to-image artifact, from the session's builds: tiny's artifact, and
    for tiny-sd15 and tiny-sdxl lora_artifacts' (a LoRA fused at 0.8 under the ones swapped in)."""

    def get(model: str) -> Path:
        if model == "tiny":
            return request.getfixturevalue("tiny_artifact")
        return request.getfixturevalue("lora_artifacts")[model]["artifact"]

    return get


@pytest.fixture(scope="session")
def tiny_fp16_export(tmp_path_factory) -> Path:
    """tiny with every component converted to fp16 (the graphs TensorRT would build)."""
    from exporters.export import ExportOptions, export_model
    from exporters.resolve import resolve_model

    source, profile = resolve_model("tiny")
    options = ExportOptions(precision="fp16", components=PIPELINE)
    return export_model(source, profile, tmp_path_factory.mktemp("export") / "tiny-fp16", options)


@pytest.fixture(scope="session")
def tiny_fp16_artifact(tiny_fp16_export, tmp_path_factory) -> Path:
    """The fp16 export built for ONNX Runtime CPU."""
    from engines.build import build_from_export

    return build_from_export(tiny_fp16_export, tmp_path_factory.mktemp("artifacts") / "tiny-fp16", cpu_build_options()).folder


@pytest.fixture(scope="session")
def tiny_int8_export(tmp_path_factory) -> Path:
    """tiny's UNet calibrated and quantized with the TensorRT recipe (portable `kiln export`)."""
    from exporters.export import ExportOptions, export_model
    from exporters.resolve import resolve_model

    source, profile = resolve_model("tiny")
    options = ExportOptions(precision="int8", int8_target="tensorrt", components=PIPELINE)
    return export_model(source, profile, tmp_path_factory.mktemp("export") / "tiny-int8", options)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """The recording stand-in for `tensorrt` (tests/fake_tensorrt.py) in every module that drives it."""
    from engines import trt_backend
    from runtime import trt_engine, trt_plumbing
    from tests.fake_tensorrt import make_fake_tensorrt

    module = make_fake_tensorrt()
    for target in (trt_plumbing, trt_backend, trt_engine):
        monkeypatch.setattr(target, "trt", module)
    trt_plumbing.trt_logger.cache_clear()
    trt_engine._runtime.cache_clear()
    yield module
    trt_plumbing.trt_logger.cache_clear()
    trt_engine._runtime.cache_clear()
