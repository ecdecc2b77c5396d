"""Built-in SDXL-shaped models with seeded weights, made offline: `tiny-sdxl` (SDXL base: Euler,
guidance on) and `tiny-sdxl-turbo` (SDXL Turbo: Euler ancestral with trailing timesteps, 1-4
steps, guidance 0). SDXL's topology at a tiny width: three UNet levels (the first without
attention), transformer depth growing with the level, added conditions from the pooled text
embedding of a second, projecting CLIP text encoder and six time ids; an fp16-unsafe VAE
(`force_upcast`) with SDXL's scaling factor; two tokenizers that differ in their pad token."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinyXLRecipe:
    name: str
    scheduler: str  # "euler" (SDXL base) | "euler-a-trailing" (SDXL Turbo)
    seed: int
    unet_channels: tuple[int, ...] = (32, 64, 64)
    transformer_layers: tuple[int, ...] = (0, 1, 2)  # per level; 0: a plain ResNet level, as SDXL's first
    attention_head_dim: tuple[int, ...] = (2, 4, 4)
    sample_size: int = 16  # latent pixels: native image size / 8
    text_hidden: tuple[int, int] = (32, 48)  # text_encoder, text_encoder_2 (the UNet sees their concatenation)
    text_projection: int = 40  # text_encoder_2's pooled projection: the UNet's text_embeds
    time_embed: int = 8  # addition_time_embed_dim: each of the six time ids is embedded this wide

    def build(self):
        return build_xl_pipeline(self)


RECIPES = {
    "tiny-sdxl": TinyXLRecipe("tiny-sdxl", "euler", 10),
    "tiny-sdxl-turbo": TinyXLRecipe("tiny-sdxl-turbo", "euler-a-trailing", 11),
}


def build_xl_pipeline(recipe: TinyXLRecipe):
    import torch
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from exporters.builtin import UNET_OUTPUT_SCALE, build_tokenizer, tiny_vae

    torch.manual_seed(recipe.seed)
    unet = UNet2DConditionModel(
        sample_size=recipe.sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=recipe.unet_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if n else "DownBlock2D" for n in recipe.transformer_layers),
        up_block_types=tuple("CrossAttnUpBlock2D" if n else "UpBlock2D" for n in reversed(recipe.transformer_layers)),
        transformer_layers_per_block=tuple(max(n, 1) for n in recipe.transformer_layers),
        attention_head_dim=recipe.attention_head_dim,
        cross_attention_dim=sum(recipe.text_hidden),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=recipe.time_embed,
        projection_class_embeddings_input_dim=6 * recipe.time_embed + recipe.text_projection,
        norm_num_groups=32,
    )
    with torch.no_grad():  # a contracting loop, as a trained model's (see exporters/builtin.py)
        unet.conv_out.weight.mul_(UNET_OUTPUT_SCALE)
        unet.conv_out.bias.mul_(UNET_OUTPUT_SCALE)
    torch.manual_seed(recipe.seed + 1)
    vae = tiny_vae((8, 16, 32, 32), 1, 8, recipe.sample_size * 8, 0.13025, force_upcast=True)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")
    encoders = []
    for i, (cls, hidden) in enumerate(zip((CLIPTextModel, CLIPTextModelWithProjection), recipe.text_hidden)):
        torch.manual_seed(recipe.seed + 2 + i)
        extra = {"projection_dim": recipe.text_projection} if i else {}
        encoders.append(cls(CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if i == 0 else tokenizer_2.pad_token_id,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            hidden_act="gelu",
            **extra,
        )))
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, prediction_type="epsilon")
    if recipe.scheduler == "euler":
        scheduler = EulerDiscreteScheduler(**common, timestep_spacing="leading", interpolation_type="linear")
    else:
        scheduler = EulerAncestralDiscreteScheduler(**common, timestep_spacing="trailing")
    for module in (unet, vae, *encoders):
        module.eval()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
