"""Seeded random ControlNets for the built-in tiny models, made offline: diffusers' own
ControlNetModel.from_unet (the UNet's encoder copied, as ControlNet training starts), with the
zero-initialised convolutions (the conditioning embedding's last, every residual's) given seeded
weights so that the ControlNet moves the images; saved with save_pretrained."""
from __future__ import annotations

from pathlib import Path

ZERO_CONVS = ("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid_block")


def make_controlnet(model_folder: Path, out: Path, seed: int, strength: float = 0.5) -> Path:
    """A ControlNet for the pipeline in `model_folder`, saved to `out` (a ControlNetModel folder).
    `strength`: the std of the zero convolutions' seeded weights (how far the ControlNet moves the UNet)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(ZERO_CONVS):
                p.copy_(torch.randn(p.shape, generator=generator) * strength)
    controlnet.save_pretrained(out)
    return Path(out)
