"""MODEL resolution: profiles, local diffusers folders, hub ids, and the errors for each bad input."""
from __future__ import annotations

import json
import shutil

import pytest

from exporters.builtin import ensure_builtin
from exporters.profile import load_profile, profile_names
from exporters.resolve import resolve_model
from exporters.source import open_source
from runtime.errors import ModelSourceError, ProfileError


def test_shipped_profiles():
    assert {"tiny", "tiny-sd15", "sd15", "sd21"} <= set(profile_names())
    sd21 = load_profile("sd21")
    assert sd21.source == "stabilityai/stable-diffusion-2-1"
    assert (sd21.height.min, sd21.height.opt, sd21.height.max) == (512, 768, 1024)
    assert load_profile("sd15").source == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_tiny_resolves_through_the_local_folder_path():
    source, profile = resolve_model("tiny")
    assert source.folder == ensure_builtin("tiny") and source.source == "builtin:tiny"
    index = json.loads((source.folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    unet = json.loads((source.folder / "unet" / "config.json").read_text())
    assert unet["use_linear_projection"] and unet["upcast_attention"]
    scheduler = json.loads((source.folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert source.dims.max_tokens == 77 and source.dims.size_multiple == 64
    assert profile.height.as_list() == [64, 128, 256]


def test_builtin_is_deterministic(tmp_path, monkeypatch):
    first = open_source("builtin:tiny-sd15").weights_sha256
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    second = open_source("builtin:tiny-sd15")
    assert str(second.folder).startswith(str(tmp_path))
    assert second.weights_sha256 == first


def test_local_folder_gets_default_ranges_from_its_config(tmp_path):
    folder = shutil.copytree(ensure_builtin("tiny"), tmp_path / "my-model")
    source, profile = resolve_model(str(folder))
    assert source.folder == folder.resolve()
    # native 128 (sample_size 16 x VAE factor 8): min half, max double, batch 1-4
    assert profile.height.as_list() == [64, 128, 256] and profile.batch.as_list() == [1, 1, 4]


def test_profile_file_overrides_ranges(tmp_path):
    folder = shutil.copytree(ensure_builtin("tiny"), tmp_path / "m")
    toml = tmp_path / "p.toml"
    toml.write_text('[shapes]\nbatch = [1, 2, 2]\nheight = [64, 64, 128]\nwidth = [64, 128, 128]\n')
    _, profile = resolve_model(str(folder), toml)
    assert profile.batch.as_list() == [1, 2, 2] and profile.width.as_list() == [64, 128, 128]


def test_unknown_model_lists_profiles():
    with pytest.raises(ModelSourceError, match=r"Valid profiles: .*sd15.*sd21.*tiny"):
        resolve_model("no-such-model")


def test_unknown_builtin():
    with pytest.raises(ModelSourceError, match="Built-in models: digits, digits-lcm, small, tiny, tiny-sd15"):
        open_source("builtin:huge")


def test_unknown_profile_name():
    with pytest.raises(ProfileError, match=r"unknown profile 'sd99'. Valid profiles: .*tiny"):
        load_profile("sd99")


def test_folder_missing_a_component(tmp_path):
    folder = shutil.copytree(ensure_builtin("tiny"), tmp_path / "m")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelSourceError, match=r"missing pipeline components[\s\S]*vae\s+vae/config.json\s+no such file"):
        resolve_model(str(folder))


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelSourceError, match="has no model_index.json"):
        resolve_model(str(tmp_path))


def test_unsupported_pipeline_class(tmp_path):
    folder = shutil.copytree(ensure_builtin("tiny"), tmp_path / "sd3")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match=r"StableDiffusion3Pipeline, which kiln does not support yet. "
                                               r"Supported pipeline classes: StableDiffusionPipeline, .*"
                                               r"StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline"):
        resolve_model(str(folder))


def test_unreachable_hub_says_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="could not download 'someone/some-model'.*pass the local folder as MODEL"):
        resolve_model("someone/some-model")


@pytest.mark.parametrize(
    "text, message",
    [
        ('[shapes]\nbatch = [1, 1, 4]\nheight = [256, 128, 512]\nwidth = [64, 64, 64]\n', r"shapes.height .* \[256, 128, 512\]"),
        ('[shapes]\nbatch = [1, 1, 4]\nheight = [64, 64, 64]\n', r"shapes.width .* None"),
        ('[shapes]\nbatch = [1, 1, 4]\nheight = [64, 64, 64]\nwidth = [64, 64, 64]\nsize = 3\n', r"shapes.size .* unknown key"),
        ('[shapes]\nbatch = [1, 1, 4]\nheight = [64, 64, 64]\nwidth = [64, 64, 64]\n[precision]\nunet = "bf16"\n',
         r"precision.unet\s+one of \['fp32', 'fp16', 'int8'\]\s+'bf16'"),
        ('[shapes]\nbatch = [1, 1, 4]\nheight = [64, 64, 64]\nwidth = [64, 64, 64]\n[precision]\ntext_encoder = "int8"\n',
         r"precision.text_encoder .*int8 calibration covers unet"),
        ('[shapes]\nbatch = [1, 1, 4]\nheight = [64, 64, 64]\nwidth = [64, 64, 64]\n[fp16]\nkeep_fp32_softmax = "sometimes"\n',
         r"fp16.keep_fp32_softmax"),
        ('[shapes]\nbatch = [1, 1, 4]\nheight = [64, 64, 64]\nwidth = [64, 64, 64]\n'
         '[int8]\nrecipe = "fast"\ncalibration_steps = 0\n',
         r"int8.recipe[\s\S]*int8.calibration_steps"),
        ('[shapes\n', "not valid TOML"),
    ],
)
def test_bad_profile_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message):
        resolve_model("tiny", path)


def test_profile_sizes_must_fit_the_model(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[shapes]\nbatch = [1, 1, 4]\nheight = [72, 128, 256]\nwidth = [64, 128, 256]\n')
    with pytest.raises(ProfileError, match=r"multiples of 64[\s\S]*shapes.height\s+multiples of 64\s+\[72, 128, 256\]"):
        resolve_model("tiny", path)


def test_component_names_no_family_has_are_refused_before_the_model_is_opened(tmp_path, monkeypatch):
    import exporters.resolve

    monkeypatch.setattr(exporters.resolve, "open_source", lambda s: (_ for _ in ()).throw(AssertionError("opened")))
    path = tmp_path / "p.toml"
    path.write_text('[shapes]\nbatch = [1, 1, 4]\nheight = [64, 64, 64]\nwidth = [64, 64, 64]\n'
                    '[precision]\ntext_encoder_3 = "fp16"\n[fp16]\nkeep_fp32_components = ["vae"]\n')
    with pytest.raises(ProfileError, match=r"precision.text_encoder_3 .* unknown component[\s\S]*fp16.keep_fp32_components"):
        resolve_model("tiny", path)


def test_an_unbound_profile_is_bound_for_export(tmp_path):
    """A default profile straight from default_profile (not through resolve_model) lists no component;
    exporting binds it to the family, so --precision reaches every component."""
    from exporters.export import ExportOptions, export_key
    from exporters.profile import default_profile

    source, bound = resolve_model("tiny")
    raw = default_profile("tiny", "builtin:tiny", 128, 128, 64)
    assert raw.precision == () and dict(bound.precision) == dict.fromkeys(source.family.components, "fp32")
    fp16 = ExportOptions(precision="fp16")
    assert export_key(source, raw, fp16) == export_key(source, bound, fp16)
