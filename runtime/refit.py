"""LoRA weights swapped into refittable engines, always merged from the base weights.

A refittable artifact (kiln build MODEL --refit refit) records, per component, the base weights
(refit/<component>.safetensors: diffusers' parameter names and layout, the engine's dtype) and
the map from each parameter to the engine weight that holds it (name and layout, recorded at
export: exporters/refit.py). For a set of active adapters {LoRA: weight}, every weight any of them
touches is merged as W = W_base + Σ weight · scaling · up @ down, in float32, from the base (never
from what the engine holds now, so switching LoRA A to B never leaves a trace of A: TensorRT
#3628), cast to the engine's dtype, laid out as the engine holds it, and handed to the engine with
the base values of every weight an earlier set changed. Merged sets are kept in a small LRU."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.lora import LoraError, LoraWeights

log = logging.getLogger(__name__)

DEFAULT_CACHE = 4  # merged weight sets kept (each holds the changed weights of every component)


def _to_engine_dtype(tensor, dtype):
    """A float32 torch tensor as a numpy array of the engine's dtype (fp16: clamped as the exporter's
    converter did)."""
    import numpy as np

    array = tensor.detach().numpy()
    if dtype == np.float16:
        from onnxruntime.transformers.float16 import convert_np_to_float16

        return convert_np_to_float16(array)
    return array.astype(dtype, copy=False)


class RefitComponent:
    """One refittable engine: its record, its base weights (read on demand) and what is changed."""

    def __init__(self, name: str, record: Mapping[str, Any], folder: Path, engine):
        from safetensors import safe_open

        self.name, self.engine = name, engine
        self.module = record["module"]
        self.params: dict[str, tuple[str, str]] = {p: (n, layout) for p, (n, layout) in record["params"].items()}
        self._base = safe_open(str(Path(folder) / record["weights"]), framework="pt")
        self.unused = frozenset(record.get("unused", ()))  # no output depends on them: a change is moot
        self._by_engine_name = {n: p for p, (n, _) in self.params.items()}
        self.changed: set[str] = set()  # engine weight names that differ from the base now

    def base(self, param: str):
        return self._base.get_tensor(param)

    def engine_array(self, param: str, weight):
        """`weight` (diffusers' layout) as the engine holds `param`: its dtype and layout."""
        import numpy as np

        base = self._base.get_slice(param)
        dtype = np.float16 if base.get_dtype() in ("F16", "float16") else np.float32
        _, layout = self.params[param]
        return np.ascontiguousarray(_to_engine_dtype(weight.T if layout == "transpose" else weight, dtype))

    def base_by_engine_name(self, engine_name: str):
        """The base value of an engine weight by its engine name (TensorRT asks by those), or None."""
        param = self._by_engine_name.get(engine_name)
        return None if param is None else self.engine_array(param, self.base(param))

    def shape(self, param: str) -> tuple[int, ...]:
        return tuple(self._base.get_slice(param).get_shape())


class RefitSet:
    """The refittable engines of one pipeline, and the LRU of merged weight sets."""

    def __init__(self, manifest, engines: Mapping[str, Any], cache_size: int = DEFAULT_CACHE):
        self.components = {name: RefitComponent(name, manifest.data["components"][name]["refit"], manifest.folder, engine)
                           for name, engine in engines.items() if "refit" in manifest.data["components"][name]}
        self.by_module = {c.module: c for c in self.components.values()}
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size
        self.applied: tuple = ()
        self.swaps, self.swap_seconds = 0, 0.0

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.by_module)

    def check(self, lora: LoraWeights) -> None:
        """Every weight `lora` changes must be one these engines can refit; LoraError names the others."""
        problems = []
        for module, factors in lora.factors.items():
            component = self.by_module.get(module)
            if component is None:
                problems.append(f"{module} (no refittable engine holds it)")
                continue
            for param, factor in factors.items():
                if param in component.unused:
                    continue
                if param not in component.params:
                    problems.append(f"{module}.{param} (not a weight this artifact recorded for refit)")
                    continue
                shape = component.shape(param)
                change = list(factor.delta_shape())
                if tuple(change) != shape:
                    problems.append(f"{module}.{param} (the LoRA's change is {change}, the weight {list(shape)})")
        if problems:
            raise LoraError(f"LoRA {lora.name} ({lora.source}) changes weights this artifact cannot refit: "
                            + "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
                            + ". Is it for another model? Weights outside the map are fused at build instead "
                            "(kiln build MODEL --lora FILE)", field="lora")

    def merged(self, active: list[tuple[LoraWeights, Mapping[str, float]]]) -> dict[str, dict[str, Any]]:
        """{component: {engine weight name: array}} for the active adapters (LoRA, weight per module)."""
        out: dict[str, dict[str, Any]] = {}
        for component in self.components.values():
            touched = sorted({p for lora, _ in active for p in lora.factors.get(component.module, {})} - component.unused)
            named = {}
            for param in touched:
                weight = component.base(param).float()
                for lora, weights in active:
                    factor = lora.factors.get(component.module, {}).get(param)
                    scale = weights.get(component.module, 1.0)
                    if factor is not None and scale:
                        weight = weight + scale * factor.delta()
                named[component.params[param][0]] = component.engine_array(param, weight)
            out[component.name] = named
        return out

    def apply(self, key: tuple, active: list[tuple[LoraWeights, Mapping[str, float]]]) -> float:
        """Make the engines hold the merge of `active` (cached under `key`); returns the seconds taken
        (0 when they already do)."""
        if key == self.applied:
            return 0.0
        started = time.perf_counter()
        merged = self.cache.pop(key, None)
        if merged is None:
            merged = self.merged(active) if active else {}
        if active:
            self.cache[key] = merged
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        self.applied = None  # until every engine holds the new set (a failed refit leaves them mixed)
        for component in self.components.values():
            named = dict(merged.get(component.name, {}))
            if not named and not component.changed:
                continue
            for engine_name in component.changed - set(named):  # what an earlier set changed goes back to base
                named[engine_name] = component.base_by_engine_name(engine_name)
            component.engine.refit(named, base=component.base_by_engine_name)
            component.changed = set(merged.get(component.name, {}))
        self.applied = key
        seconds = time.perf_counter() - started
        self.swaps += 1
        self.swap_seconds += seconds
        log.debug("LoRA swap to %s in %.3f s", "; ".join(f"{n} {dict(w)}" for n, w in key) or "the base weights", seconds)
        return seconds
