"""The export side of a fake family for the registry test: Stable Diffusion under another pipeline
class name. Nothing else in kiln knows it; the test registers it."""
from __future__ import annotations

import dataclasses

from exporters.families import sd

FAMILY = dataclasses.replace(sd.FAMILY, name="fake", pipeline_classes=("KilnFakePipeline",))
