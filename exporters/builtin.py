"""Built-in models: Stable Diffusion-shaped pipelines with seeded weights, made offline.

`tiny` is shaped like SD 2.1 (v-prediction, linear-projection and upcast attention, GELU CLIP);
`tiny-sd15` like SD 1.5 (epsilon prediction, conv projection, quick-GELU CLIP); `small` is SD 1.5's
architecture at a fifth of its width (a 35M-parameter UNet with 32-dim attention heads, 256x256
images), big enough for CPU benchmarks to mean something; `tiny-sdxl` and `tiny-sdxl-turbo` are
shaped like SDXL and SDXL Turbo (exporters/builtin_sdxl.py). Each is created
deterministically, saved in diffusers format under the cache folder, and from then on loaded
through the same code path as any local diffusers folder.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from runtime.files import atomic_folder, cache_lock, kiln_cache_dir

log = logging.getLogger(__name__)

# Bump when a recipe changes, so that old caches are not reused.
RECIPE_VERSION = 4

# A randomly initialised UNet is a chaotic denoiser: under DDIM with epsilon prediction a 1e-6
# relative change in one step's output moved final pixels by 7/255 (measured on tiny-sd15), so no
# two correct implementations could be compared. Scaling the output convolution by this factor makes
# the loop contract, as a trained model's does (the same change then moves pixels by 0.002/255).
UNET_OUTPUT_SCALE = 0.1


@dataclass(frozen=True)
class TinyRecipe:
    name: str
    prediction_type: str
    use_linear_projection: bool
    upcast_attention: bool
    hidden_act: str
    scheduler: str
    attention_head_dim: tuple[int, ...] | int
    seed: int
    # widths: SD's topology (four UNet levels, three with cross-attention; four VAE blocks)
    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    unet_layers: int = 1
    sample_size: int = 16  # latent pixels: native image size / 8
    text_hidden: int = 32
    text_intermediate: int = 37
    text_heads: int = 4
    text_layers: int = 3
    vae_channels: tuple[int, ...] = (8, 16, 32, 32)
    vae_layers: int = 1
    vae_groups: int = 8

    def build(self):
        return _build_pipeline(self)


RECIPES = {
    "tiny": TinyRecipe("tiny", "v_prediction", True, True, "gelu", "DDIMScheduler", (2, 2, 4, 4), 0),
    "tiny-sd15": TinyRecipe("tiny-sd15", "epsilon", False, False, "quick_gelu", "PNDMScheduler", (8, 8, 8, 8), 1),
    # SD 1.5 has 8 heads of 40-160 dims; at a fifth of the width 8 heads would be 8 dims wide, which
    # no real model has. `small` keeps 32-dim heads instead (2, 4, 8, 8 heads per level).
    "small": TinyRecipe("small", "epsilon", False, False, "quick_gelu", "DDIMScheduler", (2, 4, 8, 8), 2,
                        unet_channels=(64, 128, 256, 256), unet_layers=2, sample_size=32, text_hidden=256,
                        text_intermediate=1024, text_heads=4, text_layers=4, vae_channels=(32, 64, 128, 128),
                        vae_layers=2, vae_groups=32),
}


def _recipes() -> dict:
    """Every seeded recipe by name: SD-shaped (above) and SDXL-shaped (exporters/builtin_sdxl.py)."""
    from exporters import builtin_sdxl

    return {**RECIPES, **builtin_sdxl.RECIPES}


# Trained built-ins: weights committed in the repository (digits/weights/NAME-vVERSION, fp16
# safetensors), made by `make train-digits` (digits/train.py); the version is the training recipe's.
TRAINED = ("digits", "digits-lcm")


def builtin_names() -> list[str]:
    return sorted([*_recipes(), *TRAINED])


def trained_folder(name: str) -> Path:
    from digits.models import WEIGHTS_VERSION

    return Path(__file__).resolve().parent.parent / "digits" / "weights" / f"{name}-v{WEIGHTS_VERSION}"


def ensure_builtin(name: str) -> Path:
    """Return the diffusers folder of built-in model `name`, creating it on first use (seeded ones)."""
    if name in TRAINED:
        folder = trained_folder(name)
        if not (folder / "model_index.json").is_file():
            from runtime.errors import ModelSourceError

            raise ModelSourceError(f"the trained weights of {name} are not in {folder}; they are committed with kiln, "
                                   "so restore them from git, or retrain with `make train-digits`")
        return folder
    recipe = _recipes()[name]
    folder = kiln_cache_dir() / "builtin" / f"{name}-v{RECIPE_VERSION}"
    if (folder / "model_index.json").is_file():  # made before (atomically): no lock needed to read it
        return folder
    with cache_lock(folder):  # concurrent first uses make it once
        if not (folder / "model_index.json").is_file():
            log.info("creating built-in model %s in %s", name, folder)
            from runtime.quiet import progress_bars_on_terminals_only

            with atomic_folder(folder) as tmp, progress_bars_on_terminals_only():
                recipe.build().save_pretrained(tmp, safe_serialization=True)
    return folder


def _build_pipeline(recipe: TinyRecipe):
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(recipe.seed)
    # SD's topology at a tiny width: three cross-attention levels and a plain one, a cross-attention
    # mid block, three upsamplers (so sizes are multiples of 64, as for the real models).
    unet = UNet2DConditionModel(
        sample_size=recipe.sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=recipe.unet_layers,
        block_out_channels=recipe.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=recipe.text_hidden,
        attention_head_dim=recipe.attention_head_dim,
        use_linear_projection=recipe.use_linear_projection,
        upcast_attention=recipe.upcast_attention,
        norm_num_groups=32,
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(UNET_OUTPUT_SCALE)
        unet.conv_out.bias.mul_(UNET_OUTPUT_SCALE)
    torch.manual_seed(recipe.seed + 1)
    vae = tiny_vae(recipe.vae_channels, recipe.vae_layers, recipe.vae_groups, recipe.sample_size * 8, 0.18215)
    torch.manual_seed(recipe.seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=recipe.text_hidden,
            intermediate_size=recipe.text_intermediate,
            layer_norm_eps=1e-05,
            num_attention_heads=recipe.text_heads,
            num_hidden_layers=recipe.text_layers,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            hidden_act=recipe.hidden_act,
        )
    )
    scheduler_cls = getattr(diffusers, recipe.scheduler)
    scheduler_kwargs = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        prediction_type=recipe.prediction_type,
    )
    if recipe.scheduler == "DDIMScheduler":
        scheduler_kwargs.update(clip_sample=False, set_alpha_to_one=False)
    else:
        scheduler_kwargs.update(skip_prk_steps=True, set_alpha_to_one=False)
    scheduler = scheduler_cls(**scheduler_kwargs)
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_vae(channels, layers: int, groups: int, sample_size: int, scaling_factor: float, **config):
    """A small AutoencoderKL with four blocks, as in SD, so that latents are 1/8 of the image size
    (built from the current torch seed)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=tuple(channels),
                         layers_per_block=layers, latent_channels=4, norm_num_groups=groups, sample_size=sample_size,
                         scaling_factor=scaling_factor, **config)


def build_tokenizer(pad_token: str = "<|endoftext|>"):
    """A byte-level CLIP BPE tokenizer: the 512 byte symbols, no merges, capped at 77 tokens."""
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte to printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))
