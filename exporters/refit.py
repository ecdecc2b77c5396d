"""Refittable exports: the weights a LoRA can change, recorded from the trace to the final graph.

A refittable component's every Linear and Conv weight reaches its graph as one initializer, read
as is or transposed, and nothing else: `fold_weight_transposes` folds the exporter's Transpose of a
weight itself (recording it) before onnxscript's optimizer would fold it under a new name; the
graph passes see these weights as graph inputs (they cannot fold them), and they are saved as
external data (ONNX Runtime replaces external initializers by name). `record_refit` then checks
every recorded weight against the final graph, value for value, and writes the base weights.

The record (export.json `components.<name>.refit`, copied into the manifest):
    module   the pipeline attribute whose LoRA keys apply ("unet", "text_encoder", ...)
    weights  the base weights file in the component's folder (safetensors, diffusers' names and
             layout, the graph's dtype)
    params   {diffusers parameter name: [graph initializer name, layout]}; layout "same" or
             "transpose" (the graph holds W.T)
    unused   the Linear and Conv weights no graph output depends on (e.g. the last layer of a text
             encoder whose penultimate hidden states are the output): a LoRA's change to them is moot
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from runtime.errors import ExportError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "refit.safetensors"
LAYOUTS = ("same", "transpose")


def refit_modules(pipe) -> tuple[str, ...]:
    """The pipeline attributes diffusers loads LoRAs into (its loader mixin's list)."""
    return tuple(getattr(pipe, "_lora_loadable_modules", ()) or ())


def refit_params(module, wrapper) -> dict[str, str]:
    """{traced initializer name: parameter name in `module`} for the weights of its Linear and
    Conv layers, matched by identity between the tracing wrapper's parameters and the module's."""
    import torch

    names = {id(p): n for n, p in wrapper.named_parameters(remove_duplicate=False)}
    out = {}
    for path, layer in module.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and id(layer.weight) in names:
            out[names[id(layer.weight)]] = f"{path}.weight"
    return out


def fold_weight_transposes(model, names) -> dict[str, str]:
    """In the onnx_ir `model` fresh from torch.onnx: each named weight read only through 2-D
    Transposes is replaced by its transpose (lazily computed when saved), keeping its name.
    Returns {name: layout} for the names the graph holds."""
    import numpy as np
    import onnx_ir as ir

    layouts = {}
    graph = model.graph
    for name in names:
        value = graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        uses = list(value.uses())
        if not uses:  # no node reads it: nothing a LoRA changes there reaches an output
            layouts[name] = "unused"
            continue
        transposes = [u.node for u in uses if u.node.op_type == "Transpose"]
        if len(transposes) != len(uses) or len(value.shape) != 2 or any(
                list(t.attributes["perm"].as_ints()) != [1, 0] for t in transposes if "perm" in t.attributes):
            layouts[name] = "same"
            continue
        old = value.const_value
        rows, cols = (int(d) for d in value.shape)
        folded = ir.LazyTensor(lambda old=old: ir.tensor(np.ascontiguousarray(old.numpy().T)), dtype=old.dtype,
                               shape=ir.Shape([cols, rows]), name=name)
        value.const_value = folded
        value.shape = ir.Shape([cols, rows])
        for node in transposes:
            ir.convenience.replace_all_uses_with(node.outputs[0], value)
            graph.remove(node, safe=True)
        layouts[name] = "transpose"
    log.debug("refit: %d weights kept by name, %d of them transposed", len(layouts),
              sum(v == "transpose" for v in layouts.values()))
    return layouts


def record_refit(component: str, module_attr: str, traced: dict[str, str], layouts: dict[str, str], values,
                 onnx_path: Path) -> dict[str, Any]:
    """Check the final graph at `onnx_path` holds every recorded weight as recorded (its name, its
    layout, as external data, and its value: `values(param)` (fp32, diffusers' layout) or its
    transpose, cast like the graph's weights), then write the base weights beside it in the graph's
    dtype. An ExportError names every weight that does not hold."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file

    from exporters.weights import external_names
    from runtime.errors import format_table

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    external = external_names(model)
    params, base, problems, unused = {}, {}, [], []
    for name, param in traced.items():
        layout = layouts.get(name)
        if layout in (None, "unused"):  # not in the traced graph, or read by no node: no output depends on it
            unused.append(param)
            continue
        tensor = initializers.get(name)
        if tensor is None or layout not in LAYOUTS:
            problems.append((param, name, "not a graph initializer (folded or renamed by a pass)"))
            continue
        if name not in external:
            problems.append((param, name, "stored in the graph, not as external data"))
            continue
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(onnx_path.parent))
        held = numpy_helper.to_array(tensor)
        tensor.ClearField("raw_data")
        value = np.asarray(values(param), dtype=np.float32)
        if held.dtype == np.float16:
            from onnxruntime.transformers.float16 import convert_np_to_float16

            value = convert_np_to_float16(value)
        expected = value.T if layout == "transpose" else value
        if held.shape != expected.shape or held.dtype != expected.dtype or not np.array_equal(held, expected):
            problems.append((param, name, f"holds {held.dtype}{list(held.shape)}, not the weight ({layout})"))
            continue
        params[param] = [name, layout]
        base[param] = torch.from_numpy(np.ascontiguousarray(value))
    if problems:
        raise ExportError(f"{component}: the refittable graph does not hold these weights as recorded:\n"
                          + format_table(["weight", "graph name", "found"], problems[:20])
                          + "\nThis is a kiln bug (a pass changed a protected weight); export without --refit meanwhile")
    tmp = onnx_path.parent / f".{WEIGHTS_FILE}.tmp"
    save_file(base, str(tmp))
    tmp.replace(onnx_path.parent / WEIGHTS_FILE)
    log.info("%s: refittable, %d weights recorded (%d transposed), %s", component, len(params),
             sum(v[1] == "transpose" for v in params.values()), next(iter(base.values())).dtype if base else "-")
    return {"module": module_attr, "weights": WEIGHTS_FILE, "params": params, "unused": sorted(unused)}


def base_values(path: Path):
    """values() for record_refit from a base weights file written before (as float32)."""
    from safetensors import safe_open

    handle = safe_open(str(path), framework="np")
    return lambda param: handle.get_tensor(param).astype("float32")
