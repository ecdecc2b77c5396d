"""LoRA files → per-weight low-rank factors, read the way diffusers reads them.

diffusers' own loader (the pipeline class's `lora_state_dict`) reads the file, whatever its
format (diffusers, peft, kohya/A1111, ...), and converts its keys; diffusers' and peft's helpers
give each module its rank and alpha, as `load_lora_weights` would. What comes out is, per
pipeline module ("unet", "text_encoder", ...), per weight, the factors (up, down) and the scaling:
the weight's change at adapter weight w is w · scaling · up @ down (runtime/refit.py merges it).
Nothing here touches an engine; peft is needed (imported when a LoRA is read)."""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime.errors import MissingDependencyError, RequestError

log = logging.getLogger(__name__)

TEXT_RANK_MODULES = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")  # as diffusers counts ranks


class LoraError(RequestError):
    """A LoRA that cannot be applied to this artifact: the message names the weight and why."""


@dataclass(frozen=True)
class Factor:
    up: Any  # torch tensor [out, r] (Linear) or [out, r, 1, 1] (Conv)
    down: Any  # [r, in] or [r, in, kh, kw]
    scaling: float

    def delta_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], self.down.shape[1], *self.down.shape[2:])

    def delta(self):
        """scaling · up @ down, in the weight's shape (peft's get_delta_weight for Linear and Conv2d)."""
        import torch

        up, down = self.up.float(), self.down.float()
        if down.dim() == 2:
            return (up @ down) * self.scaling
        if down.shape[2:] == (1, 1):
            return (up.flatten(1) @ down.flatten(1)).unsqueeze(2).unsqueeze(3) * self.scaling
        return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * self.scaling


@dataclass(frozen=True)
class LoraWeights:
    """One loaded LoRA: {module: {parameter name: Factor}}."""

    name: str
    source: str
    factors: Mapping[str, Mapping[str, Factor]]

    def touched(self) -> dict[str, list[str]]:
        return {module: sorted(f) for module, f in self.factors.items()}


def read_lora(pipeline_cls, source, name: str, modules: Mapping[str, set], **kwargs) -> LoraWeights:
    """Read `source` (a file, folder, hub id or state dict, as load_lora_weights takes it) with
    `pipeline_cls.lora_state_dict`, keeping the keys of `modules` (the pipeline's LoRA-loadable
    ones, each with the weight names its engine holds: a text encoder without the `text_model.`
    level of newer transformers gets keys without it, as diffusers does). A LoRA with keys for no
    module, or of a kind a refit cannot merge (DoRA, LoKr, LoRA biases), is a LoraError."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("loading LoRAs needs peft: pip install peft") from exc
    from runtime.quiet import quiet

    label = f"state dict ({len(source)} keys)" if isinstance(source, Mapping) else str(source)
    try:
        with quiet("diffusers", "peft", "transformers"):
            state, alphas, metadata = pipeline_cls.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoraError(f"could not read LoRA {label}: {type(exc).__name__}: {exc}. Give a .safetensors file, a folder "
                        "holding pytorch_lora_weights.safetensors (or weight_name=...), or a hub id", field="lora") from exc
    factors = {}
    for module in modules:
        sub = {k.removeprefix(f"{module}."): v for k, v in state.items() if k.startswith(f"{module}.")}
        if sub:
            meta = {k.removeprefix(f"{module}."): v for k, v in metadata.items()
                    if k.startswith(f"{module}.")} if metadata else None
            factors[module] = _module_factors(label, module, sub, alphas, meta or None)
            held = modules[module]
            if held and not any(p.startswith("text_model.") for p in held):
                factors[module] = {p.removeprefix("text_model."): f for p, f in factors[module].items()}
    unknown = sorted({k.split(".", 1)[0] for k in state} - set(modules))
    if not factors:
        raise LoraError(f"LoRA {label} has no weights for {', '.join(modules)} (its keys start with "
                        f"{', '.join(unknown) or 'nothing'}); is it for another model family?", field="lora")
    if unknown:
        log.warning("LoRA %s: keys for %s are ignored (this pipeline loads LoRAs into %s)", label, ", ".join(unknown),
                    ", ".join(modules))
    return LoraWeights(name=name, source=label, factors=factors)


def _module_factors(label: str, module: str, state: dict, alphas, metadata) -> dict[str, Factor]:
    """The factors of one module's keys, with diffusers' rank/alpha rules and peft's pattern match."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft.utils.other import get_pattern_key

    is_unet = module == "unet"
    if is_unet:
        if "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
        rank = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    else:
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        rank = {k: v.shape[1] for k, v in state.items()
                if k.endswith(".lora_B.weight") and k.removesuffix(".lora_B.weight").endswith(TEXT_RANK_MODULES)}
    unsupported = sorted({k for k in state if any(s in k for s in ("lora_magnitude_vector", "lokr_", "lora_controlnet"))
                          or ("lora_B" in k and k.endswith(".bias"))})
    if unsupported:
        raise LoraError(f"LoRA {label}: {module} keys {', '.join(unsupported[:3])} are DoRA, LoKr or LoRA-bias weights, "
                        "which a refit cannot merge from the base weights; fuse it at build instead "
                        "(kiln build MODEL --lora FILE)", field="lora")
    if alphas:
        alphas = {k.removeprefix(f"{module}."): v for k, v in alphas.items() if k.split(".")[0] == module}
    if metadata is not None:
        config = dict(metadata)
    elif rank:
        config = get_peft_kwargs(rank, network_alpha_dict=alphas or None, peft_state_dict=state, is_unet=is_unet)
    else:
        return {}
    r0, alpha0 = config["r"], config.get("lora_alpha", config["r"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    out = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight")
        up = state.get(f"{path}.lora_B.weight")
        if up is None:
            raise LoraError(f"LoRA {label}: {module}.{path} has a down (lora_A) matrix without its up (lora_B)", field="lora")
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), path), r0)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), path), alpha0)
        out[f"{path}.weight"] = Factor(up=up, down=down, scaling=alpha / (math.sqrt(r) if rslora else r))
    return out
