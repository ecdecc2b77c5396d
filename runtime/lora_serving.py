"""Per-request LoRAs for the batcher, the HTTP service and Ray Serve.

A service registers its LoRAs at start (`kiln serve DIR --lora NAME=PATH[:SCALE]`): each is loaded
into the refittable engines' pipeline under its name, with SCALE as its weight when a request names
it without one. A request asks for a set: {"loras": {"style": 0.8, "detail": 0.5}} or ["style"].
The set is part of the batch key, so one engine call serves one set, and before each call the
pipeline's adapters are set to it (the swap costs nothing when the set is the one already in the
engines; merged sets are kept in an LRU of `lora_cache` entries, runtime/refit.py)."""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from runtime.errors import OptionsError, RequestError

log = logging.getLogger(__name__)

MAX_LORA_WEIGHT = 10.0
DEFAULTS_ATTR = "_kiln_served_loras"  # {name: default weight} on a pipeline with registered LoRAs


def register_loras(pipe, loras, cache_size: int = 4) -> None:
    """Load `loras` ((name, file or hub id, default weight), ...) into `pipe`, keep `cache_size`
    merged sets, and leave the engines at their base weights."""
    if not loras:
        return
    if cache_size < 1:
        raise OptionsError(f"the LoRA cache holds at least 1 merged set, got {cache_size}")
    names = [name for name, _, _ in loras]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise OptionsError(f"LoRA names must differ; {', '.join(repeated)} given more than once")
    for name, source, scale in loras:
        log.info("LoRA %s: loading %s (default weight %g)", name, source, scale)
        pipe.load_lora_weights(source, adapter_name=name)
    pipe.lora_refit.cache_size = cache_size
    pipe.set_adapters([])
    pipe.__dict__[DEFAULTS_ATTR] = {name: float(scale) for name, _, scale in loras}


def served_loras(pipe) -> dict[str, float]:
    return dict(pipe.__dict__.get(DEFAULTS_ATTR) or {})


def request_loras(pipe, value) -> tuple[tuple[str, float], ...]:
    """A request's LoRA set as sorted (name, weight) pairs: `value` is None, a list of names (their
    default weights) or {name: weight}; each name must be one the service registered."""
    if not value:
        return ()
    served = served_loras(pipe)
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        pairs = [tuple(v) for v in value]
    elif isinstance(value, (list, tuple)):
        pairs = [(name, None) for name in value]
    else:
        raise RequestError(f"loras is a list of names or a {{name: weight}} object, got {type(value).__name__}",
                           field="loras")
    if not served:
        raise RequestError("this service serves no LoRAs; start it with --lora NAME=PATH[:SCALE] on an artifact "
                           "built with --refit refit", field="loras")
    out = {}
    for name, weight in pairs:
        if name not in served:
            raise RequestError(f"no LoRA named {name!r} here; this service serves {', '.join(sorted(served))}",
                               field="loras")
        if name in out:
            raise RequestError(f"LoRA {name!r} is named twice", field="loras")
        weight = served[name] if weight is None else weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or abs(weight) > MAX_LORA_WEIGHT:
            raise RequestError(f"LoRA {name!r}: the weight must be a number within ±{MAX_LORA_WEIGHT:g}, got {weight!r}",
                               field="loras")
        out[name] = float(weight)
    return tuple(sorted(out.items()))


def apply_loras(pipe, loras: tuple[tuple[str, float], ...]) -> None:
    """Set the pipeline's adapters to `loras` before a call (the base weights for ()); a no-op on a
    pipeline that serves no LoRAs."""
    if not served_loras(pipe):
        return
    pipe.set_adapters([n for n, _ in loras], [w for _, w in loras])


def swap_counts(pipe) -> tuple[int, float] | None:
    """(swaps, seconds spent swapping) of a pipeline serving LoRAs, else None."""
    if not served_loras(pipe):
        return None
    refit = pipe.lora_refit
    return refit.swaps, refit.swap_seconds
