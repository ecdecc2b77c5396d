"""Dynamic batching for a loaded pipeline (asyncio).

Requests that can share one engine call (same size, steps, guidance, scheduler and LoRA set) are collected
until `max_batch` of them are waiting or `max_wait` seconds have passed since the first, then run
as one pipeline call in which every request keeps its own prompt, negative prompt and seeded
generator, so its image is the one it would get alone. Groups are split at the artifact's max batch.
The queue is bounded: past `max_queue` waiting requests, `submit` refuses at once (QueueFullError).
A batch that fails fails its own requests with that error; the batcher goes on with the next.
Engines are not thread-safe, so one worker thread runs the batches, one at a time.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from runtime.errors import OptionsError, QueueFullError, RequestError, ShuttingDownError

log = logging.getLogger(__name__)

__all__ = ["Batcher", "BatcherStats", "ImageRequest", "QueueFullError", "generate_images", "normalize_request",
           "split_groups"]
PER_REQUEST = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "seed")  # may differ inside one call
# fields only some families take (RuntimeFamily.request_fields); None: not given
FAMILY_FIELDS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size")
_COUNTING_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ImageRequest:
    """One image. None leaves a field to the artifact: its native size, its family's default steps
    and guidance (runtime.families), its own scheduler."""

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    scheduler: str | None = None
    # SDXL: the second text encoder's prompts (default: prompt, negative_prompt) and the size
    # conditions, (height, width) in pixels (default: the image size, and no crop)
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    # the LoRA set, as (name, weight) pairs of LoRAs the service registered (runtime/lora_serving.py);
    # a list of names or a {name: weight} dict is accepted and made into pairs by normalize_request
    loras: Any = ()

    # set by normalize_request where the pipeline encodes a missing negative prompt as zeros (SDXL's
    # force_zeros_for_empty_prompt), not as "": such requests cannot share a call with ones that have one
    zero_negative: bool = False

    def group_key(self) -> tuple:
        """Requests with equal keys can share one engine call: every field but the per-request ones."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in PER_REQUEST)


@dataclass
class _Pending:
    request: ImageRequest
    future: asyncio.Future
    info: dict | None = None  # filled with batch_size and queue_wait_s when the batch runs
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    requests: int = 0  # queued
    errors: int = 0  # requests whose batch failed
    refused: int = 0  # turned away by a full queue
    dropped: int = 0  # queued, then left (client gone, deadline passed) before their batch started
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)


class EngineWorker:
    """The one thread that runs the engines (they are not thread-safe). A daemon thread: a call
    that hangs in an engine cannot keep the process from exiting."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kiln-engines", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

    def run(self, fn, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def close(self) -> None:
        self._jobs.put(None)


def _settle(future: asyncio.Future, result, exc) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def split_groups(pending: list, key: Callable[[Any], tuple], limit: int) -> list[list]:
    """Group items by key (first-come order kept), then cut each group into chunks of at most `limit`."""
    groups: OrderedDict[tuple, list] = OrderedDict()
    for item in pending:
        groups.setdefault(key(item), []).append(item)
    return [g[i:i + limit] for g in groups.values() for i in range(0, len(g), limit)]


class Batcher:
    """`await batcher.submit(request)` → a PIL image. Start with `start()` inside a running loop;
    `stop()` finishes what is queued and in flight, then stops."""

    def __init__(self, pipe, max_batch: int = 8, max_wait: float = 0.1, max_queue: int = 64,
                 truncate_prompts: bool = False):
        if max_batch < 1 or max_wait < 0 or max_queue < 1:
            raise OptionsError(f"max_batch >= 1, max_wait >= 0 and max_queue >= 1 are required; got {max_batch}, "
                            f"{max_wait}, {max_queue}")
        self.pipe = pipe
        artifact_max = pipe.manifest.shape_range("batch")[2]
        self.max_batch = min(max_batch, artifact_max)
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._queue: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._worker = EngineWorker()
        self._stopping = False
        self._base_scheduler = pipe.scheduler.config
        self.truncate_prompts = truncate_prompts
        counting_tokenizer(pipe)  # made now, before the worker thread uses the pipeline's own
        if getattr(pipe, "tokenizer_2", None) is not None:
            counting_tokenizer(pipe, second=True)
        self.last_batch_seconds = 1.0
        self.running_since: float | None = None  # perf_counter() when the batch in flight started

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch in flight."""
        return not self._queue and self.running_since is None

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, timeout: float | None = None) -> bool:
        """Refuse new requests, finish what is queued and in flight (at most `timeout` seconds),
        then stop. False when time ran out (a batch still running, e.g. a hung engine)."""
        self._stopping = True
        if self._wakeup:
            self._wakeup.set()
        finished = True
        if self._task:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                finished = False
                self.abort_queued(ShuttingDownError("the server stopped before this request's turn; retry"))
        self._worker.close()
        return finished

    def abort_queued(self, error: Exception) -> int:
        """Answer every queued request (not the batch in flight) with `error`; how many there were."""
        pending, self._queue = self._queue, []
        for p in pending:
            if not p.future.done():
                p.future.set_exception(error)
        return len(pending)

    async def submit(self, request: ImageRequest, info: dict | None = None):
        """The image for `request`; `info`, if given, gets the batch's size and the queue wait."""
        if self._stopping:
            raise ShuttingDownError("the server is shutting down; retry on another replica")
        # ShapeError and friends: this request only, before it queues
        request = normalize_request(self.pipe, request, self.truncate_prompts)
        if len(self._queue) >= self.max_queue:
            self.stats.refused += 1
            raise QueueFullError(len(self._queue), max(1.0, self.last_batch_seconds))
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(request, future, info)
        self._queue.append(pending)
        self.stats.requests += 1
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:  # the client left or its deadline passed: out of the queue at once
            if pending in self._queue:
                self._queue.remove(pending)
                self.stats.dropped += 1
            raise

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                if self._stopping:
                    return
                continue
            # Wait for a full batch of the first request's kind, or max_wait after it arrived.
            first = self._queue[0]
            deadline = first.enqueued + self.max_wait
            while not self._stopping:
                same = sum(1 for p in self._queue if p.request.group_key() == first.request.group_key())
                remaining = deadline - time.perf_counter()
                if same >= self.max_batch or remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                    self._wakeup.clear()
                except asyncio.TimeoutError:
                    break
            group = split_groups([p for p in self._queue if p.request.group_key() == first.request.group_key()],
                                 lambda p: p.request.group_key(), self.max_batch)[0]
            for p in group:
                self._queue.remove(p)
            live = [p for p in group if not p.future.cancelled()]  # clients that left are not computed
            self.stats.dropped += len(group) - len(live)
            if live:
                await self._run_batch(live)
            if self._queue:
                self._wakeup.set()
            elif self._stopping:
                return

    async def _run_batch(self, batch: list[_Pending]) -> None:
        started = self.running_since = time.perf_counter()
        for p in batch:
            if p.info is not None:
                p.info.update(batch_size=len(batch), queue_wait_s=started - p.enqueued)
        try:
            images = await self._worker.run(self._generate, [p.request for p in batch])
        except Exception as exc:  # the batch's error is its requests' error; the batcher goes on
            self.stats.errors += len(batch)
            log.warning("batch of %d failed: %s", len(batch), exc)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self.last_batch_seconds = time.perf_counter() - started
            self.running_since = None
        self.stats.batches += 1
        self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
        for p, image in zip(batch, images):
            if not p.future.done():  # a client that went away gets nothing; its neighbours are unaffected
                p.future.set_result(image)

    def _generate(self, requests: list[ImageRequest]):
        return generate_images(self.pipe, requests, self._base_scheduler)


def normalize_request(pipe, request: ImageRequest, truncate_prompts: bool = False) -> ImageRequest:
    """`request` with the model's native size and its family's defaults filled in, checked against
    the engines (size range and multiple, steps, scheduler name, prompt length unless
    `truncate_prompts`); raises the error that request alone deserves (a RequestError naming the field)."""
    from runtime import families
    from runtime.lora_serving import request_loras
    from runtime.requests import check_request
    from runtime.schedulers import scheduler_from_name

    family = families.get(pipe.manifest.family)
    defaults = families.request_defaults(pipe.manifest)
    height, width = pipe.request_size({"height": request.height, "width": request.width})
    request = replace(request, height=height, width=width,
                      steps=defaults["steps"] if request.steps is None else request.steps,
                      guidance_scale=defaults["guidance_scale"] if request.guidance_scale is None else request.guidance_scale)
    check_request(pipe.manifest, height=height, width=width, batch=1)
    request = replace(request, loras=request_loras(pipe, request.loras))
    if request.negative_prompt and not family.negative_prompt:
        raise RequestError(f"this model ({pipe.manifest.family}) takes no negative prompt; leave it out",
                           field="negative_prompt")
    zeroes = bool(getattr(pipe, "config", {}).get("force_zeros_for_empty_prompt", False))
    request = replace(request, zero_negative=zeroes and not (request.negative_prompt or request.negative_prompt_2))
    for name in ("original_size", "crops_coords_top_left", "target_size"):
        value = getattr(request, name)
        if value is not None:
            if not (isinstance(value, (tuple, list)) and len(value) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
                raise RequestError(f"{name} is (height, width) in pixels, two integers >= 0; got {value!r}", field=name)
            request = replace(request, **{name: tuple(value)})
    for name in FAMILY_FIELDS:
        if getattr(request, name) is not None and name not in family.request_fields:
            raise RequestError(f"this model ({pipe.manifest.family}) takes no {name}; leave it out"
                               + (f" (it takes {', '.join(family.request_fields)})" if family.request_fields else ""),
                               field=name)
    if request.steps < 1:
        raise RequestError(f"steps must be >= 1, got {request.steps}", field="steps")
    if request.scheduler:
        scheduler_from_name(request.scheduler, pipe.scheduler.config, family.schedulers)  # raises for an unknown name
    if not truncate_prompts:
        for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
            if getattr(request, name):  # the _2 prompts exist only where the family takes them (checked above)
                check_prompt_length(counting_tokenizer(pipe, name.endswith("_2")), getattr(request, name), name)
    return request


def counting_tokenizer(pipe, second: bool = False):
    """A copy of the pipeline's tokenizer for counting prompts while the engine thread encodes them:
    a tokenizer keeps its truncation and padding settings on the object, so two threads calling one
    tokenizer corrupt each other's calls (seen in the soak test: unpadded input_ids in a batch)."""
    copies = _COUNTING_TOKENIZERS.setdefault(pipe, {})
    if second not in copies:
        copies[second] = copy.deepcopy(pipe.tokenizer_2 if second else pipe.tokenizer)
    return copies[second]


def check_prompt_length(tokenizer, text: str | None, field_name: str = "prompt") -> None:
    """RequestError when `text` has more tokens than the text encoder reads (diffusers would cut
    the rest off silently)."""
    if not text:
        return
    limit = tokenizer.model_max_length
    count = len(tokenizer(text, truncation=False).input_ids)
    if count > limit:
        raise RequestError(f"{field_name} is {count} tokens long and the text encoder reads at most {limit} (start and "
                           "end tokens included); shorten it, or serve with --truncate-prompts to cut it off",
                           field=field_name)


def generate_images(pipe, requests: list[ImageRequest], base_scheduler_config):
    """One pipeline call for requests of one group, each with its own seeded generator (not thread-safe:
    call from one thread per pipeline). Requests are normalized here too (idempotent), so callers
    may pass them as built."""
    import torch

    from runtime.lora_serving import apply_loras
    from runtime.schedulers import scheduler_from_name

    requests = [normalize_request(pipe, r, truncate_prompts=True) for r in requests]  # length: the caller's policy
    r0 = requests[0]
    if any(r.group_key() != r0.group_key() for r in requests):
        raise RequestError("requests of different size, steps, guidance, scheduler or LoRAs cannot share one call")
    apply_loras(pipe, r0.loras)  # the engines hold this set's weights (a no-op when they already do)
    # None is the artifact's own scheduler, whatever an earlier batch switched to
    pipe.scheduler = scheduler_from_name(r0.scheduler or base_scheduler_config["_class_name"], base_scheduler_config)
    negative = [r.negative_prompt or "" for r in requests]
    extra = {}
    if any(r.prompt_2 is not None for r in requests):  # diffusers' default for each: its own prompt
        extra["prompt_2"] = [r.prompt if r.prompt_2 is None else r.prompt_2 for r in requests]
    if any(r.negative_prompt_2 is not None for r in requests):
        extra["negative_prompt_2"] = [n if r.negative_prompt_2 is None else r.negative_prompt_2
                                      for r, n in zip(requests, negative)]
    for name in ("original_size", "crops_coords_top_left", "target_size"):
        if getattr(r0, name) is not None:
            extra[name] = tuple(getattr(r0, name))
    return pipe(
        prompt=[r.prompt for r in requests],
        negative_prompt=None if r0.zero_negative else negative if any(negative) or "negative_prompt_2" in extra else None,
        height=r0.height, width=r0.width, num_inference_steps=r0.steps, guidance_scale=r0.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests], **extra,
    ).images
