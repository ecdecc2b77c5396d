"""The runtime's shared pieces: atomic writes and cache locks, per-shape buffers, numerics, the
typed errors callers act on, and the UNet shim's extra conditions."""
from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest
import torch

from runtime.buffers import ShapeCache, shape_key
from runtime.errors import QueueFullError, RequestError, SchedulerError, ShapeError
from runtime.files import atomic_write_bytes, cache_lock
from runtime.numerics import cosine, max_abs_err, psnr, tolerance
from runtime.schedulers import scheduler_from_name
from runtime.shims import UNetShim
from tests.records import component_info


def test_atomic_write_keeps_the_old_content_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "cache.bin"
    atomic_write_bytes(path, b"old")

    class Boom(Exception):
        pass

    def failing_fdopen(fd, mode):
        import os

        os.close(fd)
        raise Boom()

    monkeypatch.setattr("runtime.files.os.fdopen", failing_fdopen)
    with pytest.raises(Boom):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]  # no temporary file left


def test_cache_lock_lets_one_maker_in_at_a_time(tmp_path):
    inside, overlaps = [], []

    def worker():
        with cache_lock(tmp_path / "entry"):
            if inside:
                overlaps.append(1)
            inside.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and (tmp_path / "entry.lock").exists()


def test_shape_cache_keeps_the_most_recent_shapes():
    made = []
    cache = ShapeCache(limit=2)

    def make(key):
        made.append(key)
        return key

    for key in ("a", "b", "a", "c", "b"):
        cache.get(key, lambda k=key: make(k))
    assert made == ["a", "b", "c", "b"]  # "b" was the least recently used when "c" came
    assert len(cache) == 2
    assert shape_key({"y": (1, 2), "x": [3]}) == (("x", (3,)), ("y", (1, 2)))


def test_numerics():
    ref = np.array([1.0, -4.0])
    assert tolerance(1e-4, 1e-3, ref) == pytest.approx(1e-4 + 4e-3)
    assert max_abs_err([1.5, -4.0], ref) == 0.5 and max_abs_err([np.nan, 0], ref) == float("inf")
    assert cosine([1, 0], [0, 1]) == 0.0 and cosine([0, 0], [0, 0]) == 1.0
    assert psnr(np.zeros(4), np.zeros(4)) is None and psnr(np.zeros(4), np.full(4, 0.1)) == pytest.approx(20.0)


def test_errors_carry_what_callers_act_on():
    assert ShapeError("x", field="width").field == "width" and isinstance(ShapeError("x"), RequestError)
    assert QueueFullError(3, 2.0).retry_after == 2.0
    with pytest.raises(SchedulerError, match="unknown scheduler 'nope'") as err:
        scheduler_from_name("nope", {})
    assert err.value.field == "scheduler"
    with pytest.raises(SchedulerError):  # a diffusers class that is not a scheduler
        scheduler_from_name("UNet2DConditionModel", {})


class _Engine:
    """Records the inputs it is called with; its manifest record has the given extra inputs."""

    def __init__(self, extra=()):
        info = component_info("unet")
        extra_inputs = tuple(types.SimpleNamespace(name=n) for n in extra)
        self.info = types.SimpleNamespace(inputs=info.inputs + extra_inputs)
        self.calls = []

    def __call__(self, **inputs):
        self.calls.append(inputs)
        return {"model_output": torch.zeros_like(inputs["sample"])}


def _args():
    return torch.zeros(2, 4, 8, 8), torch.tensor(10.0), torch.zeros(2, 77, 32)


def test_unet_shim_passes_extra_conditions_by_name():
    engine = _Engine(extra=("timestep_cond", "text_embeds", "time_ids"))
    shim = UNetShim(engine, {}, "cpu")
    cond, text, ids = torch.ones(2, 8), torch.ones(2, 16), torch.ones(2, 6)
    out = shim(*_args(), timestep_cond=cond, added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
    (call,) = engine.calls
    assert out.shape == (2, 4, 8, 8)
    assert call["timestep"].tolist() == [10.0, 10.0]  # the 0-d timestep, one per row
    assert call["timestep_cond"] is cond and call["text_embeds"] is text and call["time_ids"] is ids


def test_unet_shim_refuses_conditions_the_engine_lacks_or_needs():
    with pytest.raises(RequestError, match=r"takes the extra conditions none; this call gave \['timestep_cond'\]") as err:
        UNetShim(_Engine(), {}, "cpu")(*_args(), timestep_cond=torch.ones(2, 8))
    assert err.value.field == "timestep_cond"
    with pytest.raises(RequestError, match=r"\(missing: \['timestep_cond'\]\)"):
        UNetShim(_Engine(extra=("timestep_cond",)), {}, "cpu")(*_args())
    with pytest.raises(RequestError, match="does not support cross_attention_kwargs") as err:
        UNetShim(_Engine(), {}, "cpu")(*_args(), cross_attention_kwargs={"scale": 0.5})
    assert err.value.field == "cross_attention_kwargs"


def test_prompts_are_counted_with_a_copy_of_the_tokenizer(tmp_path):
    """The engine thread encodes with the pipeline's tokenizer while requests are counted on the
    event loop; a tokenizer keeps its padding settings on the object, so the two must not share it."""
    from runtime.batcher import counting_tokenizer
    from tests.stub_pipe import StubPipe

    pipe = StubPipe(tmp_path / "a")
    tokenizer = counting_tokenizer(pipe)
    assert tokenizer is not pipe.tokenizer and counting_tokenizer(pipe) is tokenizer
