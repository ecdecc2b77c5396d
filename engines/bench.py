"""`kiln bench`: an artifact's pipeline against diffusers' PyTorch pipeline on the same weights,
measured side by side in one process, the two alternating run by run.

Stages are timed inside real pipeline calls (the text encoder's calls, every UNet step, the VAE
decode), so end-to-end minus the stages is what the pipeline itself costs (scheduler, latents,
image post-processing). Numbers, not verdicts: nothing here passes or fails.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import KilnError, format_table

log = logging.getLogger(__name__)

BASELINES = ("torch", "torch-compile", "none")
STAGES = ("text_encoder", "unet_step", "vae_decode", "end_to_end")
SWEEP_SCHEDULERS = ("ddim", "euler-a", "dpm++2m-karras", "lcm")


class BenchError(KilnError):
    """A benchmark cannot be run as asked (bad folder, different weights, bad options)."""


@dataclass(frozen=True)
class BenchOptions:
    baseline: str = "torch"
    batches: tuple[int, ...] = (1,)
    steps: int = 20
    runs: int = 3
    height: int | None = None  # default: the profile's opt
    width: int | None = None
    guidance_scale: float = 7.5
    seed: int = 0
    prompt: str = "a photograph of an astronaut riding a horse"

    def __post_init__(self):
        problems = []
        if self.baseline not in BASELINES:
            problems.append(("baseline", self.baseline, ", ".join(BASELINES)))
        if not self.batches or any(b < 1 for b in self.batches):
            problems.append(("batch", ",".join(map(str, self.batches)), "positive integers, e.g. 1,2,4"))
        if self.steps < 1:
            problems.append(("steps", self.steps, ">= 1"))
        if self.runs < 1:
            problems.append(("runs", self.runs, ">= 1"))
        if problems:
            raise BenchError("invalid benchmark options:\n" + format_table(["option", "given", "allowed"], problems))


# ---- measuring ------------------------------------------------------------------------------------


class StageTimer:
    """Times the text encoder, UNet and VAE decoder of a pipeline while it runs: hooks on the
    modules' forward, and a wrapper around vae.decode (diffusers calls decode, not forward)."""

    def __init__(self, pipe, device):
        self.device = device
        self.times: dict[str, list[float]] = {"text_encoder": [], "unet": [], "vae_decode": []}
        self._start: dict[str, float] = {}
        for name, module in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet)):
            module.register_forward_pre_hook(lambda m, a, n=name: self._begin(n))
            module.register_forward_hook(lambda m, a, o, n=name: self._end(n))
        decode = pipe.vae.decode

        def timed_decode(*args, **kwargs):
            self._begin("vae_decode")
            out = decode(*args, **kwargs)
            self._end("vae_decode")
            return out

        pipe.vae.decode = timed_decode

    def _sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def _begin(self, name):
        self._sync()
        self._start[name] = time.perf_counter()

    def _end(self, name):
        self._sync()
        self.times[name].append(time.perf_counter() - self._start.pop(name))

    def reset(self):
        for v in self.times.values():
            v.clear()


class PeakMemory:
    """Peak resident memory while a block runs: RSS sampled every 10 ms on CPU, the allocator's
    peak on CUDA (torch allocations; TensorRT's own weights are outside it)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.clear()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                self._stop.wait(0.01)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self.rss())


def matmul_peak_gflops(device, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n matmul on `device`: the machine's practical ceiling."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def unet_flops(unet, batch: int, latent_hw: tuple[int, int], text_shape: tuple[int, int]) -> int:
    """FLOPs of one UNet call (torch's FlopCounterMode: matmuls and convolutions) at UNet batch `batch`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    param = next(unet.parameters())
    sample = torch.zeros(batch, unet.config.in_channels, *latent_hw, device=param.device)
    t = torch.full((batch,), 500.0, device=param.device)
    text = torch.zeros(batch, *text_shape, device=param.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, t, text)
    return int(counter.get_total_flops())


# ---- the benchmark --------------------------------------------------------------------------------


@dataclass
class _Contender:
    label: str
    pipe: Any
    timer: StageTimer
    memory: PeakMemory
    runs: list[dict] = field(default_factory=list)


def _open(folder: Path, options: BenchOptions):
    """The engine pipeline, and the PyTorch pipeline on the same weights (None for baseline none)."""
    from runtime.manifest import load_manifest
    from runtime.pipeline import load_pipeline

    try:
        manifest = load_manifest(folder)
    except KilnError as exc:
        raise BenchError(f"cannot benchmark {folder}: {exc}") from exc
    engine = load_pipeline(folder)
    engine.set_progress_bar_config(disable=True)
    device = engine.unet.device
    source = _source_pipeline(manifest)
    baseline = None
    if source is not None:
        source.set_progress_bar_config(disable=True)
        source.to(device)
        source.scheduler = type(engine.scheduler).from_config(engine.scheduler.config)
    if options.baseline != "none":
        if source is None:
            raise BenchError(f"the baseline needs the PyTorch model {manifest.data['model']['source']!r}, which is not "
                             "available here; pass --baseline none")
        baseline = source
    return manifest, engine, baseline, source, device


def _source_pipeline(manifest):
    from exporters.source import open_source

    model = manifest.data["model"]
    try:
        source = open_source(model["source"])
    except KilnError as exc:
        log.warning("PyTorch model %s unavailable (%s); no baseline and no FLOP count", model["source"], exc)
        return None
    if source.weights_sha256 != model["weights_sha256"]:
        raise BenchError(
            f"{model['source']} now has weights {source.weights_sha256[:12]}…, and the artifact was built from "
            f"{model['weights_sha256'][:12]}…: a comparison would not be on the same weights. Rebuild the artifact"
        )
    return source.load_pipeline()


def _call(contender: _Contender, kwargs: dict, seed: int):
    import torch

    contender.timer.reset()
    generator = torch.Generator("cpu").manual_seed(seed)
    with contender.memory.measure():
        start = time.perf_counter()
        images = contender.pipe(generator=generator, **kwargs).images
        if contender.timer.device.type == "cuda":
            torch.cuda.synchronize(contender.timer.device)
        seconds = time.perf_counter() - start
    t = contender.timer.times
    return images, {
        "text_encoder": sum(t["text_encoder"]),
        "unet_step": statistics.mean(t["unet"]) if t["unet"] else 0.0,
        "unet_total": sum(t["unet"]),
        "unet_calls": len(t["unet"]),
        "vae_decode": sum(t["vae_decode"]),
        "end_to_end": seconds,
    }


def _summary(runs: list[dict], batch: int, flops: int | None, memory: PeakMemory) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("text_encoder", "unet_step", "unet_total", "vae_decode",
                                                               "end_to_end")}
    # per run: the stages are timed inside that run's call, so their sum never exceeds it
    sums = [r["text_encoder"] + r["unet_total"] + r["vae_decode"] for r in runs]
    return {
        "latency_s": {k: med[k] for k in STAGES},
        "latency_per_image_s": med["end_to_end"] / batch,
        "throughput_images_per_s": batch / med["end_to_end"],
        "stage_sum_s": statistics.median(sums),
        "overhead_fraction": statistics.median((r["end_to_end"] - t) / r["end_to_end"] for r, t in zip(runs, sums)),
        "unet_calls": runs[0]["unet_calls"],
        "spread_end_to_end_s": [min(r["end_to_end"] for r in runs), max(r["end_to_end"] for r in runs)],
        "gflops_per_s": None if flops is None else flops / med["unet_step"] / 1e9,
        "peak_memory_bytes": memory.peak,
    }


def run_bench(folder: Path, options: BenchOptions = BenchOptions()) -> dict:
    """Measure the artifact's pipeline (and the baseline) at every batch size; return the report."""
    import numpy as np
    import torch

    folder = Path(folder)
    manifest, engine, baseline, source, device = _open(folder, options)
    shapes = manifest.profile["shapes"]
    height, width = options.height or shapes["height"][1], options.width or shapes["width"][1]
    for batch in options.batches:
        from runtime.pipeline import check_request

        check_request(manifest, height=height, width=width, batch=batch)
    factor = manifest.data["dims"]["vae_scale_factor"]
    text_shape = tuple(manifest.components["unet"].inputs[2].max[1:])
    cfg = 2 if options.guidance_scale > 1 else 1
    flops = {b: None if source is None else unet_flops(source.unet, cfg * b, (height // factor, width // factor), text_shape)
             for b in options.batches}
    if options.baseline == "torch-compile":
        log.info("compiling the baseline UNet with torch.compile (the warm-up pays for it)")
        baseline.unet = torch.compile(baseline.unet)
    contenders = [_Contender("kiln", engine, StageTimer(engine, device), PeakMemory(device))]
    if baseline is not None:
        contenders.append(_Contender(options.baseline, baseline, StageTimer(baseline, device), PeakMemory(device)))
    peak = matmul_peak_gflops(device)
    log.info("fp32 matmul peak here: %.0f GFLOP/s", peak)
    report: dict[str, Any] = {
        "artifact": str(folder),
        "model": manifest.data["model"]["source"],
        "backend": manifest.backend["name"],
        "device": str(device),
        "precision": {n: c.precision for n, c in manifest.components.items()},
        "baseline": options.baseline,
        "scheduler": type(engine.scheduler).__name__,
        "size": [height, width],
        "steps": options.steps,
        "runs": options.runs,
        "guidance_scale": options.guidance_scale,
        "torch_threads": torch.get_num_threads(),
        "matmul_peak_gflops": peak,
        "batches": [],
    }
    for batch in options.batches:
        kwargs = dict(prompt=[options.prompt] * batch, negative_prompt=[""] * batch, height=height, width=width,
                      num_inference_steps=options.steps, guidance_scale=options.guidance_scale, output_type="np")
        log.info("batch %d: warm-up", batch)
        first = {}
        for c in contenders:
            c.runs = []
            c.memory.peak = 0
            first[c.label] = _call(c, kwargs, options.seed)[0]
        for r in range(options.runs):
            for c in contenders:  # alternating, run by run
                c.runs.append(_call(c, kwargs, options.seed)[1])
            log.info("batch %d: run %d/%d: %s", batch, r + 1, options.runs,
                     ", ".join(f"{c.label} {c.runs[-1]['end_to_end']:.2f} s" for c in contenders))
        entry: dict[str, Any] = {
            "batch": batch,
            "unet_flops_per_step": flops[batch],
            **{c.label: _summary(c.runs, batch, flops[batch], c.memory) for c in contenders},
        }
        if baseline is not None:
            ours, theirs = entry["kiln"]["latency_s"], entry[options.baseline]["latency_s"]
            entry["speedup"] = {k: theirs[k] / ours[k] for k in STAGES if ours[k] > 0}
            entry["max_pixel_diff"] = float(np.abs(first["kiln"] - first[options.baseline]).max())
        report["batches"].append(entry)
    return report


# ---- schedulers: time against distance from a 50-step DDIM reference -------------------------------


def scheduler_sweep(folder: Path, step_counts=(5, 10, 20, 30), reference_steps: int = 50,
                    options: BenchOptions = BenchOptions(baseline="none")) -> dict:
    """Each scheduler at each step count: seconds per image and PSNR against DDIM at `reference_steps`."""
    from runtime.pipeline import load_pipeline
    from runtime.schedulers import scheduler_from_name

    folder = Path(folder)
    try:
        pipe = load_pipeline(folder)
    except KilnError as exc:
        raise BenchError(f"cannot benchmark {folder}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    shapes = pipe.manifest.profile["shapes"]
    size = dict(height=options.height or shapes["height"][1], width=options.width or shapes["width"][1])
    base_config = pipe.scheduler.config
    lcm_ok = type(pipe.scheduler).__name__ == "LCMScheduler"

    def generate(name: str, steps: int):
        import torch

        pipe.scheduler = scheduler_from_name("LCMScheduler" if name == "lcm" else name, base_config)
        start = time.perf_counter()
        images = pipe(options.prompt, generator=torch.Generator("cpu").manual_seed(options.seed), num_inference_steps=steps,
                      guidance_scale=options.guidance_scale, output_type="np", **size).images
        return images, time.perf_counter() - start

    log.info("reference: DDIM, %d steps", reference_steps)
    reference, ref_seconds = generate("ddim", reference_steps)
    from exporters.quality import psnr

    rows, skipped = [], {}
    for name in SWEEP_SCHEDULERS:
        if name == "lcm" and not lcm_ok:
            skipped[name] = "needs an LCM-distilled model (its saved scheduler is LCMScheduler)"
            continue
        for steps in step_counts:
            generate(name, steps)  # warm-up at this step count
            images, seconds = generate(name, steps)
            rows.append({"scheduler": name, "steps": steps, "seconds": seconds, "psnr_db": psnr(reference, images)})
            log.info("%s, %d steps: %.2f s, %.1f dB", name, steps, seconds, rows[-1]["psnr_db"] or float("inf"))
    return {"artifact": str(folder), "size": [size["height"], size["width"]], "reference": {
        "scheduler": "ddim", "steps": reference_steps, "seconds": ref_seconds}, "rows": rows, "skipped": skipped}


# ---- output -------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    """The terminal table: per batch, each stage's median for kiln and the baseline, and the ratio."""
    lines = [f"{report['model']} on {report['backend']} ({report['device']}), {report['size'][0]}x{report['size'][1]}, "
             f"{report['steps']} steps {report['scheduler']}, guidance {report['guidance_scale']}, "
             f"{report['runs']} runs alternating; fp32 matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s"]
    base = report["baseline"]
    for entry in report["batches"]:
        k = entry["kiln"]
        b = entry.get(base) if base != "none" else None
        rows = []
        for stage, label in (("text_encoder", "text encoder (per call of the pipeline)"), ("unet_step", "UNet, per step"),
                             ("vae_decode", "VAE decode"), ("end_to_end", "end to end")):
            rows.append((label, f"{k['latency_s'][stage] * 1000:.1f}",
                         f"{b['latency_s'][stage] * 1000:.1f}" if b else "-",
                         f"{entry['speedup'][stage]:.2f}x" if b and stage in entry["speedup"] else "-"))
        rows.append(("images/s", f"{k['throughput_images_per_s']:.3f}", f"{b['throughput_images_per_s']:.3f}" if b else "-",
                     "-"))
        gf = lambda s: "-" if s["gflops_per_s"] is None else f"{s['gflops_per_s']:.0f} ({100 * s['gflops_per_s'] / report['matmul_peak_gflops']:.0f}% of peak)"  # noqa: E731
        rows.append(("UNet GFLOP/s", gf(k), gf(b) if b else "-", "-"))
        rows.append(("peak memory MiB", f"{k['peak_memory_bytes'] / 2**20:.0f}",
                     f"{b['peak_memory_bytes'] / 2**20:.0f}" if b else "-", "-"))
        rows.append(("stages / end to end", f"{100 * (1 - k['overhead_fraction']):.1f}%",
                     f"{100 * (1 - b['overhead_fraction']):.1f}%" if b else "-", "-"))
        flops = entry["unet_flops_per_step"]
        head = f"\nbatch {entry['batch']}" + (f", UNet {flops / 1e9:.1f} GFLOP a step" if flops else "")
        if b:
            head += f", max |pixel diff| vs {base} {entry['max_pixel_diff'] * 255:.2f}/255"
        lines.append(head)
        lines.append(format_table(["ms (median)", "kiln", base, "speed-up"], rows))
    return "\n".join(lines)


def format_sweep(sweep: dict) -> str:
    ref = sweep["reference"]
    rows = [(r["scheduler"], r["steps"], f"{r['seconds']:.2f}", "identical" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}")
            for r in sweep["rows"]]
    text = (f"distance from DDIM at {ref['steps']} steps ({ref['seconds']:.2f} s), {sweep['size'][0]}x{sweep['size'][1]}\n"
            + format_table(["scheduler", "steps", "seconds", "PSNR dB"], rows))
    for name, why in sweep["skipped"].items():
        text += f"\n{name}: skipped, {why}"
    return text


def _pyplot():
    from runtime.lazy import lazy_import

    matplotlib = lazy_import("matplotlib", install="pip install 'kiln[bench]'  (matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: dict, path: Path) -> None:
    """Per-stage latency bars at each batch size, and throughput against batch size."""
    plt = _pyplot()
    labels = ["kiln"] + ([report["baseline"]] if report["baseline"] != "none" else [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    stages = ["text_encoder", "unet_step", "vae_decode", "end_to_end"]
    width = 0.8 / (len(labels) * len(report["batches"]))
    i = 0
    for entry in report["batches"]:
        for label in labels:
            values = [entry[label]["latency_s"][s] * 1000 for s in stages]
            ax1.bar([x + i * width for x in range(len(stages))], values, width, label=f"{label}, batch {entry['batch']}")
            i += 1
    ax1.set_xticks([x + 0.4 - width / 2 for x in range(len(stages))], ["text enc.", "UNet step", "VAE dec.", "end to end"])
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (median, log scale)")
    ax1.legend(fontsize=7)
    for label in labels:
        ax2.plot([e["batch"] for e in report["batches"]], [e[label]["throughput_images_per_s"] for e in report["batches"]],
                 marker="o", label=label)
    ax2.set_xlabel("batch (images per call)")
    ax2.set_ylabel("images / s")
    ax2.legend()
    fig.suptitle(f"{report['model']}, {report['backend']} on {report['device']}, {report['size'][0]}x{report['size'][1]}, "
                 f"{report['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(sweep: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["scheduler"] for r in sweep["rows"]):
        rows = [r for r in sweep["rows"] if r["scheduler"] == name]
        ax.plot([r["seconds"] for r in rows], [r["psnr_db"] or 100.0 for r in rows], marker="o", label=name)
        for r in rows:
            ax.annotate(str(r["steps"]), (r["seconds"], r["psnr_db"] or 100.0), fontsize=7)
    ax.set_xlabel("seconds per image")
    ax.set_ylabel(f"PSNR vs DDIM {sweep['reference']['steps']} steps (dB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
