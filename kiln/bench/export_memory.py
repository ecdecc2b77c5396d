"""Peak memory of `kiln export` on a full-size model with random weights: Stable Diffusion 1.5's
architecture (an 860M-parameter UNet, 3.4 GB in fp32; CLIP ViT-L text encoder; SD's VAE), made
offline. The export runs in a child process; its peak resident set (the kernel's ru_maxrss) is
compared with the UNet's fp32 weight bytes.

    python -m kiln.bench.export_memory [--work artifacts/export-memory] [--precision fp16]
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROFILE = """[shapes]
batch  = [1, 1, 1]
height = [256, 256, 256]
width  = [256, 256, 256]
"""


def make_model(folder: Path) -> Path:
    """SD 1.5's architecture with seeded random weights, saved once as fp32 safetensors."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from exporters.builtin import build_tokenizer
    from runtime.files import atomic_folder

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    tokenizer = build_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return folder


def unet_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "unet").glob("*.safetensors"))


def measure(work: Path, precision: str | None = None) -> dict:
    """Export the model in a child process; its peak RSS against the UNet's fp32 bytes."""
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "model")
    profile = work / "profile.toml"
    profile.write_text(PROFILE, encoding="utf-8")
    out = work / f"export-{precision or 'fp32'}"
    cmd = [sys.executable, "-m", "kiln.cli", "export", str(model), "--profile", str(profile), "--out", str(out)]
    if precision:
        cmd += ["--precision", precision]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    weights = unet_bytes(model)
    return {"peak_rss_bytes": peak, "unet_fp32_bytes": weights, "ratio": round(peak / weights, 2),
            "seconds": round(seconds, 1), "precision": precision or "fp32"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("artifacts/export-memory"))
    parser.add_argument("--precision", choices=("fp32", "fp16"), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(args.work, args.precision)
    print(json.dumps(result))
    print(f"export peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB = {result['ratio']}x the UNet's fp32 weights "
          f"({result['unet_fp32_bytes'] / 2**30:.2f} GiB), {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
