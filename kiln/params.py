"""Click parameter types and option groups shared by kiln's commands."""
from __future__ import annotations

import re

import click

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": 10**6, "mb": 10**6, "mi": 2**20,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30, "t": 10**12, "tb": 10**12, "ti": 2**40,
          "tib": 2**40}


class CommaList(click.ParamType):
    """'1,2,4' → (1, 2, 4): a comma-separated list of `item` values (each checked by `item`)."""

    name = "list"

    def __init__(self, item: click.ParamType = click.INT, min_items: int = 1, example: str = "1,2,4"):
        self.item = item
        self.min_items = min_items
        self.example = example

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        kind = f"comma-separated {self._plural()}"
        if len(parts) < self.min_items:
            self.fail(f"expected at least {self.min_items} {kind}, got {value!r}", param, ctx)
        try:
            return tuple(self.item.convert(p, param, ctx) for p in parts)
        except click.BadParameter as exc:
            self.fail(f"expected {kind} such as {self.example}; {exc.message}", param, ctx)

    def _plural(self) -> str:
        if isinstance(self.item, click.types.IntParamType):
            return "integers"
        if isinstance(self.item, click.types.FloatParamType):
            return "numbers"
        return "values"

    def get_metavar(self, param, ctx=None):
        return f"{self.item.name.upper()}[,{self.item.name.upper()}...]"


class ByteSize(click.ParamType):
    """'2e9', '512MiB', '2GB' → bytes (int); `keywords` pass through as themselves (e.g. 'auto')."""

    name = "bytes"

    def __init__(self, keywords: tuple[str, ...] = ()):
        self.keywords = keywords

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value in self.keywords:
            return value
        match = _SIZE.match(str(value))
        unit = (match.group(2) or "").lower() if match else None
        if not match or unit not in _UNITS:
            choices = "".join(f" or '{k}'" for k in self.keywords)
            self.fail(f"expected a size in bytes such as 2e9, 512MiB or 2GB{choices}, got {value!r}", param, ctx)
        return int(float(match.group(1)) * _UNITS[unit])


class LoraParam(click.ParamType):
    """--lora FILE_OR_HUB_ID[:SCALE] → (source, scale)."""

    name = "lora"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from exporters.profile import parse_lora
        from runtime.errors import ProfileError

        try:
            return parse_lora(value)
        except ProfileError as exc:
            self.fail(str(exc), param, ctx)


class NamedLoraParam(click.ParamType):
    """--lora NAME=FILE_OR_HUB_ID[:SCALE] → (name, source, scale): a LoRA a service registers."""

    name = "named_lora"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest:
            self.fail(f"expected NAME=FILE_OR_HUB_ID[:SCALE] (e.g. style=./style.safetensors:0.8), got {value!r}",
                      param, ctx)
        source, scale = LoraParam().convert(rest, param, ctx)
        return name.strip(), source, scale


def options(*decorators):
    """Several click options as one decorator, applied in the order listed."""

    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


export_options = options(
    click.option("--profile", "profile", type=click.Path(exists=True, dir_okay=False),
                 help="Profile TOML with the shape ranges."),
    click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True),
    click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
                 help="Every component at this precision (default: the profile's; int8 applies to the UNet)."),
    click.option("--calibration-prompts", type=click.Path(exists=True, dir_okay=False),
                 help="int8: prompt file, one per line (overrides the profile's)."),
    click.option("--check", "check", type=CommaList(click.STRING, example="min,opt"), default="min,opt,max",
                 show_default=True, help="Profile points to compare with PyTorch; 'max' of a large model needs much memory."),
    click.option("--lora", "loras", type=LoraParam(), multiple=True, metavar="FILE_OR_HUB_ID[:SCALE]",
                 help="Fuse this LoRA (diffusers format, .safetensors) into the weights at SCALE (default 1) "
                      "before tracing; repeatable, after the profile's own."),
    click.option("--controlnet", "controlnets", multiple=True, metavar="FOLDER_OR_HUB_ID",
                 help="Export this ControlNetModel as its own engine (controlnet_0, controlnet_1, ...) and a UNet that "
                      "takes its residuals; repeatable (multi-ControlNet), after the profile's own."),
)

tensorrt_options = options(
    click.option("--workspace-gib", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="TensorRT: cap on the builder's tactic scratch (default: TensorRT's, the whole GPU)."),
    click.option("--opt-level", "optimization_level", type=click.IntRange(0, 5), default=3, show_default=True,
                 help="TensorRT: builder optimization level; higher builds longer for faster engines."),
    click.option("--hardware-compat", type=click.Choice(["none", "same-compute-capability", "ampere-plus"]),
                 default="none", show_default=True,
                 help="TensorRT: which GPUs the engines may run on besides this GPU's architecture."),
    click.option("--tf32", is_flag=True, help="TensorRT: allow TF32 math in fp32 layers (off: fp32 matches PyTorch)."),
    click.option("--refit", type=click.Choice(["off", "refit", "identical"]), default="off", show_default=True,
                 help="refit: engines whose LoRA weights swap at run time without a rebuild (every backend); "
                      "identical (TensorRT): refit only with the build's own weights."),
    click.option("--strip-plan", is_flag=True,
                 help="TensorRT: plans without weights; the artifact carries the ONNX weights, refit at load."),
    click.option("--weight-streaming", is_flag=True,
                 help="TensorRT: engines that can stream weights from host memory under a budget set at load."),
)
