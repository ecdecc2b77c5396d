"""ControlNets on the export side: each ControlNetModel (a folder or hub id, `--controlnet`, or a
profile's [model] controlnets) becomes its own component, controlnet_0, controlnet_1, ..., traced
with the UNet's inputs plus the conditioning image at pixel size and a per-residual conditioning
scale, returning the residuals the UNet adds to its skip connections; the UNet then takes those
residuals as inputs (exporters/components.unet). Works for any family whose runtime side has a
`controlnet` task (SD 1.x/2.x and SDXL); the residual layout is read from the UNet's config, and a
ControlNet whose layout differs is refused before anything is traced."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.components import CONDITION_SAMPLES, LATENT, UNET_ADDED_CONDITIONS, config_of
from exporters.dims import ModelDims, read_json, unet_conditions
from exporters.specs import ComponentSpec, TensorSpec
from runtime.controlnet_names import MID_RESIDUAL, controlnet_names, down_residual
from runtime.errors import ExportError, format_table
from runtime.files import file_sha256

log = logging.getLogger(__name__)

CONTROLNET_CLASSES = ("ControlNetModel",)


@dataclass(frozen=True)
class ControlNetSource:
    """A ControlNetModel folder and where it came from; `sha256` covers its config and weights."""

    source: str
    folder: Path
    sha256: str
    config: Mapping[str, Any]

    def to_dict(self, component: str) -> dict[str, str]:
        return {"component": component, "source": self.source, "sha256": self.sha256}


def resolve_controlnets(sources: tuple[str, ...]) -> list[ControlNetSource]:
    """Each FOLDER_OR_HUB_ID → a checked ControlNetSource (hub ids are downloaded: config and safetensors)."""
    return [_resolve(s) for s in sources]


def _resolve(source: str) -> ControlNetSource:
    from exporters.source import HUB_ID

    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    elif HUB_ID.match(source):
        folder = _download(source)
    else:
        raise ExportError(f"ControlNet {source!r} is neither a local folder nor a hub id (org/name); pass a folder "
                          "saved with ControlNetModel.save_pretrained, or a hub id")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"ControlNet {source}: {folder} has no config.json; expected a ControlNetModel folder "
                          "(ControlNetModel.save_pretrained)")
    config = read_json(config_path)
    if config.get("_class_name") not in CONTROLNET_CLASSES:
        raise ExportError(f"ControlNet {source} is a {config.get('_class_name')!r}; kiln exports "
                          f"{', '.join(CONTROLNET_CLASSES)} (ControlNet-XS, union and T2I adapters are not supported)")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ExportError(f"ControlNet {source}: {folder} has no fp32 .safetensors weights (fp16-only files are not "
                          "read); save it with ControlNetModel.save_pretrained(folder, safe_serialization=True)")
    digest = hashlib.sha256()
    for f in [config_path, *sorted(folder.glob("*.safetensors.index.json")), *weights]:
        digest.update(f.name.encode())
        digest.update(file_sha256(f).encode())
    return ControlNetSource(source=source, folder=folder, sha256=digest.hexdigest(), config=config)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    log.info("downloading ControlNet %s from the hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"], ignore_patterns=["*fp16*"]))
    except Exception as exc:  # the hub client raises many unrelated types for "unreachable"
        raise ExportError(f"could not download ControlNet {repo_id!r} ({type(exc).__name__}: {exc}); download it "
                          "elsewhere (ControlNetModel.save_pretrained) and pass the local folder") from exc


def residual_layout(unet_config: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """(channels, downscale) of each down-block residual of a UNet2DConditionModel (or of the
    ControlNet built like it), then the mid block's: conv_in's output, each block's resnets, and
    each downsampler but the last block's."""
    channels = list(unet_config["block_out_channels"])
    layers = unet_config.get("layers_per_block", 2)
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    out, scale = [(channels[0], 1)], 1
    for i, (width, n) in enumerate(zip(channels, layers)):
        out += [(width, scale)] * n
        if i < len(channels) - 1:
            scale *= 2
            out.append((width, scale))
    return (*out, (channels[-1], scale))


def residual_tensors(unet_config: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    """The residual tensors: down_residual_0..N-1 and mid_residual, [unet_batch, C, h/k, w/k]."""
    layout = residual_layout(unet_config)
    names = [down_residual(i) for i in range(len(layout) - 1)] + [MID_RESIDUAL]
    return tuple(TensorSpec(name, "float32", ("unet_batch", width, *(a if k == 1 else f"{a}/{k}" for a in LATENT)))
                 for name, (width, k) in zip(names, layout))


def check_fits(unet_config: Mapping[str, Any], cn: ControlNetSource) -> None:
    """Refuse a ControlNet whose residuals or text width do not fit the UNet, naming what differs."""
    problems = []
    mine, theirs = residual_layout(cn.config), residual_layout(unet_config)
    if mine != theirs:
        problems.append(("residuals (channels, downscale)", str(theirs), str(mine)))
    for key in ("cross_attention_dim", "addition_embed_type", "in_channels"):
        if cn.config.get(key) != unet_config.get(key):
            problems.append((key, repr(unet_config.get(key)), repr(cn.config.get(key))))
    if cn.config.get("global_pool_conditions"):  # residuals averaged to 1x1 (shuffle ControlNets)
        problems.append(("global_pool_conditions", "false (residuals at the UNet's sizes)", "true (pooled to 1x1; "
                         "not supported by kiln yet)"))
    if problems:
        raise ExportError(f"ControlNet {cn.source} does not fit this model's UNet:\n"
                          + format_table(["field", "UNet", "ControlNet"], problems)
                          + "\nUse a ControlNet trained for this base model (SD 1.5, SD 2.x or SDXL)")


def controlnet_spec(name: str, dims: ModelDims, cn: ControlNetSource, text_embeds_dim: int | None) -> ComponentSpec:
    """One ControlNet: (sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
    *added conditions) → the residuals, each scaled by its entry of conditioning_scale (one per
    residual, so that guess mode's per-residual scales are the same engine)."""
    f = dims.vae_scale_factor
    conditions = tuple(n for n, _ in unet_conditions(cn.config, text_embeds_dim=text_embeds_dim))
    widths = dict(dims.unet_conditions)
    if any(c not in widths for c in conditions):
        raise ExportError(f"ControlNet {cn.source} takes {', '.join(conditions)}, which this model's UNet does not")
    outputs = residual_tensors(cn.config)
    return ComponentSpec(
        name=name,
        inputs=(
            TensorSpec("sample", "float32", ("unet_batch", dims.unet_in_channels, *LATENT)),
            TensorSpec("timestep", "float32", ("unet_batch",), ("uniform", 0.0, 999.0)),
            TensorSpec("encoder_hidden_states", "float32", ("unet_batch", dims.max_tokens, dims.text_hidden_size)),
            TensorSpec("controlnet_cond", "float32",
                       ("unet_batch", int(cn.config.get("conditioning_channels", 3)), *(f"{f}*{a}" for a in LATENT)),
                       ("uniform", 0.0, 1.0)),
            TensorSpec("conditioning_scale", "float32", (len(outputs),), ("uniform", 0.5, 1.5)),
            *(TensorSpec(c, "float32", ("unet_batch", widths[c]), CONDITION_SAMPLES.get(c, ("normal", 0.0, 1.0)))
              for c in conditions),
        ),
        outputs=outputs,
        wrap=_wrap_controlnet(name, conditions),
        config_of=config_of(name),
        atol=1e-4,
        rtol=1e-4,
        module=name,
    )


def _wrap_controlnet(attr: str, condition_names: tuple[str, ...]):
    def wrap(pipe):
        import inspect

        import torch

        class ControlNet(torch.nn.Module):
            def __init__(self, controlnet):
                super().__init__()
                self.controlnet = controlnet

            def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *conditions):
                named = dict(zip(condition_names, conditions))
                added = {k: named.pop(k) for k in UNET_ADDED_CONDITIONS if k in named}
                down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=controlnet_cond,
                                            conditioning_scale=1.0, added_cond_kwargs=added or None,
                                            return_dict=False, **named)
                return (*(d * conditioning_scale[i] for i, d in enumerate(down)), mid * conditioning_scale[-1])

        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        ControlNet.forward.__signature__ = inspect.Signature([
            inspect.Parameter(n, positional) for n in ("self", "sample", "timestep", "encoder_hidden_states",
                                                       "controlnet_cond", "conditioning_scale", *condition_names)])
        return ControlNet(getattr(pipe, attr)).eval()

    return wrap


def with_controlnets(specs: dict[str, ComponentSpec], dims: ModelDims, unet_config: Mapping[str, Any],
                     controlnets: list[ControlNetSource], denoiser: str = "unet") -> dict[str, ComponentSpec]:
    """`specs` with the denoiser taking the residuals as inputs and one spec per ControlNet."""
    from exporters import components

    if not controlnets:
        return specs
    for cn in controlnets:
        check_fits(unet_config, cn)
    text_embeds = dict(dims.unet_conditions).get("text_embeds")
    out = dict(specs)
    out[denoiser] = components.unet(dims, residuals=residual_tensors(unet_config))
    for name, cn in zip(controlnet_names(len(controlnets)), controlnets):
        out[name] = controlnet_spec(name, dims, cn, text_embeds)
    return out


def attach(pipe, controlnets: list[ControlNetSource]) -> None:
    """Load each ControlNet (fp32, eval) onto the pipeline as controlnet_0, controlnet_1, ..."""
    import torch
    from diffusers import ControlNetModel

    from runtime.quiet import quiet

    for name, cn in zip(controlnet_names(len(controlnets)), controlnets):
        with quiet("diffusers"):
            model = ControlNetModel.from_pretrained(cn.folder, use_safetensors=True, torch_dtype=torch.float32)
        setattr(pipe, name, model.eval())


def controlnet_bytes(controlnets: list[ControlNetSource]) -> int:
    return sum(f.stat().st_size for cn in controlnets for f in cn.folder.glob("*.safetensors"))
