"""LoRA swapped at run time into refittable engines (kiln build MODEL --refit refit): images match
diffusers with the same LoRAs and weights, switching A → B leaves nothing of A, unloading gives
the artifact's own images bit for bit, and weights the artifact cannot refit are refused by name."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from runtime.errors import NotSupportedError
from runtime.lora import LoraError

TOLERANCE = 2 / 255
MODELS = ["tiny-sd15", pytest.param("tiny", marks=pytest.mark.slow), pytest.param("tiny-sdxl", marks=pytest.mark.slow)]


def _images(pipe, size: int) -> np.ndarray:
    return pipe(prompt=["a photo of a cat", "a red bicycle"], num_inference_steps=3, height=size, width=size,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def _reference(model: str, pipe):
    """The diffusers pipeline the artifact was built from, with the LoRAs fused at build fused too."""
    import diffusers

    from exporters.builtin import ensure_builtin
    from exporters.lora import fuse_loras, resolve_loras

    ref = getattr(diffusers, pipe.manifest.model["pipeline_class"]).from_pretrained(ensure_builtin(model))
    fuse_loras(ref, resolve_loras(tuple((lora["source"], lora["scale"]) for lora in pipe.manifest.model.get("loras", []))))
    ref.scheduler = ref.scheduler.from_config(pipe.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    from exporters.builtin import ensure_builtin
    from tests.loras import make_lora

    made = {}

    def get(model: str):
        if model not in made:
            folder = ensure_builtin(model)
            made[model] = [make_lora(folder, tmp_path_factory.mktemp("lora") / f"{model}-{seed}", seed=seed)
                           for seed in (11, 12)]
        return made[model]

    return get


@pytest.mark.parametrize("model", MODELS)
def test_swapped_loras_match_diffusers_and_unload_restores_the_engines(model, refittable, loras):
    from runtime import load_pipeline

    a, b = loras(model)
    pipe = load_pipeline(refittable(model))
    pipe.set_progress_bar_config(disable=True)
    size = pipe.manifest.shape_range("height")[1]
    base = _images(pipe, size)
    ref = _reference(model, pipe)

    pipe.load_lora_weights(str(a), adapter_name="a")
    ref.load_lora_weights(str(a.parent), weight_name=a.name, adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.8])
    ref.set_adapters(["a"], adapter_weights=[0.8])
    got, want = _images(pipe, size), _images(ref, size)
    assert np.abs(got - base).max() > 4 * TOLERANCE  # the LoRA changes the images far more than the tolerance ...
    assert np.abs(got - want).max() <= TOLERANCE  # ... exactly as diffusers does

    pipe.load_lora_weights(str(b), adapter_name="b")
    ref.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="b")
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["b"]  # the newest alone, as in diffusers
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.7])
    ref.set_adapters(["a", "b"], adapter_weights=[0.5, 0.7])
    assert np.abs(_images(pipe, size) - _images(ref, size)).max() <= TOLERANCE

    pipe.set_adapters("b")  # A → B: B's images, nothing of A
    ref.set_adapters("b")
    after_switch = _images(pipe, size)
    assert np.abs(after_switch - _images(ref, size)).max() <= TOLERANCE
    pipe.unload_lora_weights()
    assert np.array_equal(_images(pipe, size), base)  # the artifact's own images, bit for bit
    pipe.load_lora_weights(str(b), adapter_name="b")
    assert np.array_equal(_images(pipe, size), after_switch)  # B straight from the base: the same bits
    assert pipe.lora_refit.swaps >= 5


def test_kohya_files_load_as_diffusers_reads_them(refittable, loras, tmp_path):
    """A kohya/A1111 LoRA (lora_unet_* / lora_te_* keys with alphas) is read by diffusers' converter:
    the same LoRA in both formats gives the same images."""
    from safetensors.torch import load_file, save_file

    from runtime import load_pipeline

    a, _ = loras("tiny-sd15")
    kohya = {}
    for key, value in load_file(str(a)).items():
        prefix, path, kind = re.fullmatch(r"(\w+)\.(.+)\.lora[._](A|B|down|up)\.weight", key).groups()
        if prefix == "text_encoder" and not path.startswith("text_model."):
            path = f"text_model.{path}"
        name = ("lora_unet_" if prefix == "unet" else "lora_te_") + path.replace(".", "_")
        down = kind in ("A", "down")
        kohya[f"{name}.lora_{'down' if down else 'up'}.weight"] = value
        if down:
            kohya[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))  # alpha = rank: scaling 1, as the file
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    pipe = load_pipeline(refittable("tiny-sd15"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(a), adapter_name="diffusers")
    pipe.set_adapters("diffusers", 0.8)
    want = _images(pipe, 64)
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="kohya")
    pipe.set_adapters("kohya", 0.8)
    assert np.abs(_images(pipe, 64) - want).max() <= 1e-5


def test_the_artifact_records_the_weight_map_and_base_weights(refittable):
    """Each recorded weight is an external initializer of the engine graph, as is or transposed
    (MatMul weights), and the base weights file holds the model's weights (with the LoRA fused at
    build) in diffusers' layout."""
    import onnx
    from safetensors.torch import load_file

    from runtime import load_pipeline

    folder = refittable("tiny-sd15")
    manifest = json.loads((folder / "manifest.json").read_text())
    unet = manifest["components"]["unet"]["refit"]
    assert unet["module"] == "unet" and unet["weights"] == "refit/unet.safetensors"
    assert "refit/unet.safetensors" in manifest["files"] and "refit" not in manifest["components"]["vae_decoder"]
    layouts = {layout for _, layout in unet["params"].values()}
    assert layouts == {"same", "transpose"}  # convolutions as is, attention projections transposed for MatMul
    graph = onnx.load(str(folder / "unet.onnx"), load_external_data=False).graph
    external = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {name for name, _ in unet["params"].values()} <= external
    weights = dict(_reference("tiny-sd15", load_pipeline(folder)).unet.named_parameters())
    base = load_file(str(folder / unet["weights"]))
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert unet["params"][q][1] == "transpose" and set(base) == set(unet["params"])
    assert all(torch.equal(base[p], weights[p].detach()) for p in base)


def test_a_lora_the_artifact_cannot_refit_is_refused_naming_the_weight(refittable):
    from runtime import load_pipeline

    pipe = load_pipeline(refittable("tiny-sd15"))
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong_shape = {f"{q}.lora_A.weight": torch.ones(2, 7), f"{q}.lora_B.weight": torch.ones(32, 2)}
    with pytest.raises(LoraError, match=r"to_q\.weight \(the LoRA's change is \[32, 7\], the weight \[32, 32\]\)"):
        pipe.load_lora_weights(wrong_shape, adapter_name="wrong")
    elsewhere = {"unet.no_such_block.proj.lora_A.weight": torch.ones(2, 8),
                 "unet.no_such_block.proj.lora_B.weight": torch.ones(8, 2)}
    with pytest.raises(LoraError, match=r"unet\.no_such_block\.proj\.weight \(not a weight this artifact recorded"):
        pipe.load_lora_weights(elsewhere, adapter_name="elsewhere")
    assert pipe.get_list_adapters() == {} and pipe.lora_refit.swaps == 0  # nothing half-applied
    with pytest.raises(NotSupportedError, match="fusing gains nothing"):
        pipe.fuse_lora()


def test_an_artifact_built_without_refit_refuses_loras(digits_artifact):
    from runtime import load_pipeline

    pipe = load_pipeline(digits_artifact)
    for call in (lambda: pipe.load_lora_weights("whatever.safetensors"), lambda: pipe.set_adapters("a")):
        with pytest.raises(NotSupportedError, match="built without --refit refit.*kiln build MODEL --refit refit"):
            call()
