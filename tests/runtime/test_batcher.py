"""The batcher: same images as alone, grouping rules, bounded queue, errors stay in their batch."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from runtime import load_pipeline
from runtime.batcher import Batcher, ImageRequest, QueueFullError, generate_images, normalize_request, split_groups
from runtime.errors import OptionsError, RequestError, ShapeError, ShuttingDownError


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    p = load_pipeline(tiny_artifact)
    p.set_progress_bar_config(disable=True)
    return p


def _serve(pipe, requests, **kw):
    async def main():
        batcher = Batcher(pipe, **kw)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True), batcher.stats
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_batched_images_equal_the_single_request_images(pipe):
    requests = [ImageRequest("a red fox", seed=1, steps=4), ImageRequest("a lighthouse", "blurry", seed=2, steps=4),
                ImageRequest("a red fox", seed=3, steps=4)]
    batched, stats = _serve(pipe, requests, max_batch=8, max_wait=0.5)
    assert stats.batch_sizes == {3: 1}  # one engine call for all three
    for request, image in zip(requests, batched):
        (alone,), _ = _serve(pipe, [request], max_batch=1)
        assert np.abs(np.asarray(alone, dtype=np.float32) - np.asarray(image, dtype=np.float32)).max() <= 2
    assert np.asarray(batched[0]).tolist() != np.asarray(batched[2]).tolist()  # seeds differ, images differ


def test_grouping_rules(pipe):
    a = ImageRequest("x", steps=2, height=64, width=64)
    b = ImageRequest("y", steps=2, height=64, width=64, seed=5, negative_prompt="z")  # same group as a
    c = ImageRequest("x", steps=3, height=64, width=64)  # other step count
    d = ImageRequest("x", steps=2, height=64, width=128)  # other size
    e = ImageRequest("x", steps=2, height=64, width=64, scheduler="euler")  # other scheduler
    f = ImageRequest("x", steps=2, height=64, width=64, guidance_scale=3.0)  # other guidance
    groups = split_groups([a, b, c, d, e, f, a, a], ImageRequest.group_key, limit=3)
    assert groups == [[a, b, a], [a], [c], [d], [e], [f]]  # split at the limit, first-come order kept
    _, stats = _serve(pipe, [a, b, c, d, e, f], max_batch=8, max_wait=0.3)
    assert stats.batches == 5 and stats.batch_sizes == {2: 1, 1: 4}


def test_groups_are_split_at_the_artifacts_max_batch(pipe):
    assert Batcher(pipe, max_batch=8).max_batch == 4  # tiny.toml: batch max 4
    requests = [ImageRequest(f"p{i}", steps=1, height=64, width=64, seed=i) for i in range(6)]
    _, stats = _serve(pipe, requests, max_batch=8, max_wait=0.3)
    assert stats.batch_sizes == {4: 1, 2: 1}


def test_full_queue_refuses_at_once(pipe):
    requests = [ImageRequest(f"p{i}", steps=1, height=64, width=64) for i in range(5)]
    results, stats = _serve(pipe, requests, max_batch=1, max_queue=2, max_wait=0.0)
    refused = [r for r in results if isinstance(r, QueueFullError)]
    assert len(refused) == 3 and stats.refused == 3 and "queue is full" in str(refused[0])
    assert refused[0].retry_after >= 1


def test_an_error_in_one_batch_does_not_stop_the_next(pipe, monkeypatch):
    batcher_generate = Batcher._generate

    def fail_on_boom(self, requests):
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("engine exploded")
        return batcher_generate(self, requests)

    monkeypatch.setattr(Batcher, "_generate", fail_on_boom)
    requests = [ImageRequest("boom", steps=1, height=64, width=64), ImageRequest("fine", steps=2, height=64, width=64)]
    results, stats = _serve(pipe, requests, max_batch=4, max_wait=0.2)
    assert isinstance(results[0], RuntimeError) and "engine exploded" in str(results[0])
    assert results[1].size == (64, 64) and stats.errors == 1 and stats.batches == 1


def test_a_client_that_leaves_does_not_break_its_batch(pipe):
    async def main():
        batcher = Batcher(pipe, max_batch=4, max_wait=0.3)
        batcher.start()
        leaving = asyncio.ensure_future(batcher.submit(ImageRequest("gone", steps=2, height=64, width=64)))
        staying = asyncio.ensure_future(batcher.submit(ImageRequest("here", steps=2, height=64, width=64)))
        await asyncio.sleep(0.05)
        leaving.cancel()
        image = await staying
        await batcher.stop()
        return image, leaving.cancelled()

    image, cancelled = asyncio.run(main())
    assert cancelled and image.size == (64, 64)


def test_bad_request_is_refused_before_it_queues(pipe):
    (result,), stats = _serve(pipe, [ImageRequest("x", height=1024, width=64)])
    assert isinstance(result, ShapeError) and "64..256" in str(result) and stats.requests == 0
    assert result.field == "height"
    with pytest.raises(ShapeError) as err:
        normalize_request(pipe, ImageRequest("x", height=64, width=100))
    assert err.value.field == "width"
    with pytest.raises(RequestError) as err:
        normalize_request(pipe, ImageRequest("x", steps=0))
    assert err.value.field == "steps"


def test_defaults_come_from_the_family(pipe):
    request = normalize_request(pipe, ImageRequest("x"))
    assert (request.height, request.width, request.steps, request.guidance_scale) == (128, 128, 20, 7.5)
    # generate_images fills them in too, for callers that pass requests as built
    (image,) = generate_images(pipe, [ImageRequest("x", height=64, width=64, steps=1)], pipe.scheduler.config)
    assert image.size == (64, 64)


def test_bad_batcher_options():
    with pytest.raises(OptionsError, match="max_batch >= 1"):
        Batcher(None, max_batch=0)


def test_stop_finishes_what_is_queued_and_refuses_new_requests(pipe):
    from runtime.errors import KilnError

    async def main():
        batcher = Batcher(pipe, max_batch=1, max_wait=0.0)
        batcher.start()
        queued = [asyncio.ensure_future(batcher.submit(ImageRequest(f"p{i}", steps=1, height=64, width=64)))
                  for i in range(3)]
        await asyncio.sleep(0)
        await batcher.stop()
        late = None
        try:
            await batcher.submit(ImageRequest("late", steps=1, height=64, width=64))
        except KilnError as exc:
            late = exc
        return [f.result().size for f in queued], late

    sizes, late = asyncio.run(main())
    assert sizes == [(64, 64)] * 3 and isinstance(late, ShuttingDownError) and "shutting down" in str(late)


def test_a_request_without_scheduler_gets_the_artifacts_own_after_another_ran(pipe):
    plain = ImageRequest("a red fox", seed=1, steps=3, height=64, width=64)
    (before,), _ = _serve(pipe, [plain])
    _, after = _serve(pipe, [ImageRequest("x", steps=3, height=64, width=64, scheduler="euler-a"), plain],
                      max_batch=1, max_wait=0.0)[0]
    assert np.asarray(after).tolist() == np.asarray(before).tolist()
