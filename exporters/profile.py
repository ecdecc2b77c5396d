"""Profiles: the model source and the shape and precision ranges an engine build depends on.

A profile is profiles/NAME.toml, a TOML file given with --profile, or defaults derived from a
model's own config (opt = native size, min = half, max = double, batch 1-4). Which components a
profile may name depends on the model's family, so [precision] keys are checked when the profile
is bound to the family (`bind_family`), once MODEL is resolved.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from exporters.precision import INT8_RECIPES, Fp16Policy, Int8Policy
from runtime.errors import ProfileError, format_table

PRECISIONS = ("fp32", "fp16", "int8")
OWN_SHAPES = ("vae_decoder", "vae_encoder")  # the components a [shapes.COMPONENT] table may size
_SOFTMAX = ("upcast", "always", "never")
_SECTIONS = {
    "model": {"source", "loras", "controlnets"},
    "shapes": {"batch", "height", "width"},
    "precision": None,  # component names: the family's (checked by bind_family)
    "fp16": {"keep_fp32_ops", "keep_fp32_modules", "keep_fp32_softmax", "keep_fp32_components"},
    "int8": {"recipe", "calibration_prompts", "calibration_steps", "exclude_modules"},
    "generation": {"steps", "guidance_scale", "max_guidance_scale", "guidance", "scheduler", "scheduler_config"},
}


@dataclass(frozen=True)
class Generation:
    """[generation]: how the model is meant to be run, recorded in the artifact.

    steps, guidance_scale: what `kiln generate`, the server and benchmarks use when a request leaves
        them out (None: the family's defaults); max_guidance_scale: above it the runtime warns once
        (a distilled model given more guidance than it was made for: burnt, oversaturated images).
    guidance: False builds the UNet for guidance off (UNet batch = images: half the activation
        memory); a request with guidance_scale > 1 is then refused.
    scheduler, scheduler_config: the scheduler class saved in the artifact (from the model's own
        config, with these overrides, e.g. timestep_spacing = "trailing"); None keeps the model's."""

    steps: int | None = None
    guidance_scale: float | None = None
    max_guidance_scale: float | None = None
    guidance: bool = True
    scheduler: str | None = None
    scheduler_config: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scheduler_config": dict(self.scheduler_config)}


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    batch: Range
    height: Range
    width: Range
    # (component, precision) pairs: as the file gives them, then every component of the family
    # once bound (bind_family), in the family's order
    precision: tuple[tuple[str, str], ...] = ()
    fp16: Fp16Policy = Fp16Policy()
    int8: Int8Policy = Int8Policy()
    generation: Generation = Generation()
    loras: tuple[tuple[str, float], ...] = ()  # (file or hub id, scale): fused into the weights at export
    controlnets: tuple[str, ...] = ()  # ControlNetModel folders or hub ids: one engine each (controlnet_0, ...)
    # [shapes.COMPONENT] height/width overrides, e.g. a VAE built smaller than the UNet (tiled decoding
    # covers the rest): (component, ((key, Range), ...)) pairs
    component_shapes: tuple[tuple[str, tuple[tuple[str, Range], ...]], ...] = ()
    denoiser: str = field(default="unet", compare=False)  # the one component int8 calibration covers (the family's)

    def shapes_of(self, component: str | None) -> dict[str, Range]:
        """batch, height and width of one component's engine: [shapes], with its [shapes.COMPONENT] overrides."""
        own = dict(dict(self.component_shapes).get(component, ()))
        return {k: own.get(k, getattr(self, k)) for k in ("batch", "height", "width")}

    def precision_of(self, component: str) -> str:
        return dict(self.precision).get(component, "fp32")

    def with_precision(self, precision: str | None) -> Profile:
        """`--precision X` for every component: fp16 spares the keep-fp32 components; int8 applies
        to the denoiser (the one component calibration covers), the others keep the profile's setting."""
        if precision is None:
            return self
        if precision not in PRECISIONS:
            raise ProfileError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        chosen = {}
        for c, current in self.precision:
            if precision == "int8":
                chosen[c] = "int8" if c == self.denoiser else current
            elif precision == "fp16" and c in self.fp16.keep_fp32_components:
                chosen[c] = "fp32"
            else:
                chosen[c] = precision
        return replace(self, precision=tuple(chosen.items()))

    def keeping_fp32(self, components: tuple[str, ...]) -> Profile:
        """The fp16 policy also keeps these components whole in fp32 (what a model's own config asks)."""
        extra = tuple(c for c in components if c not in self.fp16.keep_fp32_components)
        if not extra:
            return self
        fp16 = replace(self.fp16, keep_fp32_components=(*self.fp16.keep_fp32_components, *extra))
        return replace(self, fp16=fp16).with_keep_fp32()

    def with_keep_fp32(self) -> Profile:
        """Components the fp16 policy keeps whole in fp32 stay fp32 even where [precision] says fp16."""
        keep = self.fp16.keep_fp32_components
        return replace(self, precision=tuple((c, "fp32" if p == "fp16" and c in keep else p) for c, p in self.precision))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": {"source": self.source,
                      **({"loras": [{"source": s, "scale": k} for s, k in self.loras]} if self.loras else {}),
                      **({"controlnets": list(self.controlnets)} if self.controlnets else {})},
            "shapes": {"batch": self.batch.as_list(), "height": self.height.as_list(), "width": self.width.as_list()},
            "precision": dict(self.precision),
            "fp16": asdict(self.fp16),
            "int8": asdict(self.int8),
            "generation": self.generation.to_dict(),
            **({"component_shapes": {c: {k: r.as_list() for k, r in ranges} for c, ranges in self.component_shapes}}
               if self.component_shapes else {}),
        }

    def with_loras(self, loras: tuple[tuple[str, float], ...]) -> Profile:
        """The profile's LoRAs and then these (--lora), fused in that order."""
        return replace(self, loras=(*self.loras, *loras)) if loras else self

    def with_controlnets(self, controlnets: tuple[str, ...]) -> Profile:
        """The profile's ControlNets and then these (--controlnet), as controlnet_0, controlnet_1, ..."""
        return replace(self, controlnets=(*self.controlnets, *controlnets)) if controlnets else self


def profiles_dir() -> Path:
    return Path(str(resources.files("profiles")))


def profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def load_profile(name_or_path: str | Path, require_source: bool = True) -> Profile:
    """Read a profile by name (profiles/NAME.toml) or by path to a TOML file. A file given with
    --profile for a MODEL may leave [model] out (require_source=False): MODEL is the source."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if str(name_or_path) not in profile_names():
            raise ProfileError(
                f"unknown profile '{name_or_path}'. Valid profiles: {', '.join(profile_names())}; "
                "or pass a path to a .toml file"
            )
        path = profiles_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise ProfileError(f"profile file {path} does not exist; pass a path to an existing .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {path} is not valid TOML: {exc}") from exc
    return profile_from_dict(path.stem, data, origin=str(path), source=None if require_source else "")


def profile_from_dict(name: str, data: Mapping[str, Any], origin: str = "profile", source: str | None = None) -> Profile:
    """Validate a profile mapping, collecting every problem before raising once."""
    problems: list[tuple[str, str, str]] = []
    for section, value in data.items():
        if section not in _SECTIONS:
            problems.append((section, f"one of {sorted(_SECTIONS)}", "unknown section"))
        elif not isinstance(value, Mapping):
            problems.append((section, "a table", repr(value)))
        elif _SECTIONS[section] is not None:
            for key in value:
                if section == "shapes" and isinstance(value[key], Mapping):
                    continue  # [shapes.COMPONENT]: checked below, its name when bound to the family
                if key not in _SECTIONS[section]:
                    problems.append((f"{section}.{key}", f"one of {sorted(_SECTIONS[section])}", "unknown key"))
    model = data.get("model", {}) if isinstance(data.get("model", {}), Mapping) else {}
    shapes = data.get("shapes", {}) if isinstance(data.get("shapes", {}), Mapping) else {}
    precision = data.get("precision", {}) if isinstance(data.get("precision", {}), Mapping) else {}
    resolved_source = model.get("source", source)
    if not isinstance(resolved_source, str) or (source is None and not resolved_source):
        problems.append(("model.source", "a hub id, a local folder or builtin:NAME", repr(resolved_source)))
    ranges = {}
    for key in ("batch", "height", "width"):
        value = shapes.get(key)
        if not _is_range(value):
            problems.append((f"shapes.{key}", "[min, opt, max] positive integers, min <= opt <= max", repr(value)))
        else:
            ranges[key] = Range(*value)
    component_shapes = []
    for component, table in ((k, v) for k, v in shapes.items() if isinstance(v, Mapping)):
        own = []
        for key, value in table.items():
            if key not in ("height", "width"):
                problems.append((f"shapes.{component}.{key}", "height or width", "unknown key"))
            elif not _is_range(value):
                problems.append((f"shapes.{component}.{key}", "[min, opt, max] positive integers, min <= opt <= max",
                                 repr(value)))
            else:
                own.append((key, Range(*value)))
        component_shapes.append((component, tuple(own)))
    controlnets = model.get("controlnets", [])
    if not (isinstance(controlnets, list) and all(isinstance(c, str) and c.strip() for c in controlnets)):
        problems.append(("model.controlnets", "a list of ControlNet folders or hub ids", repr(controlnets)))
        controlnets = []
    for key, value in precision.items():
        if value not in PRECISIONS:
            problems.append((f"precision.{key}", f"one of {list(PRECISIONS)}", repr(value)))
    fp16, int8 = _policy(data, "fp16", problems), _policy(data, "int8", problems)
    if fp16.get("keep_fp32_softmax", "upcast") not in _SOFTMAX:
        problems.append(("fp16.keep_fp32_softmax", f"one of {list(_SOFTMAX)}", repr(fp16["keep_fp32_softmax"])))
    if int8.get("recipe", "auto") not in ("auto", *INT8_RECIPES):
        problems.append(("int8.recipe", f"one of {['auto', *INT8_RECIPES]}", repr(int8["recipe"])))
    steps = int8.get("calibration_steps", 8)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(("int8.calibration_steps", "a positive integer", repr(steps)))
    generation = _generation(data.get("generation", {}), problems)
    loras = []
    for i, entry in enumerate(model.get("loras", [])) if isinstance(model.get("loras", []), list) else ():
        try:
            loras.append(parse_lora(entry))
        except ProfileError as exc:
            problems.append((f"model.loras[{i}]", "'FILE_OR_HUB_ID[:SCALE]'", str(exc)))
    if not isinstance(model.get("loras", []), list):
        problems.append(("model.loras", "a list of 'FILE_OR_HUB_ID[:SCALE]' strings", repr(model["loras"])))
    if problems:
        raise ProfileError(f"{origin} is invalid:\n" + format_table(["field", "expected", "found"], problems))
    return Profile(
        name=name,
        source=resolved_source,
        batch=ranges["batch"],
        height=ranges["height"],
        width=ranges["width"],
        precision=tuple(precision.items()),
        fp16=Fp16Policy(**{k: tuple(v) if isinstance(v, list) else v for k, v in fp16.items()}),
        int8=Int8Policy(**{k: tuple(v) if isinstance(v, list) else v for k, v in int8.items()}),
        generation=generation,
        loras=tuple(loras),
        controlnets=tuple(controlnets),
        component_shapes=tuple(component_shapes),
    ).with_keep_fp32()


def parse_lora(text: object) -> tuple[str, float]:
    """'FILE_OR_HUB_ID[:SCALE]' → (source, scale); the scale defaults to 1. A colon whose tail is
    not a number belongs to the source."""
    if not isinstance(text, str) or not text.strip():
        raise ProfileError(f"a LoRA is 'FILE_OR_HUB_ID[:SCALE]', got {text!r}")
    source, _, tail = text.rpartition(":")
    try:
        scale = float(tail) if source else None
    except ValueError:
        scale = None
    if scale is None:
        return text, 1.0
    if not math.isfinite(scale):
        raise ProfileError(f"LoRA scale must be a finite number, got {tail!r} in {text!r}")
    return source, scale


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _generation(table: object, problems: list) -> Generation:
    """The [generation] table, its fields checked."""
    if not isinstance(table, Mapping):
        return Generation()
    checks = {
        "steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
        "guidance_scale": (_number, "a number >= 0"),
        "max_guidance_scale": (_number, "a number >= 0"),
        "guidance": (lambda v: isinstance(v, bool), "true or false"),
        "scheduler": (lambda v: isinstance(v, str) and v.isidentifier(), "a diffusers scheduler class name"),
        "scheduler_config": (lambda v: isinstance(v, Mapping), "a table of scheduler config overrides"),
    }
    fields = {}
    for key, value in table.items():
        if key in checks:
            ok, expected = checks[key]
            if not ok(value):
                problems.append((f"generation.{key}", expected, repr(value)))
            else:
                fields[key] = value
    if fields.get("guidance") is False and fields.get("guidance_scale", 0) > 1:
        problems.append(("generation.guidance_scale", "<= 1 when guidance = false (the UNet is built without the "
                         "unconditional half)", repr(fields["guidance_scale"])))
    if "scheduler_config" in fields:
        fields["scheduler_config"] = tuple(sorted(fields["scheduler_config"].items()))
    for key in ("guidance_scale", "max_guidance_scale"):
        if key in fields:
            fields[key] = float(fields[key])
    return Generation(**fields)


def _policy(data: Mapping[str, Any], section: str, problems: list) -> dict[str, Any]:
    """A [fp16]/[int8] table, its list fields checked to be lists of strings."""
    table = data.get(section, {})
    if not isinstance(table, Mapping):
        return {}
    out = {k: v for k, v in table.items() if k in _SECTIONS[section]}
    for key, value in out.items():
        is_list = key.startswith(("keep_fp32_", "exclude_")) and key != "keep_fp32_softmax"
        if is_list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            problems.append((f"{section}.{key}", "a list of strings", repr(value)))
    return out


def bind_family(profile: Profile, components: tuple[str, ...], denoiser: str | None) -> Profile:
    """`profile` for a model whose family has these components: every component gets a precision
    (fp32 unless the profile says otherwise), in the family's order; names the family does not
    have, and int8 on anything but the denoiser, are errors listing what is valid. Binding a bound
    profile again changes nothing. (denoiser None: check the names only, as before MODEL is known.)"""
    problems = []
    for key, value in profile.precision:
        if key not in components:
            problems.append((f"precision.{key}", f"one of {list(components)}", "unknown component"))
        elif value == "int8" and denoiser is not None and key != denoiser:
            problems.append((f"precision.{key}", f"fp32 or fp16 (int8 calibration covers {denoiser})", "int8"))
    unknown = [c for c in profile.fp16.keep_fp32_components if c not in components]
    if unknown:
        problems.append(("fp16.keep_fp32_components", f"names from {list(components)}", repr(unknown)))
    # requests are checked against [shapes] and the VAE's own ranges; only the VAE may differ (tiling covers it)
    own = [c for c in components if c in OWN_SHAPES]
    problems += [(f"shapes.{c}", f"a table for {' or '.join(own) or 'no component'} (the VAE may be built smaller "
                  "than the UNet; the others follow [shapes])", "a table for " + c)
                 for c, _ in profile.component_shapes if c not in own]
    if problems:
        raise ProfileError(f"profile '{profile.name}' does not fit this model's components:\n"
                           + format_table(["field", "expected", "found"], problems))
    given = dict(profile.precision)
    bound = tuple((c, given.get(c, "fp32")) for c in components)
    return replace(profile, precision=bound, denoiser=denoiser or profile.denoiser).with_keep_fp32()


def default_profile(name: str, source: str, native_height: int, native_width: int, size_multiple: int) -> Profile:
    """Shape ranges from the model's own config: opt native, min half, max double, batch 1-4."""

    def around(native: int) -> list[int]:
        opt = _round_to(native, size_multiple)  # a native size the UNet cannot take exactly: the nearest it can
        low = min(opt, max(size_multiple, _round_to(native // 2, size_multiple)))
        return [low, opt, max(opt, _round_to(native * 2, size_multiple))]

    data = {"shapes": {"batch": [1, 1, 4], "height": around(native_height), "width": around(native_width)}}
    return profile_from_dict(name, data, origin=f"default profile of {source}", source=source)


def check_size_multiple(profile: Profile, size_multiple: int) -> None:
    """Every height/width bound must be a multiple of the model's size multiple."""
    ranges = [(f"shapes.{key}", getattr(profile, key)) for key in ("height", "width")]
    ranges += [(f"shapes.{c}.{key}", r) for c, own in profile.component_shapes for key, r in own]
    problems = [(field, f"multiples of {size_multiple}", r.as_list()) for field, r in ranges
                if any(v % size_multiple for v in r.as_list())]
    if problems:
        raise ProfileError(
            f"profile '{profile.name}' does not fit model {profile.source}: image sizes must be multiples of "
            f"{size_multiple} (VAE factor x UNet upsampling)\n" + format_table(["field", "expected", "found"], problems)
        )


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _is_range(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        and value[0] <= value[1] <= value[2]
    )
