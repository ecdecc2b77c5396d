"""`python -m digits.train` (`make train-digits`): trains `digits` on this machine, then distills
`digits-lcm` from it, and writes both as diffusers folders with fp16 safetensors.

Stages, each seeded and saved under --work so that a later stage can be rerun alone:
  vae    AutoencoderKL on the 64x64 digits (MSE + a small KL), scaling factor from its latents
  text   the CLIP text encoder, taught to tell the prompts' digits apart (a linear head on every
         position from the end-of-text token on, an empty prompt being an eleventh class), then frozen
  unet   epsilon prediction on the frozen VAE's latents, 10% empty prompts for classifier-free guidance,
         EMA weights; prompt accuracy measured every --eval-every steps
  lcm    guidance-conditioned consistency distillation (lcm.py)
  save   picks the scheduler with the best accuracy at 20 steps, writes the two folders
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

from digits import data, metric, models
from digits.tokenizer import build_tokenizer

log = logging.getLogger("digits.train")
EMPTY = 10  # the text encoder's class of the empty prompt


def seeded(seed: int):
    import numpy as np
    import torch

    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def train_vae(work: Path, steps: int, batch: int = 32, seed: int = 0):
    import torch

    rng = seeded(seed)
    images = data.upscale(data.load().train_images)
    vae = models.vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start = time.monotonic()
    for step in range(1, steps + 1):
        x = images[rng.integers(0, len(images), batch)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).pow(2).mean() + 1e-5 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay to a tenth
            group["lr"] = 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        if step % 100 == 0 or step == steps:
            log.info("vae %d/%d: loss %.5f (%.0f s)", step, steps, loss.item(), time.monotonic() - start)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        vae.register_to_config(scaling_factor=float(1.0 / means.std()))
        held = data.upscale(data.load().holdout_images)
        recon = vae.decode(vae.encode(held).latent_dist.mean).sample
    accuracy = float((metric.classify(recon) == data.load().holdout_labels).mean())
    log.info("vae: scaling factor %.4f, classifier accuracy on held-out reconstructions %.3f",
             vae.config.scaling_factor, accuracy)
    vae.save_pretrained(work / "vae")
    return vae


def prompt_batch(tokenizer, prompts):
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_text(work: Path, steps: int = 400, seed: int = 0):
    import torch

    seeded(seed)
    tokenizer = build_tokenizer()
    encoder = models.text_encoder(tokenizer)
    texts = [p for p, _ in data.all_prompts()] + [""]
    labels = torch.tensor([d for _, d in data.all_prompts()] + [EMPTY])
    ids = prompt_batch(tokenizer, texts)
    first_eos = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    positions = torch.arange(ids.shape[1])[None] >= first_eos[:, None]  # the positions that have read the whole prompt
    head = torch.nn.Linear(models.TEXT_HIDDEN, EMPTY + 1)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(steps):
        hidden = encoder(ids).last_hidden_state
        logits = head(hidden[positions])
        loss = torch.nn.functional.cross_entropy(logits, labels[:, None].expand_as(positions)[positions])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    accuracy = float((logits.argmax(-1) == labels[:, None].expand_as(positions)[positions]).float().mean())
    log.info("text encoder: loss %.4f, per-position accuracy %.3f", loss.item(), accuracy)
    encoder.eval()
    encoder.save_pretrained(work / "text_encoder")
    tokenizer.save_pretrained(work / "tokenizer")
    return encoder, tokenizer


def load_stage(work: Path, name: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    loaders = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "unet_lcm": UNet2DConditionModel,
               "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer}
    if not (work / name).is_dir():
        raise SystemExit(f"stage {name!r} has not been trained in {work}: run it first (--stage)")
    model = loaders[name].from_pretrained(work / name)
    return model.eval() if hasattr(model, "eval") else model


class Conditioning:
    """The frozen text encoder's outputs for every training prompt and the empty one."""

    def __init__(self, encoder, tokenizer):
        import torch

        pairs = data.all_prompts()
        with torch.no_grad():
            self.prompts = encoder(prompt_batch(tokenizer, [p for p, _ in pairs])).last_hidden_state
            self.empty = encoder(prompt_batch(tokenizer, [""])).last_hidden_state[0]
        self.digit_of = torch.tensor([d for _, d in pairs])

    def sample(self, labels, rng, drop: float):
        """Embeddings for a batch of digit labels: a random prompt form each, `drop` of them empty."""
        import torch

        form = torch.from_numpy(rng.integers(0, 2, len(labels)))
        embeds = self.prompts[form * 10 + labels].clone()
        empty = torch.from_numpy(rng.random(len(labels)) < drop)
        embeds[empty] = self.empty
        return embeds


def latents_of(vae, images):
    import torch

    with torch.no_grad():
        dists = [vae.encode(images[i:i + 256]).latent_dist for i in range(0, len(images), 256)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def ema_update(ema, model, decay: float):
    import torch

    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def train_unet(work: Path, steps: int, minutes: float, batch: int = 128, eval_every: int = 500, seed: int = 0):
    import copy

    import torch
    from diffusers import DDPMScheduler

    rng = seeded(seed)
    vae, encoder, tokenizer = load_stage(work, "vae"), load_stage(work, "text_encoder"), load_stage(work, "tokenizer")
    cond = Conditioning(encoder, tokenizer)
    digits = data.load()
    mean, std = latents_of(vae, data.upscale(digits.train_images))
    labels_all = torch.from_numpy(digits.train_labels)
    schedule = DDPMScheduler(**models.SCHEDULE)
    unet = models.unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=6e-4, weight_decay=1e-2)
    sf = vae.config.scaling_factor
    start, deadline = time.monotonic(), time.monotonic() + minutes * 60
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(mean), batch))
        latents = (mean[idx] + std[idx] * torch.randn_like(std[idx])) * sf
        noise = torch.randn_like(latents)
        t = torch.randint(0, schedule.config.num_train_timesteps, (batch,))
        pred = unet(schedule.add_noise(latents, noise, t), t, cond.sample(labels_all[idx], rng, 0.1)).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        lr = 6e-4 * min(1.0, step / 200) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ema_update(ema, unet, 0.999 if step > 1000 else 0.99)
        out_of_time = time.monotonic() > deadline
        if step % 100 == 0:
            log.info("unet %d/%d: loss %.4f lr %.2e (%.0f s)", step, steps, loss.item(), lr, time.monotonic() - start)
        if step % eval_every == 0 or step == steps or out_of_time:
            q = evaluate(sd_pipeline(vae, encoder, tokenizer, ema, "DDIMScheduler"), steps=20, seeds=(100, 101))
            log.info("unet %d: DDIM 20 steps, guidance 7.5: accuracy %.3f, Fréchet %.2f", step, q["accuracy"], q["frechet"])
            ema.save_pretrained(work / "unet")
        if out_of_time:
            log.info("unet: time budget of %.0f minutes reached at step %d", minutes, step)
            break
    return ema


def sd_pipeline(vae, encoder, tokenizer, unet, scheduler: str):
    import diffusers
    from diffusers import StableDiffusionPipeline

    sched = getattr(diffusers, scheduler).from_config(scheduler_kwargs(scheduler))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Stable Diffusion's scheduler configs carry these whatever the class, so that any scheduler made
# from them (X.from_config(pipe.scheduler.config)) treats the latents as SD's: DDIM without clipping
# x0 to [-1, 1] (its default would ruin latents), PNDM without its Runge-Kutta warm-up.
SD_SCHEDULER_KEYS = dict(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)


def scheduler_kwargs(name: str) -> dict:
    """The config of scheduler class `name` for these models (SD's schedule and keys)."""
    extra = {"DPMSolverMultistepScheduler": dict(use_karras_sigmas=True), "LCMScheduler": dict(original_inference_steps=50)}
    return {**models.SCHEDULE, **SD_SCHEDULER_KEYS, **extra.get(name, {})}


def evaluate(pipe, steps: int, seeds=(100,), guidance: float = 7.5) -> dict:
    """The judge's figures over both prompt forms of every digit at each seed (exporters/judges.py)."""
    from exporters.judges import judged_images

    return judged_images(pipe, metric.JUDGE, seeds, 40, num_inference_steps=steps, guidance_scale=guidance)


def save(work: Path, out: Path, seeds=(200, 201, 202, 203)) -> dict:
    from diffusers import LatentConsistencyModelPipeline

    vae, encoder, tokenizer = load_stage(work, "vae"), load_stage(work, "text_encoder"), load_stage(work, "tokenizer")
    unet = load_stage(work, "unet")
    sweep = {}
    for name in ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                 "UniPCMultistepScheduler"):
        sweep[name] = evaluate(sd_pipeline(vae, encoder, tokenizer, unet, name), steps=20, seeds=seeds)
        log.info("save: %s at 20 steps: %s", name, sweep[name])
    best = max(sweep, key=lambda n: (sweep[n]["accuracy"], -sweep[n]["frechet"]))
    log.info("save: the saved scheduler is %s", best)
    written = {}
    pipe = sd_pipeline(vae, encoder, tokenizer, unet, best)
    written["digits"] = _write(pipe, out / f"digits-v{models.WEIGHTS_VERSION}")
    if (work / "unet_lcm").is_dir():
        import diffusers

        lcm = LatentConsistencyModelPipeline(
            vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=load_stage(work, "unet_lcm"),
            scheduler=diffusers.LCMScheduler.from_config(scheduler_kwargs("LCMScheduler")), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        written["digits-lcm"] = _write(lcm, out / f"digits-lcm-v{models.WEIGHTS_VERSION}")
    (work / "save.json").write_text(json.dumps({"schedulers_20_steps": sweep, "saved": best}, indent=2))
    return written


def _write(pipe, folder: Path) -> int:
    """fp16 safetensors (loaded back as fp32); returns the bytes written."""
    import shutil

    import torch

    from runtime.quiet import quiet

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet("diffusers", "transformers"):  # the keep-in-fp32 notice (nothing is) and the shard bar
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.to(torch.float16)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.to(torch.float32)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    log.info("wrote %s (%.2f MB)", folder, size / 1e6)
    return size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m digits.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("all", "vae", "text", "unet", "lcm", "save"), default="all")
    parser.add_argument("--work", type=Path, default=Path("artifacts/digits-train"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    # the committed weights: these defaults (a time budget that runs out first stops early, at a step
    # that depends on the machine's speed: then the run is no longer reproducible bit for bit)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--unet-minutes", type=float, default=55)
    parser.add_argument("--lcm-steps", type=int, default=3000)
    parser.add_argument("--lcm-minutes", type=float, default=55)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import diffusers  # noqa: F401  (imported before quiet(): its first import resets the loggers' levels)
    import torch

    from runtime.quiet import progress_bars_on_terminals_only, quiet

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ("vae", "text", "unet", "lcm", "save") if args.stage == "all" else (args.stage,)
    with quiet("diffusers", "transformers"), progress_bars_on_terminals_only():  # kiln's log lines are the progress
        for stage in stages:
            if stage == "vae":
                train_vae(args.work, args.vae_steps)
            elif stage == "text":
                train_text(args.work)
            elif stage == "unet":
                train_unet(args.work, args.unet_steps, args.unet_minutes)
            elif stage == "lcm":
                from digits.lcm import distill

                distill(args.work, args.lcm_steps, args.lcm_minutes)
            else:
                save(args.work, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
