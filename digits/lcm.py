"""Guidance-conditioned latent consistency distillation (Luo et al. 2023, "Latent Consistency
Models", Algorithm 1), from the trained `digits` UNet (the teacher) into `digits-lcm`.

Each step: latents at a skipping-step DDIM timestep t_{n+k} of a 50-step schedule (k = 20 training
timesteps), a guidance w drawn from [W_MIN, W_MAX] and embedded as the student's `timestep_cond`;
the teacher, with classifier-free guidance at scale w + 1, takes one DDIM step to t_n; the student's
consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) at t_{n+k} is pulled towards an EMA
target's at t_n (pseudo-Huber loss). The boundary conditions c_skip, c_out are LCMScheduler's
(sigma_data 0.5, timestep scaling 10), and the w embedding is LatentConsistencyModelPipeline's
(it embeds guidance_scale - 1), so that diffusers' own pipeline samples the result."""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

from digits import data, models

log = logging.getLogger("digits.train")
W_MIN, W_MAX = 2.0, 9.0  # teacher guidance 3..10: kiln's default 7.5 and diffusers' LCM default 8.5 inside
DDIM_STEPS = 50
HUBER_C = 0.001
TARGET_EMA = 0.95
LR = 2e-4
GUIDANCE_LR_SCALE = 5.0


def guidance_embedding(w, dim: int):
    """LatentConsistencyModelPipeline.get_guidance_scale_embedding, for a batch of w."""
    import torch

    w = w * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def boundary(t, sigma_data: float = 0.5, scaling: float = 10.0):
    scaled = t.float() * scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def distill(work: Path, steps: int, minutes: float, batch: int = 64, eval_every: int = 250, seed: int = 0):
    import torch
    from diffusers import DDPMScheduler

    from digits.train import Conditioning, ema_update, evaluate, latents_of, load_stage, seeded

    rng = seeded(seed)
    vae, encoder, tokenizer = load_stage(work, "vae"), load_stage(work, "text_encoder"), load_stage(work, "tokenizer")
    teacher = load_stage(work, "unet").requires_grad_(False)
    cond = Conditioning(encoder, tokenizer)
    digits = data.load()
    mean, std = latents_of(vae, data.upscale(digits.train_images))
    labels_all = torch.from_numpy(digits.train_labels)
    schedule = DDPMScheduler(**models.SCHEDULE)
    alphas = schedule.alphas_cumprod
    k = schedule.config.num_train_timesteps // DDIM_STEPS
    ddim_t = torch.arange(1, DDIM_STEPS + 1) * k - 1  # 19, 39, ..., 999
    student = models.lcm_unet(teacher).train()
    target = copy.deepcopy(student).requires_grad_(False)
    # the guidance pathway (the new projection and the time embedding it feeds) learns at GUIDANCE_LR_SCALE x
    guided = [p for n, p in student.named_parameters() if n.startswith("time_embedding.")]
    rest = [p for n, p in student.named_parameters() if not n.startswith("time_embedding.")]
    opt = torch.optim.AdamW([{"params": rest, "scale": 1.0}, {"params": guided, "scale": GUIDANCE_LR_SCALE}],
                            lr=LR, weight_decay=0.0)
    sf = vae.config.scaling_factor
    start, deadline = time.monotonic(), time.monotonic() + minutes * 60

    def x0_of(eps, x, t):
        a = alphas[t][:, None, None, None]
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(mean), batch))
        latents = (mean[idx] + std[idx] * torch.randn_like(std[idx])) * sf
        n = torch.from_numpy(rng.integers(0, DDIM_STEPS, batch))
        t_start, t_prev = ddim_t[n], (ddim_t[n] - k).clamp(min=0)
        noisy = schedule.add_noise(latents, torch.randn_like(latents), t_start)
        w = W_MIN + (W_MAX - W_MIN) * torch.from_numpy(rng.random(batch)).float()
        w_emb = guidance_embedding(w, models.GUIDANCE_EMBED_DIM)
        text = cond.sample(labels_all[idx], rng, 0.0)
        skip_s, out_s = boundary(t_start)
        eps = student(noisy, t_start, text, timestep_cond=w_emb).sample
        prediction = skip_s * noisy + out_s * x0_of(eps, noisy, t_start)
        with torch.no_grad():
            both = teacher(torch.cat([noisy, noisy]), torch.cat([t_start, t_start]),
                           torch.cat([text, cond.empty.expand_as(text)])).sample
            eps_c, eps_u = both.chunk(2)
            ww = w[:, None, None, None]
            x0_c, x0_u = x0_of(eps_c, noisy, t_start), x0_of(eps_u, noisy, t_start)
            x0_t, eps_t = x0_c + ww * (x0_c - x0_u), eps_c + ww * (eps_c - eps_u)
            a_prev = torch.where(n > 0, alphas[t_prev], alphas[0])[:, None, None, None]
            x_prev = a_prev.sqrt() * x0_t + (1 - a_prev).sqrt() * eps_t  # one DDIM step of the guided teacher
            skip_t, out_t = boundary(t_prev)
            eps_target = target(x_prev, t_prev, text, timestep_cond=w_emb).sample
            goal = skip_t * x_prev + out_t * x0_of(eps_target, x_prev, t_prev)
        loss = (((prediction - goal) ** 2 + HUBER_C**2).sqrt() - HUBER_C).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = LR * group["scale"] * min(1.0, step / 100)
        opt.step()
        ema_update(target, student, TARGET_EMA)
        out_of_time = time.monotonic() > deadline
        if step % 50 == 0:
            log.info("lcm %d/%d: loss %.5f (%.0f s)", step, steps, loss.item(), time.monotonic() - start)
        if step % eval_every == 0 or step == steps or out_of_time:
            student.eval()
            pipe = lcm_pipeline(vae, encoder, tokenizer, student)
            q = evaluate(pipe, steps=4, seeds=(100, 101))
            response = guidance_response(pipe)
            student.train()
            log.info("lcm %d: 4 LCM steps: accuracy %.3f, Fréchet %.2f; guidance 3 vs 10 moves pixels by %.3f "
                     "(mean |diff|)", step, q["accuracy"], q["frechet"], response)
            student.save_pretrained(work / "unet_lcm")
        if out_of_time:
            log.info("lcm: time budget of %.0f minutes reached at step %d", minutes, step)
            break
    return student


def guidance_response(pipe) -> float:
    """How much the student's images move between guidance 3 and 10 (the teacher's move about 0.05)."""
    import torch

    from digits.data import all_prompts

    prompts = [p for p, _ in all_prompts()]
    images = [pipe(prompts, num_inference_steps=4, guidance_scale=g, output_type="np",
                   generator=[torch.Generator().manual_seed(7 + i) for i in range(len(prompts))]).images for g in (3, 10)]
    return float(abs(images[0] - images[1]).mean())


def lcm_pipeline(vae, encoder, tokenizer, unet):
    import diffusers
    from diffusers import LatentConsistencyModelPipeline

    from digits.train import scheduler_kwargs

    pipe = LatentConsistencyModelPipeline(
        vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.LCMScheduler.from_config(scheduler_kwargs("LCMScheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
