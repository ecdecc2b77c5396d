"""The runtime side of the fake family: its own pipeline class, text-to-image only, its own request
defaults."""
from __future__ import annotations

from runtime.families import RuntimeFamily
from runtime.families.sd import TASKS, EnginePipeline, assemble_sd


class FakeEnginePipeline(EnginePipeline):
    """The fake family's pipeline (a StableDiffusionPipeline underneath)."""


FAMILY = RuntimeFamily(name="fake", tasks={"text2img": TASKS["text2img"]},
                       assemble=assemble_sd({"text2img": FakeEnginePipeline}),
                       request_defaults={"steps": 3, "guidance_scale": 5.0})
