"""`kiln bench` reports: terminal tables and PNG plots of the stage benchmark, the scheduler sweep
and the UNet-step comparison."""
from __future__ import annotations

from pathlib import Path

from kiln.text import plural
from runtime.errors import format_table


def format_report(report: dict) -> str:
    """The terminal table: per batch, each stage's median for kiln and the baseline, and the ratio."""
    lines = [f"{report['model']} on {report['backend']} ({report['device']}), {report['size'][0]}x{report['size'][1]}, "
             f"{plural(report['steps'], 'step')} {report['scheduler']}, guidance {report['guidance_scale']}, "
             f"{plural(report['runs'], 'run')} alternating; fp32 matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s"]
    base = report["baseline"]
    for entry in report["batches"]:
        k = entry["kiln"]
        b = entry.get(base) if base != "none" else None
        rows = []
        texts = [s for s in k["latency_s"] if s.startswith("text_encoder")]
        labels = {"text_encoder": "text encoder (per call of the pipeline)",
                  "text_encoder_2": "text encoder 2 (per call of the pipeline)"}
        stages = [(t, labels.get(t, t)) for t in texts] + [("unet_step", "UNet, per step"), ("vae_decode", "VAE decode"),
                                                            ("end_to_end", "end to end")]
        for stage, label in stages:
            rows.append((label, f"{k['latency_s'][stage] * 1000:.1f}",
                         f"{b['latency_s'][stage] * 1000:.1f}" if b else "-",
                         f"{entry['speedup'][stage]:.2f}x" if b and stage in entry["speedup"] else "-"))
        rows.append(("images/s", f"{k['throughput_images_per_s']:.3f}", f"{b['throughput_images_per_s']:.3f}" if b else "-",
                     "-"))

        def gf(s):
            if s["gflops_per_s"] is None:
                return "-"
            return f"{s['gflops_per_s']:.0f} ({100 * s['gflops_per_s'] / report['matmul_peak_gflops']:.0f}% of peak)"

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
    size = f"{sweep['size'][0]}x{sweep['size'][1]}, guidance {sweep['guidance_scale']}"
    if sweep.get("judge"):
        rows = [(r["scheduler"], r["steps"], f"{r['seconds']:.3f}", f"{100 * r['accuracy']:.1f}", f"{r['frechet']:.2f}")
                for r in sweep["rows"]]
        images = sweep["rows"][0]["images"] if sweep["rows"] else 0
        text = (f"{sweep['judge']} over {images} images (both prompt forms, seeds {', '.join(map(str, sweep['seeds']))}), "
                f"{size}; seconds: one image\n"
                + format_table(["scheduler", "steps", "s / image", "accuracy %", "Fréchet"], rows))
    else:
        ref = sweep["reference"]
        rows = [(r["scheduler"], r["steps"], f"{r['seconds']:.2f}",
                 "identical" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}") for r in sweep["rows"]]
        text = (f"distance from {ref['scheduler']} at {ref['steps']} steps ({ref['seconds']:.2f} s), {size}\n"
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
    stages = list(report["batches"][0]["kiln"]["latency_s"])
    width = 0.8 / (len(labels) * len(report["batches"]))
    i = 0
    for entry in report["batches"]:
        for label in labels:
            values = [entry[label]["latency_s"][s] * 1000 for s in stages]
            ax1.bar([x + i * width for x in range(len(stages))], values, width, label=f"{label}, batch {entry['batch']}")
            i += 1
    names = {"text_encoder": "text enc.", "text_encoder_2": "text enc. 2", "unet_step": "UNet step",
             "vae_decode": "VAE dec.", "end_to_end": "end to end"}
    ax1.set_xticks([x + 0.4 - width / 2 for x in range(len(stages))], [names.get(s, s) for s in stages])
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (median, log scale)")
    ax1.legend(fontsize=7)
    for label in labels:
        ax2.plot([e["batch"] for e in report["batches"]], [e[label]["throughput_images_per_s"] for e in report["batches"]],
                 marker="o", label=label)
    batches = [e["batch"] for e in report["batches"]]
    ax2.set_xticks(batches)  # the batch sizes measured, not a continuous axis (one batch would be a lone point)
    if len(batches) == 1:
        ax2.set_xlim(batches[0] - 1, batches[0] + 1)
    ax2.set_xlabel("batch (images per call)")
    ax2.set_ylabel("images / s")
    ax2.legend()
    fig.suptitle(f"{report['model']}, {report['backend']} on {report['device']}, {report['size'][0]}x{report['size'][1]}, "
                 f"{plural(report['steps'], 'step')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(sweep: dict, path: Path) -> None:
    """Quality against seconds per image, a line per scheduler, each point labelled with its steps."""
    plt = _pyplot()
    judged = bool(sweep.get("judge"))

    def quality(r):
        return 100 * r["accuracy"] if judged else (r["psnr_db"] or 100.0)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["scheduler"] for r in sweep["rows"]):
        rows = [r for r in sweep["rows"] if r["scheduler"] == name]
        ax.plot([r["seconds"] for r in rows], [quality(r) for r in rows], marker="o", label=name)
        for r in rows:
            ax.annotate(str(r["steps"]), (r["seconds"], quality(r)), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image (log scale; labels: steps)")
    ax.set_ylabel(f"{sweep['judge']} (%)" if judged else f"PSNR vs {sweep['reference']['scheduler']} "
                  f"{sweep['reference']['steps']} steps (dB)")
    ax.set_title(sweep.get("model", ""), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_unet_steps(report: dict) -> str:
    """One row per artifact: its UNet step's median, spread and ratio to the first."""
    base = report["rows"][0]["median_s"]
    rows = [(r["artifact"], r["precision"], f"{r['median_s'] * 1000:.2f}", f"{r['min_s'] * 1000:.2f}",
             f"{r['max_s'] * 1000:.2f}", f"x{r['median_s'] / base:.2f}") for r in report["rows"]]
    return (f"UNet step, UNet batch {report['unet_batch']}, {report['size'][0]}x{report['size'][1]}, "
            f"{report['runs']} runs each, alternating\n"
            + format_table(["artifact", "precision", "median ms", "min ms", "max ms", "vs first"], rows))
