"""Shared fixtures: the built-in tiny models, exported and built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def kiln_cache(tmp_path_factory) -> Path:
    """Built-in models are cached under a session folder unless KILN_CACHE_DIR is set (CI sets it)."""
    if "KILN_CACHE_DIR" not in os.environ:
        os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("kiln-cache"))
    return Path(os.environ["KILN_CACHE_DIR"])


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """`kiln export tiny`: the SD 2.1-shaped model's checked ONNX folder."""
    from exporters.export import export_model
    from exporters.source import resolve_model

    source, profile = resolve_model("tiny")
    return export_model(source, profile, tmp_path_factory.mktemp("export") / "tiny")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_export, tmp_path_factory) -> Path:
    """`kiln build <export folder>`: ONNX Runtime engines for tiny."""
    from engines.build import build_from_export

    return build_from_export(tiny_export, tmp_path_factory.mktemp("artifacts") / "tiny").folder


@pytest.fixture(scope="session")
def sd15_artifact(tmp_path_factory) -> Path:
    """`kiln build tiny-sd15`: the SD 1.5-shaped model, exported and built in one step."""
    from engines.build import build_from_model

    return build_from_model("tiny-sd15", tmp_path_factory.mktemp("artifacts") / "tiny-sd15").folder


@pytest.fixture(scope="session")
def artifacts(tiny_artifact, sd15_artifact) -> dict[str, Path]:
    return {"tiny": tiny_artifact, "tiny-sd15": sd15_artifact}


PIPELINE = ("text_encoder", "unet", "vae_decoder")  # what text-to-image needs; skips the VAE encoder's export


@pytest.fixture(scope="session")
def tiny_fp16_export(tmp_path_factory) -> Path:
    """tiny with every component converted to fp16 (the graphs TensorRT would build)."""
    from exporters.export import ExportOptions, export_model
    from exporters.source import resolve_model

    source, profile = resolve_model("tiny")
    options = ExportOptions(precision="fp16", components=PIPELINE)
    return export_model(source, profile, tmp_path_factory.mktemp("export") / "tiny-fp16", options)


@pytest.fixture(scope="session")
def tiny_fp16_artifact(tiny_fp16_export, tmp_path_factory) -> Path:
    """The fp16 export built for ONNX Runtime CPU."""
    from engines.build import build_from_export

    return build_from_export(tiny_fp16_export, tmp_path_factory.mktemp("artifacts") / "tiny-fp16").folder


@pytest.fixture(scope="session")
def tiny_int8_export(tmp_path_factory) -> Path:
    """tiny's UNet calibrated and quantized with the TensorRT recipe (portable `kiln export`)."""
    from exporters.export import ExportOptions, export_model
    from exporters.source import resolve_model

    source, profile = resolve_model("tiny")
    options = ExportOptions(precision="int8", int8_target="tensorrt", components=PIPELINE)
    return export_model(source, profile, tmp_path_factory.mktemp("export") / "tiny-int8", options)
