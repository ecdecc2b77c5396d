"""A stand-in for an engine pipeline, for service tests that are about the service and not about
images: it answers like a diffusers pipeline (solid-colour images), can be slow, can fail, and
records what it computed. Its manifest is a real one (tests/records.py)."""
from __future__ import annotations

import threading
import time
import types

from PIL import Image

from tests.records import write_artifact


class StubTokenizer:
    """One token per word, plus start and end, as CLIP counts them; 77 at most."""

    model_max_length = 77

    def __call__(self, text, truncation=False):
        return types.SimpleNamespace(input_ids=[0, *range(len(text.split())), 0])


class StubPipe:
    def __init__(self, folder, delay: float = 0.0, started_file=None):
        from diffusers import DDIMScheduler

        self.manifest = write_artifact(folder, {"name": "onnxruntime", "execution_provider": "CPUExecutionProvider"},
                                       ".onnx")
        DDIMScheduler().save_pretrained(folder / "scheduler")
        self.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")  # as an artifact's: its config names its class
        self.tokenizer = StubTokenizer()
        self.delay = delay
        self.fail = None  # an exception to raise for prompts containing "FAIL" (for every prompt with fail_all)
        self.fail_all = False
        self.computed: list[str] = []
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.started_file = started_file  # touched when the first call starts (for tests in another process)

    def set_progress_bar_config(self, **kwargs):
        pass

    def request_size(self, a):
        return a.get("height") or 128, a.get("width") or 128

    def __call__(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, generator):
        self.started.set()
        if self.started_file is not None:
            open(self.started_file, "w").close()
        with self.lock:
            self.computed += list(prompt)
        time.sleep(self.delay)
        if self.fail is not None and (self.fail_all or any("FAIL" in p for p in prompt)):
            raise self.fail
        return types.SimpleNamespace(images=[Image.new("RGB", (width, height), (g.initial_seed() % 256, 0, 0))
                                             for g in generator])
