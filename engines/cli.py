"""The `kiln` command: export, build, inspect, generate. Commands only build option dataclasses
and call library functions; every KilnError becomes a one-line message and a non-zero exit."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from runtime.errors import KilnError, format_table

log = logging.getLogger("kiln")


class KilnGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KilnError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing half-written was kept", err=True)
            sys.exit(130)


@click.group(cls=KilnGroup)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (graph passes, parity tables).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
@click.version_option(package_name="kiln")
def cli(verbose: bool, quiet: bool):
    """kiln: build Stable Diffusion engines ahead of time and run them as a diffusers pipeline."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # torchvision and similar notices, not ours
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    _setup_logging(level)


def _setup_logging(level: int) -> None:
    """Progress from kiln's own packages goes to stderr, so stdout stays clean for --json."""
    for name in ("exporters", "engines", "runtime", "kiln"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_kiln", False) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record."""

    _kiln = True

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _export_options(command):
    """The options that shape an export, shared by `kiln export` and `kiln build MODEL`."""
    options = [
        click.option("--profile", "profile", type=click.Path(exists=True, dir_okay=False),
                     help="Profile TOML with the shape ranges."),
        click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
                     help="Every component at this precision (default: the profile's; int8 applies to the UNet)."),
        click.option("--calibration-prompts", type=click.Path(exists=True, dir_okay=False),
                     help="int8: prompt file, one per line (overrides the profile's)."),
        click.option("--check", "check", default="min,opt,max", show_default=True,
                     help="Profile points to compare with PyTorch; 'max' of a large model needs much memory."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Export folder to write.")
@_export_options
@click.option("--int8-recipe", type=click.Choice(["tensorrt", "ort-cpu"]), default="tensorrt", show_default=True,
              help="int8 recipe when the profile says auto: TensorRT's (symmetric) or ONNX Runtime CPU's (U8S8).")
def export(model: str, out: Path, profile: str | None, exporter: str, precision, calibration_prompts, int8_recipe,
           check: str):
    """Export MODEL's components to checked ONNX graphs in OUT (portable: build engines anywhere from it)."""
    from exporters.export import ExportOptions, export_model
    from exporters.source import resolve_model

    options = ExportOptions(exporter=exporter, check_points=_points(check), precision=precision,
                            calibration_prompts=calibration_prompts, int8_target=int8_recipe)
    source, resolved = resolve_model(model, profile)
    export_model(source, resolved, out, options)
    click.echo(f"exported {model} to {out}")


def _tensorrt_options(command):
    """TensorRT build settings (ignored by onnxruntime)."""
    options = [
        click.option("--workspace-gib", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="TensorRT: cap on the builder's tactic scratch (default: TensorRT's, the whole GPU)."),
        click.option("--opt-level", "optimization_level", type=click.IntRange(0, 5), default=3, show_default=True,
                     help="TensorRT: builder optimization level; higher builds longer for faster engines."),
        click.option("--hardware-compat", type=click.Choice(["none", "same-compute-capability", "ampere-plus"]),
                     default="none", show_default=True,
                     help="TensorRT: which GPUs the engines may run on besides this GPU's architecture."),
        click.option("--tf32", is_flag=True, help="TensorRT: allow TF32 math in fp32 layers (off: fp32 matches PyTorch)."),
        click.option("--refit", type=click.Choice(["off", "refit", "identical"]), default="off", show_default=True,
                     help="TensorRT: refittable engines (swap weights without a rebuild)."),
        click.option("--strip-plan", is_flag=True,
                     help="TensorRT: plans without weights; the artifact carries the ONNX weights, refit at load."),
        click.option("--weight-streaming", is_flag=True,
                     help="TensorRT: engines that can stream weights from host memory under a budget set at load."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="auto: TensorRT when it imports and a CUDA GPU exists, else onnxruntime (CUDA, then CPU).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="onnxruntime execution provider (cuda needs onnxruntime-gpu); default: what the backend choice found.")
@_export_options
@_tensorrt_options
@click.option("--force", is_flag=True, help="Rebuild even when the inputs are unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(model: str, out: Path, backend: str, device, profile: str | None, exporter: str, precision,
          calibration_prompts, check: str, workspace_gib, optimization_level, hardware_compat, tf32, refit, strip_plan,
          weight_streaming, force: bool, as_json: bool):
    """Build engines for MODEL (or a folder made by `kiln export`) into the artifact folder OUT."""
    from engines.build import BuildOptions, build_from_export, build_from_model, int8_target, resolve_options
    from engines.trt_backend import TrtOptions

    trt_options = TrtOptions(workspace_gib=workspace_gib, optimization_level=optimization_level,
                             hardware_compat=hardware_compat, tf32=tf32, refit=refit, strip_plan=strip_plan,
                             weight_streaming=weight_streaming)
    options = resolve_options(BuildOptions(backend=backend, device=device, force=force, tensorrt=trt_options))
    started = time.perf_counter()
    if (Path(model) / "export.json").is_file():
        if profile or precision or calibration_prompts:
            raise click.UsageError("--profile, --precision and --calibration-prompts apply when exporting; "
                                   "this export folder already fixed them")
        result = build_from_export(Path(model), out, options)
    else:
        from exporters.export import ExportOptions

        export_options = ExportOptions(exporter=exporter, check_points=_points(check), precision=precision,
                                       calibration_prompts=calibration_prompts, int8_target=int8_target(options))
        result = build_from_model(model, out, options, profile, export_options)
    seconds = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps({"folder": str(result.folder), "skipped": result.skipped, "build_key": result.build_key,
                               "backend": options.backend, "device": options.device, "seconds": round(seconds, 2)}))
    elif result.skipped:
        click.echo(f"{out} is up to date; skipped (build key {result.build_key[:12]}). Use --force to rebuild")
    else:
        click.echo(f"built {out} ({options.backend}, {options.device}) in {seconds:.1f} s")


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and report as JSON.")
def inspect(folder: Path, as_json: bool):
    """Show an artifact folder's manifest: model, backend, shape ranges, engines and parity."""
    from runtime.manifest import REPORT_FILE, load_manifest

    manifest = load_manifest(folder)
    report_path = folder / REPORT_FILE
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    if as_json:
        click.echo(json.dumps({"manifest": manifest.data, "report": report}, indent=2))
        return
    d = manifest.data
    b, shapes = d["backend"], d["profile"]["shapes"]
    summary = [
        ("model", d["model"]["source"]),
        ("pipeline", d["model"]["pipeline_class"]),
        ("weights sha256", d["model"]["weights_sha256"][:16]),
        ("backend", f"{b['name']} {b['version']} ({b.get('execution_provider') or b.get('gpu', '-')})"),
        *_tensorrt_rows(b),
        ("batch", "min {} / opt {} / max {}".format(*shapes["batch"])),
        ("height", "min {} / opt {} / max {} (multiple of {})".format(*shapes["height"], manifest.size_multiple)),
        ("width", "min {} / opt {} / max {}".format(*shapes["width"])),
        ("format / kiln", f"{d['format_version']} / {d['kiln_version']}"),
        ("created", d.get("created", "?")),
        ("build key", d.get("build_key", "?")[:16]),
    ]
    click.echo(format_table(["field", "value"], summary))
    click.echo()
    rows = []
    for name, c in d["components"].items():
        size = sum((folder / f).stat().st_size for f in c["files"] if (folder / f).is_file())
        export_err = max((r["max_abs_err"] for r in report.get("export_parity", {}).get(name, [])), default=float("nan"))
        engine_err = max((r["max_abs_err"] for r in report.get("engine_parity", {}).get(name, [])), default=float("nan"))
        io = ", ".join(f"{t['name']} {_dims(t['min'])}..{_dims(t['max'])}" for t in c["inputs"])
        measured = report.get("quality", {}).get("components", {}).get(name, {})
        cosines = [m["cosine"] for m in measured.values() if isinstance(m, dict) and "cosine" in m]
        vs_fp32 = f"{min(cosines):.5f}" if cosines else "-"
        precision = c["precision"] + (f" ({c['int8']['recipe']})" if "int8" in c else "")
        rows.append((name, c["file"], precision, f"{size / 2**20:.1f}", c["build_seconds"], export_err, engine_err,
                     vs_fp32, io))
    click.echo(format_table(["component", "file", "precision", "MiB", "build s", "onnx err", "engine err",
                             "cos vs fp32", "inputs (min..max)"], rows))
    pipeline = report.get("quality", {}).get("pipeline")
    if pipeline:
        value = "identical" if pipeline["psnr_db"] is None else f"{pipeline['psnr_db']:.1f} dB"
        click.echo(f"\nimages vs fp32 engines: PSNR {value} (worst of {len(pipeline['per_image_psnr_db'])}, "
                   f"{pipeline['steps']} steps, {pipeline['size'][0]}x{pipeline['size'][1]})")


def _tensorrt_rows(b: dict) -> list[tuple[str, str]]:
    if b.get("name") != "tensorrt":
        return []
    cc = ".".join(map(str, b["compute_capability"]))
    flags = [f for f in ("tf32", "strip_plan", "weight_streaming") if b.get(f)] + ([f"refit={b['refit']}"] if b.get("refit", "off") != "off" else [])
    workspace = "TensorRT default" if b.get("workspace_bytes") is None else f"{b['workspace_bytes'] / 2**30:.1f} GiB"
    return [
        ("GPU", f"{b['gpu']} (compute capability {cc})"),
        ("hardware compat", b.get("hardware_compatibility_level", "none")),
        ("TensorRT build", f"opt level {b.get('builder_optimization_level')}, workspace {workspace}, "
                           f"flags: {', '.join(flags) or 'none'}"),
    ]


def _points(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _dims(shape) -> str:
    return "x".join(map(str, shape))


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--negative-prompt", default=None)
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--guidance", "guidance_scale", default=7.5, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--height", default=None, type=int, help="Pixels; default: the model's native size.")
@click.option("--width", default=None, type=int, help="Pixels; default: the model's native size.")
@click.option("--num-images", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--scheduler", default=None, help="ddim, pndm, euler, euler-a, dpm++2m, dpm++2m-karras, unipc, lms, or a diffusers class name.")
@click.option("--init-image", type=click.Path(exists=True, dir_okay=False), help="Image for img2img (sets the size).")
@click.option("--strength", default=0.75, show_default=True, type=click.FloatRange(0, 1), help="img2img strength.")
@click.option("--no-cuda-graphs", is_flag=True, help="TensorRT: enqueue every step instead of replaying CUDA graphs.")
@click.option("--weight-streaming-budget", default=None,
              help="TensorRT: bytes of weights kept on the GPU per engine (e.g. 2e9), or 'auto'.")
@click.option("-o", "--output", default="out.png", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def generate(folder: Path, prompt: str, negative_prompt, steps, guidance_scale, seed, height, width, num_images,
             scheduler, init_image, strength, no_cuda_graphs, weight_streaming_budget, output: Path, as_json: bool):
    """Generate an image from PROMPT with the engines in FOLDER."""
    import torch

    from runtime import load_pipeline
    from runtime.schedulers import scheduler_from_name

    started = time.perf_counter()
    budget = weight_streaming_budget
    if budget not in (None, "auto"):
        try:
            budget = int(float(budget))
        except ValueError:
            raise click.BadParameter(f"expected bytes (e.g. 2e9) or 'auto', got {budget!r}", param_hint="--weight-streaming-budget")
    pipe = load_pipeline(folder, task="img2img" if init_image else "text2img", cuda_graphs=not no_cuda_graphs,
                         weight_streaming_budget=budget)
    if scheduler:
        pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
    args = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                num_images_per_prompt=num_images, generator=torch.Generator("cpu").manual_seed(seed))
    if init_image:
        from PIL import Image

        args.update(image=Image.open(init_image).convert("RGB"), strength=strength)
    else:
        args.update(height=height, width=width)
    with contextlib.redirect_stdout(sys.stderr):
        images = pipe(**args).images
    paths = []
    for i, image in enumerate(images):
        path = output if len(images) == 1 else output.with_name(f"{output.stem}-{i}{output.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    seconds = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps({"images": [str(p) for p in paths], "size": list(images[0].size), "steps": steps,
                               "seed": seed, "seconds": round(seconds, 3)}))
    else:
        w, h = images[0].size
        click.echo(f"wrote {', '.join(map(str, paths))} ({w}x{h}, {steps} steps, {pipe.scheduler.__class__.__name__}, "
                   f"{seconds:.1f} s)")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Choice(["torch", "torch-compile", "none"]), default="torch", show_default=True,
              help="diffusers' PyTorch pipeline on the same weights, eager or with torch.compile on the UNet.")
@click.option("--batch", "batches", default="1", show_default=True, help="Batch sizes, comma-separated (e.g. 1,2,4).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 1000), help="Timed runs per pipeline and batch.")
@click.option("--height", default=None, type=int, help="Pixels; default: the profile's opt.")
@click.option("--width", default=None, type=int, help="Pixels; default: the profile's opt.")
@click.option("--schedulers", "sweep", is_flag=True,
              help="Instead: DDIM, Euler a, DPM++ 2M Karras (and LCM where the model has it) at several step counts, "
                   "time against PSNR from a 50-step DDIM image.")
@click.option("--step-counts", default="5,10,20,30", show_default=True, help="--schedulers: step counts.")
@click.option("--reference-steps", default=50, show_default=True, type=click.IntRange(1, 1000),
              help="--schedulers: DDIM steps of the reference image.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG plot (needs matplotlib).")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON report to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(folder: Path, baseline, batches, steps, runs, height, width, sweep, step_counts, reference_steps, plot, save,
          as_json):
    """Benchmark the engines in FOLDER against PyTorch, per stage, in one process, alternating."""
    from engines.bench import (BenchError, BenchOptions, format_report, format_sweep, plot_report, plot_sweep,
                               run_bench, scheduler_sweep)

    try:
        batch_sizes = tuple(int(b) for b in batches.split(",") if b.strip())
        counts = tuple(int(c) for c in step_counts.split(",") if c.strip())
    except ValueError:
        raise BenchError(f"--batch and --step-counts take comma-separated integers, got {batches!r} and {step_counts!r}")
    options = BenchOptions(baseline="none" if sweep else baseline, batches=batch_sizes, steps=steps, runs=runs,
                           height=height, width=width)
    if sweep:
        report = scheduler_sweep(folder, counts, reference_steps, options)
        text, draw = format_sweep, plot_sweep
    else:
        report = run_bench(folder, options)
        text, draw = format_report, plot_report
    if plot:
        draw(report, plot)
    if save:
        save.write_text(json.dumps(report, indent=2), encoding="utf-8")
    click.echo(json.dumps(report, indent=2) if as_json else text(report))
    if plot and not as_json:
        click.echo(f"\nplot: {plot}")


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Requests per engine call (capped at the artifact's max batch); 1 turns batching off.")
@click.option("--max-wait-ms", default=100, show_default=True, type=click.IntRange(0, 60000),
              help="How long the first request of a batch waits for others.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="Waiting requests beyond which new ones get 429.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve instead (one replica per device).")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 1024), help="--ray: replicas.")
def serve(folder: Path, host, port, max_batch, max_wait_ms, max_queue, use_ray, replicas):
    """Serve the engines in FOLDER over HTTP: POST /v1/images, GET /healthz, GET /metrics."""
    if use_ray:
        from runtime.lazy import lazy_import

        ray_serve = lazy_import("ray.serve", install="pip install 'kiln[serve]'")
        from runtime.ray_serve import kiln_app

        ray_serve.start(http_options={"host": host, "port": port})
        ray_serve.run(kiln_app(str(folder), max_batch, max_wait_ms / 1000, replicas), route_prefix="/v1/images",
                      blocking=True)
        return
    from runtime.lazy import lazy_import
    from runtime.server import ServeOptions, serve as run_server

    lazy_import("fastapi", install="pip install 'kiln[serve]'").load()
    run_server(folder, ServeOptions(host, port, max_batch, max_wait_ms / 1000, max_queue))


@cli.command()
@click.argument("url")
@click.option("--clients", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--requests", "n_requests", default=64, show_default=True, type=click.IntRange(1, 10**6),
              help="Requests in all, across clients.")
@click.option("--duration", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds; the test stops at whichever bound comes first.")
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 1000))
@click.option("--height", default=None, type=int)
@click.option("--width", default=None, type=int)
@click.option("--json", "as_json", is_flag=True)
def loadtest(url, clients, n_requests, duration, steps, height, width, as_json):
    """Concurrent clients against a kiln service at URL: throughput and p50/p95/p99 latency."""
    from engines.loadtest import LoadOptions, run_load

    report = run_load(url, LoadOptions(clients, n_requests, duration, steps, height, width))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    lat = report["latency_s"] or {}
    rows = [("clients", report["clients"]), ("requests (ok)", f"{report['requests']} ({report['ok']})"),
            ("status codes", report["status_codes"]), ("seconds", f"{report['seconds']:.1f}"),
            ("images/s", f"{report['throughput_images_per_s']:.2f}")]
    rows += [(f"latency {k}", f"{v:.2f} s") for k, v in lat.items()]
    click.echo(format_table(["measure", "value"], rows))


def main():
    cli(prog_name="kiln")


if __name__ == "__main__":
    main()
