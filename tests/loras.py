"""Seeded random LoRAs in diffusers' format, made offline for the built-in tiny models: peft
adapters on the UNet's attention projections and the text encoders', saved with the pipeline
class's own save_lora_weights (what load_lora_weights reads back)."""
from __future__ import annotations

from pathlib import Path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(model_folder: Path, out: Path, seed: int, rank: int = 4, strength: float = 2.0) -> Path:
    """A random LoRA for the pipeline in `model_folder` (its UNet and every text encoder), written
    to `out`/pytorch_lora_weights.safetensors. `strength` scales the B matrices: how far the LoRA
    moves the model."""
    import diffusers
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from exporters.dims import read_json

    cls = getattr(diffusers, read_json(Path(model_folder) / "model_index.json")["_class_name"])
    pipe = cls.from_pretrained(model_folder)
    torch.manual_seed(seed)
    layers = {}
    for attr, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets)
        inject_adapter_in_model(config, module, adapter_name="default")
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.mul_(strength)
        state = get_peft_model_state_dict(module)
        layers[f"{attr}_lora_layers"] = convert_state_dict_to_diffusers(state) if attr == "unet" else state
    out = Path(out)
    cls.save_lora_weights(out, **layers)
    return out / "pytorch_lora_weights.safetensors"
