"""`kiln generate`, `kiln bench`, `kiln serve` and `kiln loadtest`: running what was built."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import click

from kiln.params import ByteSize, CommaList, NamedLoraParam
from kiln.text import plural
from runtime.errors import format_table


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--negative-prompt", default=None)
@click.option("--steps", default=None, type=click.IntRange(1, 1000), help="Default: the model family's (SD: 20, LCM: 4).")
@click.option("--guidance", "guidance_scale", default=None, type=click.FloatRange(0, 30),
              help="Classifier-free guidance, 0..30 (1 or less: none); for an LCM, the strength its UNet embeds. "
                   "Default: the model family's (SD: 7.5, LCM: 8.5).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--height", default=None, type=click.IntRange(min=1), help="Pixels; default: the model's native size.")
@click.option("--width", default=None, type=click.IntRange(min=1), help="Pixels; default: the model's native size.")
@click.option("--num-images", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--scheduler", default=None,
              help="ddim, pndm, euler, euler-a, dpm++2m, dpm++2m-karras, unipc, lms, lcm (LCMs run only lcm), "
                   "or a diffusers class name.")
@click.option("--init-image", type=click.Path(exists=True, dir_okay=False), help="Image for img2img (sets the size).")
@click.option("--strength", default=None, type=float,
              help="img2img: how much of the init image is replaced by noise, 0 < strength <= 1 (default 0.75).")
@click.option("--control-image", "control_images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="ControlNet artifacts: the conditioning image (e.g. canny edges), one per ControlNet in build order.")
@click.option("--control-scale", default=1.0, show_default=True, type=click.FloatRange(0, 10),
              help="ControlNet conditioning scale (every ControlNet).")
@click.option("--vae-tiling", is_flag=True,
              help="Decode in overlapping tiles (diffusers' enable_vae_tiling): sizes above the VAE engines' range run.")
@click.option("--truncate-prompts", is_flag=True, help="Cut prompts over the text encoder's 77 tokens instead of refusing.")
@click.option("--no-cuda-graphs", is_flag=True, help="TensorRT: enqueue every step instead of replaying CUDA graphs.")
@click.option("--weight-streaming-budget", default=None, type=ByteSize(keywords=("auto",)),
              help="TensorRT: bytes of weights kept on the GPU per engine (e.g. 2e9 or 2GiB), or 'auto'.")
@click.option("-o", "--output", default="out.png", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def generate(folder: Path, prompt: str, negative_prompt, steps, guidance_scale, seed, height, width, num_images,
             scheduler, init_image, strength, control_images, control_scale, vae_tiling, truncate_prompts, no_cuda_graphs,
             weight_streaming_budget, output: Path, as_json: bool):
    """Generate an image from PROMPT with the engines in FOLDER."""
    import math

    import torch

    from runtime import families, load_pipeline
    from runtime.batcher import check_prompt_length
    from runtime.families.sd import image_size
    from runtime.manifest import load_manifest
    from runtime.schedulers import scheduler_from_name

    if guidance_scale is not None and math.isnan(guidance_scale):
        raise click.BadParameter("NaN is not a guidance scale; use 0..30", param_hint="--guidance")
    image = _check_generate(prompt, init_image, strength, height, width, output)  # every user mistake, before any work
    manifest = load_manifest(folder)
    family = families.get(manifest.family)
    defaults = families.request_defaults(manifest)
    if negative_prompt and not family.negative_prompt:
        raise click.BadParameter(f"this model ({manifest.family}) takes no negative prompt: its guidance is an "
                                 "embedding of --guidance, with no unconditional pass; leave it out",
                                 param_hint="--negative-prompt")
    steps = defaults["steps"] if steps is None else steps
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    if image is not None:
        strength = 0.75 if strength is None else strength
        image_size(image, manifest)  # sides that are not a multiple: refused before the engines load
        if int(steps * strength) < 1:
            raise click.BadParameter(f"{strength} with {plural(steps, 'step')} runs no denoising step: steps x strength "
                                     "must reach 1; raise --strength or --steps", param_hint="--strength")
    started = time.perf_counter()
    controls = _control_images(control_images, manifest)
    task = ("controlnet_img2img" if init_image else "controlnet") if controls else ("img2img" if init_image else "text2img")
    pipe = load_pipeline(folder, task=task, cuda_graphs=not no_cuda_graphs, weight_streaming_budget=weight_streaming_budget,
                         controlnets=list(range(len(controls))) if controls else None)
    if vae_tiling:
        pipe.enable_vae_tiling()
    if not truncate_prompts:  # as the HTTP service: a prompt the text encoder would cut is refused, not cut
        check_prompt_length(pipe.tokenizer, prompt, "PROMPT")
        check_prompt_length(pipe.tokenizer, negative_prompt, "--negative-prompt")
    if scheduler:
        pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config, family.schedulers)
    args = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                num_images_per_prompt=num_images, generator=torch.Generator("cpu").manual_seed(seed))
    if image is not None:
        args.update(image=image, strength=strength)
    else:
        args.update(height=height, width=width)
    if controls:
        control = controls if len(controls) > 1 else controls[0]
        args.update({"control_image" if image is not None else "image": control,
                     "controlnet_conditioning_scale": [control_scale] * len(controls) if len(controls) > 1 else control_scale})
    from runtime.quiet import quiet

    with contextlib.redirect_stdout(sys.stderr), quiet("diffusers", "transformers"):
        images = pipe(**args).images
    paths = []
    for i, result in enumerate(images):
        path = output if len(images) == 1 else output.with_name(f"{output.stem}-{i}{output.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
        paths.append(path)
    seconds = time.perf_counter() - started
    scheduler_name = scheduler or type(pipe.scheduler).__name__
    if as_json:
        click.echo(json.dumps({"images": [str(p) for p in paths], "size": list(images[0].size), "steps": steps,
                               "seed": seed, "scheduler": scheduler_name, "scheduler_class": type(pipe.scheduler).__name__,
                               "seconds": round(seconds, 3)}))
    else:
        w, h = images[0].size
        click.echo(f"wrote {', '.join(map(str, paths))} ({w}x{h}, {plural(steps, 'step')}, {scheduler_name}, "
                   f"{seconds:.1f} s)")


def _control_images(paths, manifest) -> list:
    """The --control-image files, opened as RGB, after checking the artifact has that many ControlNets."""
    from PIL import Image, UnidentifiedImageError

    from runtime.controlnet_names import controlnets_in

    if not paths:
        return []
    available = controlnets_in(manifest.components)
    if len(paths) > len(available):
        raise click.BadParameter(f"{len(paths)} control images, but this artifact has {len(available)} ControlNet(s)"
                                 f"{': ' + ', '.join(available) if available else ' (build with --controlnet)'}",
                                 param_hint="--control-image")
    try:
        return [Image.open(p).convert("RGB") for p in paths]
    except (UnidentifiedImageError, OSError) as exc:
        raise click.BadParameter(f"cannot read the control image: {exc}", param_hint="--control-image") from exc


def _check_generate(prompt: str, init_image, strength, height, width, output: Path):
    """The init image (opened), after refusing what `kiln generate` would otherwise find out late,
    or silently ignore."""
    from PIL import Image, UnidentifiedImageError

    if not prompt.strip():
        raise click.BadParameter("the prompt is empty; say what the image should show", param_hint="PROMPT")
    Image.init()
    writable = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.SAVE}
    if output.suffix.lower() not in writable:
        raise click.BadParameter(f"{output.name} has no image file extension PIL can write (.png, .jpg, .webp, ...)",
                                 param_hint="-o/--output")
    blocked = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise click.BadParameter(f"{blocked} is a file, so {output} cannot be written; choose another path",
                                 param_hint="-o/--output")
    if init_image is None:
        if strength is not None:
            raise click.UsageError("--strength applies to img2img: pass --init-image FILE with it")
        return None
    if height is not None or width is not None:
        raise click.UsageError("with --init-image the image sets the size; leave out --height/--width (resize the "
                               "image to change it)")
    if strength is not None and not 0 < strength <= 1:
        raise click.BadParameter(f"{strength} is outside 0 < strength <= 1: strength is how much of the init image is "
                                 "replaced by noise (1 keeps nothing of it; near 0 changes almost nothing, and 0 would "
                                 "run no step at all)", param_hint="--strength")
    try:
        with Image.open(init_image) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise click.BadParameter(f"{init_image} is not an image PIL can read ({exc})", param_hint="--init-image") from exc


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Choice(["torch", "torch-compile", "none"]), default="torch", show_default=True,
              help="diffusers' PyTorch pipeline on the same weights, eager or with torch.compile on the UNet.")
@click.option("--batch", "batches", default=None, type=CommaList(click.IntRange(min=1)),
              help="Batch sizes, comma-separated (e.g. 1,2,4; default 1); with --unet-step the UNet's own batch "
                   "(default 2: one image under guidance).")
@click.option("--steps", default=None, type=click.IntRange(1, 1000),
              help="Default: what the artifact recommends, else its family's (SD: 20, LCM: 4, SDXL Turbo: 1).")
@click.option("--runs", default=None, type=click.IntRange(1, 1000),
              help="Timed runs per pipeline and batch (default 3; 30 with --unet-step).")
@click.option("--height", default=None, type=int, help="Pixels; default: the profile's opt.")
@click.option("--width", default=None, type=int, help="Pixels; default: the profile's opt.")
@click.option("--schedulers", "sweep", is_flag=True,
              help="Instead: DDIM, Euler a, DPM++ 2M Karras, UniPC (and LCM where the model has it) at several step "
                   "counts, time against quality: the model's judge (digit accuracy and Fréchet distance for digits "
                   "models), else PSNR from a 50-step DDIM image.")
@click.option("--step-counts", default=None, type=CommaList(click.IntRange(min=1)),
              help="--schedulers: step counts (default 1,2,4,8,20,50 for a judged model, else 5,10,20,30).")
@click.option("--journey", "journey", type=click.Path(path_type=Path), default=None, metavar="LCM_DIR",
              help="Instead: the speed journey, diffusers' PyTorch DDIM 50 steps → kiln DDIM 50 → DPM++ 20 → "
                   "the LCM artifact LCM_DIR at 4 and 1 steps, side by side, with the judge's accuracy.")
@click.option("--reference-steps", default=50, show_default=True, type=click.IntRange(1, 1000),
              help="--schedulers: DDIM steps of the reference image.")
@click.option("--unet-step", "unet_step", is_flag=True,
              help="Instead: one UNet step of each FOLDER's engine (e.g. fp32, fp16, int8 builds), alternating.")
@click.option("--lora", "lora", default=None, metavar="FILE_OR_HUB_ID",
              help="Time swapping this LoRA into a refittable artifact, beside a rebuild and a pipeline call.")
@click.option("--vae-tiling", "vae_tiling", is_flag=True,
              help="Instead: peak memory of a VAE decode at the decoder's max size, untiled, against tiled at twice its "
                   "side (with --batch N > 1: also sliced), each in a fresh process.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG plot (needs matplotlib).")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON report to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(folders, baseline, batches, steps, runs, height, width, sweep, step_counts, journey, reference_steps, unet_step,
          lora, vae_tiling, plot, save, as_json):
    """Benchmark the engines in FOLDERS: against PyTorch per stage (one folder), the scheduler sweep,
    or one UNet step of several artifacts side by side (--unet-step)."""
    from kiln.bench import report as fmt
    from kiln.bench.run import BenchOptions, run_bench
    from kiln.bench.sweep import scheduler_sweep
    from kiln.bench.unet_step import unet_step_bench

    if sum(map(bool, (sweep, unet_step, journey, lora, vae_tiling))) > 1:
        raise click.UsageError("--schedulers, --journey, --unet-step, --lora and --vae-tiling are different benchmarks; "
                               "pick one")
    if len(folders) > 1 and not unet_step:
        raise click.UsageError("several FOLDERS are compared only with --unet-step")
    if plot and (unet_step or lora or vae_tiling):
        raise click.UsageError("--plot draws the stage benchmark and the scheduler sweep, not --unet-step, --lora or "
                               "--vae-tiling")
    options = BenchOptions(baseline="none" if sweep or unet_step else baseline,
                           batches=batches or ((2,) if unet_step else (1,)), steps=steps,
                           runs=runs or (30 if unet_step else 3), height=height, width=width)
    if vae_tiling:
        from kiln.bench.vae_memory import format_vae_memory, vae_memory_bench

        report, text, draw = vae_memory_bench(folders[0], batch=(batches or (1,))[0]), format_vae_memory, None
    elif lora:
        from kiln.bench.lora_swap import format_lora_swap, lora_swap_bench

        report, text, draw = lora_swap_bench(folders[0], lora, runs=runs or 5, steps=steps), format_lora_swap, None
    elif journey:
        from kiln.bench.journey import format_journey, plot_journey, run_journey

        report, text, draw = run_journey(folders[0], journey, runs=runs or 5), format_journey, plot_journey
    elif unet_step:
        report, text, draw = unet_step_bench(folders, options), fmt.format_unet_steps, None
    elif sweep:
        report = scheduler_sweep(folders[0], step_counts, reference_steps, options)
        text, draw = fmt.format_sweep, fmt.plot_sweep
    else:
        report = run_bench(folders[0], options)
        text, draw = fmt.format_report, fmt.plot_report
    if plot:
        draw(report, plot)
    if save:
        save.write_text(json.dumps(report, indent=2), encoding="utf-8")
    click.echo(json.dumps(report, indent=2) if as_json else text(report))
    if plot and not as_json:
        click.echo(f"\nplot: {plot}")


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Requests per engine call (capped at the artifact's max batch); 1 turns batching off.")
@click.option("--max-wait-ms", default=100, show_default=True, type=click.IntRange(0, 60000),
              help="How long the first request of a batch waits for others.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="Waiting requests beyond which new ones get 429.")
@click.option("--request-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds from arrival to answer; past it the client gets 504 and a request not yet started is dropped.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM or Ctrl-C: seconds to finish queued requests while /readyz says draining.")
@click.option("--hang-timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds one engine call may run before /healthz reports the worker as hung.")
@click.option("--api-key", envvar="KILN_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (also $KILN_API_KEY); /healthz and /readyz stay open.")
@click.option("--truncate-prompts", is_flag=True, help="Cut prompts over the text encoder's 77 tokens instead of 422.")
@click.option("--log-json", is_flag=True, help="One JSON line per request: id, status, latency, batch size, queue wait.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve instead (one replica per device).")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 1024), help="--ray: replicas.")
@click.option("--gpus-per-replica", default=None, type=click.FloatRange(min=0),
              help="--ray: GPUs each replica takes (default: 1 when the Ray cluster has GPUs, else 0).")
@click.option("--lora", "loras", type=NamedLoraParam(), multiple=True, metavar="NAME=FILE_OR_HUB_ID[:SCALE]",
              help="Register a LoRA requests may name (\"loras\": {\"NAME\": weight} or [\"NAME\"] at SCALE, default 1); "
                   "repeatable; the artifact must be built with --refit refit.")
@click.option("--lora-cache", default=4, show_default=True, type=click.IntRange(min=1),
              help="Merged LoRA sets kept in memory (switching back to one costs only the engine swap).")
def serve(folder: Path, host, port, max_batch, max_wait_ms, max_queue, request_timeout, drain_timeout, hang_timeout,
          api_key, truncate_prompts, log_json, use_ray, replicas, gpus_per_replica, loras, lora_cache):
    """Serve the engines in FOLDER over HTTP: POST /v1/images, GET /healthz, /readyz, /metrics."""
    from runtime.lazy import lazy_import

    if use_ray:
        ray_serve = lazy_import("ray.serve", install="pip install 'kiln[serve]'")
        from runtime.ray_serve import RayOptions, kiln_app

        ray_serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout})
        options = RayOptions(max_batch=max_batch, max_wait=max_wait_ms / 1000, num_replicas=replicas,
                             max_queued_requests=max_queue, gpus_per_replica=gpus_per_replica,
                             truncate_prompts=truncate_prompts, hang_timeout=hang_timeout, loras=tuple(loras),
                             lora_cache=lora_cache)
        ray_serve.run(kiln_app(str(folder), options), route_prefix="/v1/images", blocking=True)
        return
    from runtime.server import ServeOptions
    from runtime.server import serve as run_server

    if log_json:  # the request lines are the point of the flag: shown whatever -q says
        logging.getLogger("runtime.access").setLevel(logging.INFO)

    lazy_import("fastapi", install="pip install 'kiln[serve]'").load()
    run_server(folder, ServeOptions(host=host, port=port, max_batch=max_batch, max_wait=max_wait_ms / 1000,
                                    max_queue=max_queue, request_timeout=request_timeout, drain_timeout=drain_timeout,
                                    hang_timeout=hang_timeout, api_key=api_key, truncate_prompts=truncate_prompts,
                                    log_json=log_json, loras=tuple(loras), lora_cache=lora_cache))


@click.command()
@click.argument("url")
@click.option("--clients", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--requests", "n_requests", default=64, show_default=True, type=click.IntRange(1, 10**6),
              help="Requests in all, across clients.")
@click.option("--duration", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds; the test stops at whichever bound comes first.")
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 1000))
@click.option("--height", default=None, type=int)
@click.option("--width", default=None, type=int)
@click.option("--api-key", envvar="KILN_API_KEY", default=None, help="The service's API key (also $KILN_API_KEY).")
@click.option("--json", "as_json", is_flag=True)
def loadtest(url, clients, n_requests, duration, steps, height, width, api_key, as_json):
    """Concurrent clients against a kiln service at URL: throughput and p50/p95/p99 latency."""
    from kiln.loadtest import LoadOptions, run_load
    from runtime.errors import ServiceError

    report = run_load(url, LoadOptions(clients, n_requests, duration, steps, height, width, api_key=api_key))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_load(report)
    if report["ok"] == 0:
        why = "; ".join(f"{code}: {text}" for code, text in report["errors"].items())
        raise ServiceError(f"no request succeeded: the service answered {report['status_codes']}"
                           + (" (-1: no answer)" if "-1" in report["status_codes"] else "") + f". First answers: {why}")


def _print_load(report: dict) -> None:
    lat = report["latency_s"] or {}
    rows = [("clients", report["clients"]), ("requests (ok)", f"{report['requests']} ({report['ok']})"),
            ("status codes", report["status_codes"]), ("seconds", f"{report['seconds']:.1f}"),
            ("images/s", f"{report['throughput_images_per_s']:.2f}")]
    rows += [(f"latency {k}", f"{v:.2f} s") for k, v in lat.items()]
    click.echo(format_table(["measure", "value"], rows))
