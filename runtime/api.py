"""The service's request body, one pydantic model per artifact (its size range and multiple), shared
by the HTTP service and the Ray Serve deployment so that both refuse the same requests the same way.
pydantic is imported when a model is built (the serving extra)."""
from __future__ import annotations

from runtime.batcher import ImageRequest

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1


def image_request_model(manifest):
    """The pydantic model of POST /v1/images for the engines `manifest` describes. Unknown fields,
    NaN and infinities are refused; None leaves a field to the artifact (see ImageRequest)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    (h_lo, _, h_hi), (w_lo, _, w_hi) = manifest.shape_range("height"), manifest.shape_range("width")
    multiple = manifest.size_multiple

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

        @field_validator("height", "width")
        @classmethod
        def _in_profile(cls, value, info):
            lo, hi = (h_lo, h_hi) if info.field_name == "height" else (w_lo, w_hi)
            if value is not None and (not lo <= value <= hi or value % multiple):
                raise ValueError(f"{info.field_name} {value} is outside what these engines were built for: "
                                 f"{lo}..{hi}, a multiple of {multiple}")
            return value

        def to_request(self) -> ImageRequest:
            return ImageRequest(**self.model_dump())

    return ImageBody


def validation_errors(exc) -> list[dict]:
    """pydantic errors as JSON-safe rows {loc, msg, type} (the raw input may hold NaN or huge ints)."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()]
