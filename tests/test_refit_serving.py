"""Per-request LoRAs: the batcher groups requests by LoRA set and each image is the one the pipeline
gives with that set; the HTTP body names LoRAs the service registered (422 otherwise) and /metrics
counts the swaps (Ray Serve: tests/runtime/test_ray_serve.py); `kiln bench --lora` reports the swap
beside a rebuild."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from runtime.batcher import Batcher, ImageRequest
from runtime.errors import OptionsError, RequestError
from runtime.lora_serving import register_loras, request_loras


@pytest.fixture(scope="module")
def served(refittable, tmp_path_factory):
    """The refittable tiny-sd15 pipeline with LoRAs a (default weight 0.8) and b (1.0) registered."""
    from exporters.builtin import ensure_builtin
    from runtime import load_pipeline
    from tests.loras import make_lora

    folder = ensure_builtin("tiny-sd15")
    a, b = (make_lora(folder, tmp_path_factory.mktemp("lora") / name, seed=seed) for name, seed in (("a", 21), ("b", 22)))
    pipe = load_pipeline(refittable("tiny-sd15"))
    pipe.set_progress_bar_config(disable=True)
    register_loras(pipe, (("a", str(a), 0.8), ("b", str(b), 1.0)), cache_size=2)
    return pipe, {"a": a, "b": b}


def _alone(pipe, request: ImageRequest, loras) -> np.ndarray:
    pipe.set_adapters([n for n, _ in loras], [w for _, w in loras])
    image = pipe(prompt=request.prompt, num_inference_steps=request.steps, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(request.seed)).images[0]
    pipe.set_adapters([])
    return np.asarray(image, dtype=np.float32)


def test_request_loras_are_checked_and_canonical(served):
    pipe, _ = served
    assert request_loras(pipe, None) == ()
    assert request_loras(pipe, ["b", "a"]) == (("a", 0.8), ("b", 1.0))  # default weights, sorted: one batch key
    assert request_loras(pipe, {"a": 0.3}) == (("a", 0.3),)
    for value, match in (({"c": 1.0}, "no LoRA named 'c' here; this service serves a, b"),
                         ({"a": float("nan")}, "must be a number within"), ({"a": 11}, "within ±10"),
                         ("a", "a list of names or a")):
        with pytest.raises(RequestError, match=match):
            request_loras(pipe, value)
    with pytest.raises(OptionsError, match="a given more than once"):
        register_loras(pipe, (("a", "x", 1.0), ("a", "y", 1.0)))


def test_the_batcher_groups_by_lora_set_and_each_image_is_that_sets(served):
    pipe, _ = served
    requests = [ImageRequest("a red fox", seed=1, steps=2, height=64, width=64),
                ImageRequest("a red fox", seed=1, steps=2, height=64, width=64, loras={"a": 0.8}),
                ImageRequest("a lighthouse", seed=2, steps=2, height=64, width=64, loras=["a"]),
                ImageRequest("a red fox", seed=1, steps=2, height=64, width=64, loras={"a": 0.5, "b": 0.7})]

    async def main():
        batcher = Batcher(pipe, max_batch=8, max_wait=0.3)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(r) for r in requests)), batcher.stats
        finally:
            await batcher.stop()

    swaps = pipe.lora_refit.swaps
    images, stats = asyncio.run(main())
    assert sorted(stats.batch_sizes.items()) == [(1, 2), (2, 1)]  # base, {a: 0.8} x2, {a: 0.5, b: 0.7}
    assert pipe.lora_refit.swaps > swaps
    sets = [(), (("a", 0.8),), (("a", 0.8),), (("a", 0.5), ("b", 0.7))]
    for request, image, loras in zip(requests, images, sets):
        assert np.abs(np.asarray(image, dtype=np.float32) - _alone(pipe, request, loras)).max() <= 2
    assert np.abs(np.asarray(images[0], np.float32) - np.asarray(images[1], np.float32)).max() > 2  # the LoRA shows


def test_http_bodies_name_loras_and_metrics_count_swaps(served):
    pytest.importorskip("fastapi", reason="the serving extra is not installed")
    from fastapi.testclient import TestClient

    from runtime.server import ServeOptions, create_app

    pipe, _ = served
    with TestClient(create_app(None, ServeOptions(max_wait=0.01), pipe=pipe)) as client:
        body = {"prompt": "a cat", "height": 64, "width": 64, "steps": 2, "seed": 3}
        plain = client.post("/v1/images", json=body, headers={"Accept": "image/png"})
        styled = client.post("/v1/images", json={**body, "loras": {"b": 1.0}}, headers={"Accept": "image/png"})
        assert plain.status_code == styled.status_code == 200 and plain.content != styled.content
        r = client.post("/v1/images", json={**body, "loras": {"nope": 1.0}})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "loras"]
        assert "no LoRA named 'nope'" in r.json()["detail"][0]["msg"]
        metrics = client.get("/metrics").text
    swaps = [line for line in metrics.splitlines() if line.startswith("kiln_lora_swaps_total ")]
    seconds = [line for line in metrics.splitlines() if line.startswith("kiln_lora_swap_seconds_total ")]
    assert swaps and float(swaps[0].split()[1]) == pipe.lora_refit.swaps >= 2
    assert seconds and float(seconds[0].split()[1]) > 0


def test_a_service_without_loras_refuses_a_body_naming_one(tiny_artifact):
    from runtime import load_pipeline
    from runtime.batcher import normalize_request

    with pytest.raises(RequestError, match="serves no LoRAs; start it with --lora NAME=PATH"):
        normalize_request(load_pipeline(tiny_artifact), ImageRequest("a cat", loras=["style"]))


def test_bench_reports_the_swap_beside_a_rebuild_and_a_call(served, refittable):
    from kiln.bench.lora_swap import format_lora_swap, lora_swap_bench

    _, files = served
    report = lora_swap_bench(refittable("tiny-sd15"), str(files["a"]), runs=2, steps=2)
    from tests.loras import TEXT_TARGETS, UNET_TARGETS

    manifest = json.loads((refittable("tiny-sd15") / "manifest.json").read_text())["components"]
    targeted = {module: sum(any(p.endswith(f".{t}.weight") for t in targets) for p in manifest[module]["refit"]["params"])
                for module, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS))}
    assert report["lora_weights"] == targeted and targeted["unet"] > 0  # every attention projection, nothing else
    assert report["rebuild_seconds"] > report["swap_seconds"]["median"] > 0
    assert 0 < report["swap_over_rebuild"] < 1
    text = format_lora_swap(report)
    assert "swap: merge from base + engines" in text and "swap / rebuild:" in text
    json.dumps(report)
