"""The architecture of `digits` and `digits-lcm`: Stable Diffusion 1.5's components at a width that
trains on two CPU cores. A factor-8 AutoencoderKL (64x64 images, 8x8x4 latents), a CLIP text
encoder over the word-level tokenizer, and an epsilon-prediction UNet2DConditionModel with
cross-attention at its two upper levels (three levels: on 8x8 latents a fourth would be 1x1)."""
from __future__ import annotations

from digits.data import IMAGE_SIZE
from digits.tokenizer import MAX_TOKENS

WEIGHTS_VERSION = 1  # in the built-ins' folder names (digits/weights/digits-v1): bump when the recipe changes
TEXT_HIDDEN = 64
GUIDANCE_EMBED_DIM = 64  # LCM's w embedding (time_cond_proj_dim)
UNET_CHANNELS = (32, 64, 64)
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, prediction_type="epsilon")


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE)


def text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", layer_norm_eps=1e-5))


def unet(time_cond_proj_dim: int | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=16,
        time_cond_proj_dim=time_cond_proj_dim)


def lcm_unet(teacher):
    """The student: the teacher's weights plus the guidance projection (time_embedding.cond_proj,
    randomly initialised, as in diffusers' LCM distillation script: zero-initialised, it stayed near
    zero and the student ignored w)."""
    student = unet(GUIDANCE_EMBED_DIM)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_embedding.cond_proj") for k in missing), (missing, unexpected)
    return student
