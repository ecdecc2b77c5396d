"""The service's request body, one pydantic model per artifact (its size range and multiple), shared
by the HTTP service and the Ray Serve deployment so that both refuse the same requests the same way.
pydantic is imported when a model is built (the serving extra)."""
from __future__ import annotations

from runtime.batcher import ImageRequest

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1
MAX_LORAS = 16


def image_request_model(manifest):
    """The pydantic model of POST /v1/images for the engines `manifest` describes. Unknown fields,
    NaN and infinities are refused; None leaves a field to the artifact (see ImageRequest)."""
    from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

    from runtime import families

    (h_lo, _, h_hi), (w_lo, _, w_hi) = manifest.shape_range("height"), manifest.shape_range("width")
    multiple = manifest.size_multiple
    size = tuple[int, int]
    family_fields = {"prompt_2": (str | None, Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)),
                     "negative_prompt_2": (str | None, Field(default=None, max_length=MAX_PROMPT_CHARS)),
                     "original_size": (size | None, None), "crops_coords_top_left": (size | None, None),
                     "target_size": (size | None, None)}

    class ImageBody(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
        negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
        height: int | None = None
        width: int | None = None
        steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)  # None: the family's default
        guidance_scale: float | None = Field(default=None, ge=0, le=MAX_GUIDANCE)
        seed: int = Field(default=0, ge=0, le=MAX_SEED)
        scheduler: str | None = Field(default=None, max_length=100)
        # LoRAs the service registered (kiln serve --lora NAME=PATH): {name: weight}, or names at their default weight
        loras: dict[str, float] | list[str] | None = Field(default=None, max_length=MAX_LORAS)

        @field_validator("height", "width")
        @classmethod
        def _in_profile(cls, value, info):
            lo, hi = (h_lo, h_hi) if info.field_name == "height" else (w_lo, w_hi)
            if value is not None and (not lo <= value <= hi or value % multiple):
                raise ValueError(f"{info.field_name} {value} is outside what these engines were built for: "
                                 f"{lo}..{hi}, a multiple of {multiple}")
            return value

        @field_validator("*", mode="after")
        @classmethod
        def _sizes(cls, value, info):
            if info.field_name in ("original_size", "target_size") and value is not None and min(value) < 1:
                raise ValueError(f"{info.field_name} is (height, width) in pixels, both >= 1")
            if info.field_name == "crops_coords_top_left" and value is not None and min(value) < 0:
                raise ValueError("crops_coords_top_left is (top, left) in pixels, both >= 0")
            return value

        def to_request(self) -> ImageRequest:
            return ImageRequest(**{**self.model_dump(), "loras": self.loras or ()})

    # the fields the artifact's family takes beyond SD's (SDXL: prompt_2, the size conditions): the
    # others stay unknown, so that a body naming them is refused like any unknown field
    taken = {k: v for k, v in family_fields.items() if k in families.get(manifest.family).request_fields}
    return create_model(f"ImageBody_{manifest.family}", __base__=ImageBody, **taken) if taken else ImageBody


def validation_errors(exc) -> list[dict]:
    """pydantic errors as JSON-safe rows {loc, msg, type} (the raw input may hold NaN or huge ints)."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()]
