"""`kiln export`, `kiln build` and `kiln inspect`: MODEL → checked ONNX → engines, and what an
artifact folder holds."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from kiln.params import export_options, tensorrt_options
from kiln.text import plural
from runtime.errors import format_table


@click.command()
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Export folder to write.")
@export_options
@click.option("--int8-recipe", type=click.Choice(["tensorrt", "ort-cpu"]), default="tensorrt", show_default=True,
              help="int8 recipe when the profile says auto: TensorRT's (symmetric) or ONNX Runtime CPU's (U8S8).")
@click.option("--refit", type=click.Choice(["off", "refit"]), default="off", show_default=True,
              help="refit: record the UNet's and text encoders' weights so engines built from it swap LoRAs at run time.")
def export(model: str, out: Path, profile: str | None, exporter: str, precision, calibration_prompts, int8_recipe,
           check: str, loras, controlnets, refit: str):
    """Export MODEL's components to checked ONNX graphs in OUT (portable: build engines anywhere from it)."""
    from exporters.export import ExportOptions, export_model
    from exporters.resolve import resolve_model

    options = ExportOptions(exporter=exporter, check_points=check, precision=precision,
                            calibration_prompts=calibration_prompts, int8_target=int8_recipe, loras=tuple(loras),
                            refit=refit == "refit", controlnets=tuple(controlnets))
    source, resolved = resolve_model(model, profile)
    export_model(source, resolved, out, options)
    click.echo(f"exported {model} to {out}")



@click.command()
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="auto: TensorRT when it imports and a CUDA GPU exists, else onnxruntime (CUDA, then CPU).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="onnxruntime execution provider (cuda needs onnxruntime-gpu); default: what the backend choice found.")
@export_options
@tensorrt_options
@click.option("--force", is_flag=True, help="Rebuild even when the inputs are unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(model: str, out: Path, backend: str, device, profile: str | None, exporter: str, precision,
          calibration_prompts, check: str, loras, controlnets, workspace_gib, optimization_level, hardware_compat, tf32,
          refit, strip_plan, weight_streaming, force: bool, as_json: bool):
    """Build engines for MODEL (or a folder made by `kiln export`) into the artifact folder OUT."""
    from engines.build import BuildOptions, build_from_export, build_from_model, int8_target, resolve_options
    from engines.trt_backend import TrtOptions

    trt_options = TrtOptions(workspace_gib=workspace_gib, optimization_level=optimization_level,
                             hardware_compat=hardware_compat, tf32=tf32, refit=refit, strip_plan=strip_plan,
                             weight_streaming=weight_streaming)
    options = resolve_options(BuildOptions(backend=backend, device=device, force=force, tensorrt=trt_options, refit=refit))
    started = time.perf_counter()
    if (Path(model) / "export.json").is_file():
        if profile or precision or calibration_prompts or loras or controlnets:
            raise click.UsageError("--profile, --precision, --calibration-prompts, --lora and --controlnet apply when "
                                   "exporting; "
                                   "this export folder already fixed them")
        result = build_from_export(Path(model), out, options)
    else:
        from exporters.export import ExportOptions

        export_options = ExportOptions(exporter=exporter, check_points=check, precision=precision,
                                       calibration_prompts=calibration_prompts, int8_target=int8_target(options),
                                       loras=tuple(loras), refit=refit == "refit", controlnets=tuple(controlnets))
        result = build_from_model(model, out, options, profile, export_options)
    seconds = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps({"folder": str(result.folder), "skipped": result.skipped, "build_key": result.build_key,
                               "backend": options.backend, "device": options.device, "seconds": round(seconds, 2)}))
    elif result.skipped:
        click.echo(f"{out} is up to date; skipped (build key {result.build_key[:12]}). Use --force to rebuild")
    else:
        click.echo(f"built {out} ({options.backend}, {options.device}) in {seconds:.1f} s")


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and report as JSON.")
def inspect(folder: Path, as_json: bool):
    """Show an artifact folder's manifest: model, backend, shape ranges, engines and parity."""
    from runtime.integrity import path_problem
    from runtime.manifest import load_manifest, load_report

    manifest = load_manifest(folder)
    report = load_report(folder)
    if as_json:
        click.echo(json.dumps({"manifest": manifest.data, "report": report}, indent=2))
        return
    d = manifest.data
    b, shapes = d["backend"], d["profile"]["shapes"]
    summary = [
        ("model", d["model"]["source"]),
        ("pipeline", f"{d['model']['pipeline_class']} ({manifest.family} family)"),
        ("weights sha256", d["model"]["weights_sha256"][:16]),
        *[("LoRA", f"{lora['source']} at scale {lora['scale']:g} (sha256 {lora['sha256'][:16]})")
          for lora in d["model"].get("loras", [])],
        *([("LoRA refit", ", ".join(f"{n} ({len(c['refit']['params'])} weights)" for n, c in d["components"].items()
                                    if "refit" in c) + ": load_lora_weights / set_adapters swap them")]
          if any("refit" in c for c in d["components"].values()) else []),
        *[("ControlNet", f"{c['component']}: {c['source']} (sha256 {c['sha256'][:16]})")
          for c in d["model"].get("controlnets", [])],
        *_generation_rows(d["profile"].get("generation") or {}),
        ("backend", f"{b['name']} {b.get('version', '?')} ({b.get('execution_provider') or b.get('gpu', '-')})"),
        *_tensorrt_rows(b),
        ("batch", "min {} / opt {} / max {}".format(*shapes["batch"])),
        ("height", "min {} / opt {} / max {} (multiple of {})".format(*shapes["height"], manifest.size_multiple)),
        ("width", "min {} / opt {} / max {}".format(*shapes["width"])),
        *[(f"{name} size", ", ".join(f"{k} {r[0]}..{r[2]}" for k, r in own.items()) + " (own [shapes.COMPONENT] range)")
          for name, own in d["profile"].get("component_shapes", {}).items()],
        ("format / kiln", f"{d['format_version']} / {d['kiln_version']}"),
        ("created", d.get("created", "?")),
        ("build key", (d.get("build_key") or "?")[:16]),
    ]
    click.echo(format_table(["field", "value"], summary))
    click.echo()
    rows = []
    for name, c in d["components"].items():
        size = sum((folder / f).stat().st_size for f in c["files"] if not path_problem(folder, f) and (folder / f).is_file())
        export_err = max((r["max_abs_err"] for r in report.get("export_parity", {}).get(name, [])), default=float("nan"))
        engine_err = max((r["max_abs_err"] for r in report.get("engine_parity", {}).get(name, [])), default=float("nan"))
        io = ", ".join(f"{t['name']} {_dims(t['min'])}..{_dims(t['max'])}" for t in c["inputs"])
        measured = report.get("quality", {}).get("components", {}).get(name, {})
        cosines = [m["cosine"] for m in (measured.values() if isinstance(measured, dict) else ())
                   if isinstance(m, dict) and isinstance(m.get("cosine"), (int, float))]
        vs_fp32 = f"{min(cosines):.5f}" if cosines else "-"
        recipe = c["int8"].get("recipe", "?") if isinstance(c.get("int8"), dict) else None
        precision = c["precision"] + (f" ({recipe})" if recipe else "")
        rows.append((name, c["file"], precision, f"{size / 2**20:.1f}", c.get("build_seconds", "-"), export_err, engine_err,
                     vs_fp32, io))
    click.echo(format_table(["component", "file", "precision", "MiB", "build s", "onnx err", "engine err",
                             "cos vs fp32", "inputs (min..max)"], rows))
    pipeline = report.get("quality", {}).get("pipeline")
    if pipeline:
        value = "identical" if pipeline["psnr_db"] is None else f"{pipeline['psnr_db']:.1f} dB"
        click.echo(f"\nimages vs fp32 engines: PSNR {value} (worst of {len(pipeline['per_image_psnr_db'])}, "
                   f"{pipeline['steps']} steps, {pipeline['size'][0]}x{pipeline['size'][1]})")
    judged = report.get("quality", {}).get("judged")
    if isinstance(judged, dict) and all(isinstance(judged.get(k), dict) for k in ("fp32", "exported")):
        mine, base = judged["exported"], judged["fp32"]
        click.echo(f"{judged.get('judge', 'judged')}: {100 * mine['accuracy']:.1f}% with these engines, "
                   f"{100 * base['accuracy']:.1f}% with fp32 engines; Fréchet distance {mine['frechet']:.2f} vs "
                   f"{base['frechet']:.2f} ({mine['images']} images, {plural(judged.get('steps', 0), 'step')})")


def _generation_rows(g: dict) -> list[tuple[str, str]]:
    """What the profile recommends, where it says anything."""
    said = [plural(g["steps"], "step") if g.get("steps") else "", f"guidance {g['guidance_scale']:g}"
            if g.get("guidance_scale") is not None else "", f"warn above guidance {g['max_guidance_scale']:g}"
            if g.get("max_guidance_scale") is not None else "", "UNet built for guidance off"
            if g.get("guidance") is False else "", f"scheduler {g['scheduler']}" if g.get("scheduler") else ""]
    said = [s for s in said if s]
    return [("recommended", ", ".join(said))] if said else []


def _tensorrt_rows(b: dict) -> list[tuple[str, str]]:
    if b.get("name") != "tensorrt":
        return []
    cc = ".".join(map(str, b["compute_capability"]))
    flags = [f for f in ("tf32", "strip_plan", "weight_streaming") if b.get(f)]
    flags += [f"refit={b['refit']}"] if b.get("refit", "off") != "off" else []
    workspace = "TensorRT default" if b.get("workspace_bytes") is None else f"{b['workspace_bytes'] / 2**30:.1f} GiB"
    return [
        ("GPU", f"{b['gpu']} (compute capability {cc})"),
        ("hardware compat", b.get("hardware_compatibility_level", "none")),
        ("TensorRT build", f"opt level {b.get('builder_optimization_level')}, workspace {workspace}, "
                           f"flags: {', '.join(flags) or 'none'}"),
    ]


def _dims(shape) -> str:
    return "x".join(map(str, shape))
