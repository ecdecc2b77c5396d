"""PyTorch module → ONNX graph with named dynamic axes (torch.onnx), with the weights kept on disk.

The dynamo exporter's graph is optimized (onnxscript: constant folding, common subexpressions,
redundant casts) from the saved file, whose weights onnx_ir maps lazily, rather than in memory
inside torch.onnx.export, where the optimizer's results keep every weight alive."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from exporters.specs import ComponentSpec, dynamic_axes, sample_inputs
from exporters.weights import load_graph
from runtime.errors import ExportError
from runtime.quiet import heartbeat, quiet

log = logging.getLogger(__name__)


def forget_traced_tensors() -> None:
    """torch.export keeps a module-level map from the last trace's fake tensors to its graph nodes,
    whose metadata hold the real weights, until the next export: clear it (a private torch global,
    so only where it exists)."""
    from torch.fx.experimental import proxy_tensor

    table = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(table, dict):
        table.clear()


def optimize_file(raw: Path, path: Path, refit: dict | None = None) -> None:
    """onnxscript's optimizer on the graph at `raw` (its weights mapped from disk, touched only where
    folded), written to `path` with external data; `raw` and its data are removed. With `refit`
    ({"names": traced weight names}), those weights are first folded by kiln, keeping their names,
    and their layouts are recorded in refit["layouts"] (exporters/refit.py)."""
    import onnx_ir as ir
    from onnxscript import optimizer

    model = ir.load(str(raw))
    if refit is not None:
        from exporters.refit import fold_weight_transposes

        refit["layouts"] = fold_weight_transposes(model, refit["names"])
    optimizer.optimize_ir(model)
    ir.save(model, str(path), external_data=f"{path.name}.data")
    del model
    for leftover in raw.parent.glob(f"{raw.name}*"):
        leftover.unlink()


def onnx_from_torch(spec: ComponentSpec, module, ranges: dict[str, dict[str, list[int]]], options,
                    workdir: Path | None = None, out_dir: Path | None = None, refit: dict | None = None):
    """Trace `module` at the opt shapes with named dynamic axes; return the onnx.ModelProto. The
    exporter's files go to a temporary folder in `workdir` (beside the output), not the system's.
    With `out_dir`, the traced graph is kept there and returned without its large weights, which
    stay in out_dir's external data (exporters/weights.py: passes and save_graph keep them on disk);
    without it, the graph is returned whole. `refit`: see optimize_file (dynamo exporter only)."""
    import tempfile

    import onnx
    import torch

    sample = sample_inputs(spec, {t.name: ranges[t.name]["opt"] for t in spec.inputs}, options.seed)
    args = tuple(torch.from_numpy(sample[t.name]) for t in spec.inputs)
    kwargs: dict[str, Any] = dict(
        input_names=[t.name for t in spec.inputs],
        output_names=[t.name for t in spec.outputs],
        dynamic_axes=dynamic_axes(spec),
    )
    if options.exporter == "dynamo":
        # optimized below, from the saved file: torch.onnx's in-memory optimization keeps the
        # module's weights alive after the export (measured: 3.3 GB of an 860M UNet)
        kwargs.update(dynamo=True, optimize=False, verbose=False, external_data=True)
    else:
        kwargs.update(dynamo=False, do_constant_folding=True)
    opset = options.opset or (None if options.exporter == "dynamo" else 17)
    if opset is not None:
        kwargs["opset_version"] = opset
    # torch.onnx prints its progress to stdout; send it to stderr so stdout stays clean for --json.
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        path = (Path(out_dir) if out_dir is not None else Path(tmp)) / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        system_tmp, tempfile.tempdir = tempfile.tempdir, tmp  # torch.onnx and onnxscript's own files go here too
        try:
            # torch.onnx warns that torchvision ops cannot be registered (kiln traces none of them)
            with torch.no_grad(), quiet("torch.onnx", "onnxscript"), heartbeat(log, f"exporting {spec.name}"):
                raw = path.with_name("raw.onnx") if options.exporter == "dynamo" else path
                torch.onnx.export(module.eval(), args, str(raw), **kwargs)
                forget_traced_tensors()
                if raw != path:
                    optimize_file(raw, path, refit)
        except Exception as exc:  # torch.onnx raises many types; report them as one
            raise ExportError(
                f"{spec.name}: torch.onnx.export ({options.exporter}) failed: {type(exc).__name__}: {exc}. "
                f"Try --exporter {'torchscript' if options.exporter == 'dynamo' else 'dynamo'}"
            ) from exc
        finally:
            tempfile.tempdir = system_tmp
        return load_graph(path) if out_dir is not None else onnx.load(str(path))
