"""Check an ONNX graph against the PyTorch module it was traced from, at min, opt and max shapes."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.specs import ComponentSpec, sample_inputs
from runtime.errors import ToleranceError, format_table
from runtime.numerics import max_abs_err, tolerance

log = logging.getLogger(__name__)

POINTS = ("min", "opt", "max")


@dataclass(frozen=True)
class ParityRow:
    point: str
    output: str
    shape: tuple[int, ...]
    max_abs_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point, "output": self.output, "shape": list(self.shape),
                "max_abs_err": self.max_abs_err, "tolerance": self.tolerance, "ok": self.ok}


def compare_outputs(spec: ComponentSpec, point: str, got: dict[str, Any], ref: dict[str, Any]) -> list[ParityRow]:
    """Max abs error of each output against atol + rtol * max|reference|."""
    import numpy as np

    rows = []
    for t in spec.outputs:
        expected, actual = np.asarray(ref[t.name], dtype=np.float64), np.asarray(got[t.name], dtype=np.float64)
        if actual.shape != expected.shape:
            raise ToleranceError(
                f"{spec.name}: output '{t.name}' at {point} shape has shape {list(actual.shape)}, "
                f"PyTorch gives {list(expected.shape)}"
            )
        rows.append(ParityRow(point, t.name, expected.shape, max_abs_err(actual, expected),
                              tolerance(spec.atol, spec.rtol, expected)))
    return rows


def torch_outputs(spec: ComponentSpec, module, inputs: dict[str, Any]) -> dict[str, Any]:
    import torch

    with torch.no_grad():
        out = module(*[torch.from_numpy(inputs[t.name]) for t in spec.inputs])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {t.name: o.detach().cpu().numpy() for t, o in zip(spec.outputs, outs)}


def check_against_torch(
    spec: ComponentSpec, module, onnx_path: Path, ranges: dict[str, dict[str, list[int]]], seed: int = 0,
    points: tuple[str, ...] = POINTS, release: Callable[[], None] | None = None,
) -> tuple[list[ParityRow], dict[str, Any]]:
    """Run the graph on ONNX Runtime (CPU) and PyTorch at each profile point; raise ToleranceError
    with a per-output table on any mismatch. Returns the rows and the opt-point inputs and outputs.

    PyTorch runs first at every point; then `release` (if given) frees the module's weights, so
    that the PyTorch weights and ONNX Runtime's copy are never in memory together."""
    import onnxruntime as ort

    # The reference saved for build-time parity is always taken at opt, checked or not.
    runs = {}
    for point in dict.fromkeys((*points, "opt")):
        inputs = sample_inputs(spec, {t.name: ranges[t.name][point] for t in spec.inputs}, seed + POINTS.index(point))
        runs[point] = (inputs, torch_outputs(spec, module, inputs))
    reference = {**runs["opt"][0], **runs["opt"][1]}
    if release is not None:
        del module
        release()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")  # no second, repacked copy of the weights
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # nor re-laid-out ones (NCHWc)
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rows: list[ParityRow] = []
    for point in points:
        inputs, ref = runs[point]
        got = dict(zip([t.name for t in spec.outputs], session.run([t.name for t in spec.outputs], inputs)))
        rows += compare_outputs(spec, point, got, ref)
    del session
    for r in rows:
        log.debug("%s %s %s max|err| %.3g (tolerance %.3g)", spec.name, r.point, r.output, r.max_abs_err, r.tolerance)
    if not all(r.ok for r in rows):
        raise ToleranceError(
            f"{spec.name}: the ONNX graph disagrees with PyTorch beyond tolerance:\n" + parity_table(rows)
            + "\nRe-export with --exporter torchscript, or report the component and shapes"
        )
    return rows, reference


def parity_table(rows: list[ParityRow]) -> str:
    return format_table(
        ["point", "output", "shape", "max |err|", "tolerance", "ok"],
        [(r.point, r.output, "x".join(map(str, r.shape)), r.max_abs_err, r.tolerance, "yes" if r.ok else "NO") for r in rows],
    )
