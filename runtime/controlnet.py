"""ControlNet engines where diffusers' ControlNet pipelines expect ControlNetModels.

ControlNetShim passes the pipelines' `isinstance(controlnet, ControlNetModel)` checks (a bare
subclass: no PyTorch weights), carries the ControlNet's config, and runs its engine: the residuals
come back scaled per residual by the engine's `conditioning_scale` input, which the shim fills
with diffusers' scales (the call's scale, or guess mode's logspace(-1, 0) ramp times it). Several
ControlNets go into diffusers' own MultiControlNetModel, which sums their residuals."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import ControlNetModel
from diffusers.configuration_utils import FrozenDict
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from runtime.controlnet_names import controlnets_in
from runtime.errors import ArtifactError
from runtime.families import CONTROLNETS
from runtime.manifest import Manifest
from runtime.shims import OnEngineDevice, refuse


class ControlNetShim(OnEngineDevice, ControlNetModel):
    """A ControlNetModel engine (see the module docstring)."""

    def __init__(self, engine, config: Mapping[str, Any], device):
        torch.nn.Module.__init__(self)  # not ModelMixin's: there are no weights to create
        self._internal_dict = FrozenDict(config)
        self._device = torch.device(device)
        self.engine = engine
        self.residuals = tuple(t.name for t in engine.info.outputs)
        core = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale")
        self.extra_inputs = tuple(t.name for t in engine.info.inputs if t.name not in core)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, guess_mode=False, return_dict=True):
        refuse("controlnet", class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
               cross_attention_kwargs=cross_attention_kwargs)
        added = added_cond_kwargs or {}
        missing = [n for n in self.extra_inputs if n not in added]
        if missing:
            raise ArtifactError(f"{self.engine.info.name} engine needs {', '.join(missing)} (added_cond_kwargs), which this "
                                "pipeline did not pass; load the artifact with the pipeline it was built for")
        n = len(self.residuals)
        if guess_mode and not self.config.get("global_pool_conditions", False):
            scales = torch.logspace(-1, 0, n, device=sample.device) * conditioning_scale  # diffusers' ramp, 0.1 to 1
        else:
            scales = torch.full((n,), float(conditioning_scale), dtype=torch.float32, device=sample.device)
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        out = self.engine(sample=sample, timestep=t, encoder_hidden_states=encoder_hidden_states,
                          controlnet_cond=controlnet_cond, conditioning_scale=scales,
                          **{k: added[k] for k in self.extra_inputs})
        residuals = [out[name].clone() for name in self.residuals]  # the engine reuses its buffers
        down, mid = residuals[:-1], residuals[-1]
        if not return_dict:
            return down, mid
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


class MultiControlNetShim(MultiControlNetModel):
    """diffusers' MultiControlNetModel over ControlNet shims (its own device and dtype: it has no weights)."""

    @property
    def device(self) -> torch.device:
        return self.nets[0].device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


def task_components(components: Sequence[str], manifest: Manifest, chosen: Sequence[str] | None = None) -> tuple[str, ...]:
    """A task's components with CONTROLNETS replaced by the ControlNets to load: `chosen` (names or
    indices, in the caller's order), else every one the artifact has."""
    if CONTROLNETS not in components:
        return tuple(components)
    available = controlnets_in(manifest.components)
    if not available:
        raise ArtifactError(f"{manifest.folder} was built without ControlNets; build with kiln build MODEL "
                            "--controlnet FOLDER_OR_HUB_ID for the controlnet tasks")
    picked = available if chosen is None else tuple(
        available[c] if isinstance(c, int) and 0 <= c < len(available) else c for c in chosen)
    unknown = [c for c in picked if c not in available]
    if unknown or not picked or len(set(picked)) < len(picked):
        raise ArtifactError(f"controlnets={list(chosen or [])}: this artifact has {', '.join(available)} "
                            "(pick them by name or index, each at most once)")
    return tuple(c for c in components if c != CONTROLNETS) + tuple(picked)


def controlnet_module(manifest: Manifest, engines: Mapping[str, Any], device):
    """The ControlNet shim, or a MultiControlNetShim of several, for the ControlNet engines among
    `engines`, in their order; None where there are none."""
    names = [n for n in engines if n in controlnets_in(manifest.components)]
    shims = [ControlNetShim(engines[n], manifest.components[n].config, device) for n in names]
    return (shims[0] if len(shims) == 1 else MultiControlNetShim(shims)) if shims else None
