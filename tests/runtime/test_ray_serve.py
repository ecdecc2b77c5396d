"""The Ray Serve deployment answers a request on a local CPU cluster."""
from __future__ import annotations

import io

import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the serving extra (pip install 'kiln[serve]') is not installed")


def test_ray_deployment_answers(tiny_artifact):
    from ray import serve

    from runtime.ray_serve import kiln_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(kiln_app(str(tiny_artifact), max_wait=0.2), name="kiln-test", route_prefix=None)
        bodies = [{"prompt": "a cat", "steps": 2, "height": 64, "width": 64, "seed": s} for s in (1, 2)]
        responses = [handle.image.remote(b) for b in bodies]
        images = [Image.open(io.BytesIO(r.result(timeout_s=120))) for r in responses]
        assert [i.size for i in images] == [(64, 64), (64, 64)]
        assert images[0].tobytes() != images[1].tobytes()
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_deployment_admits_full_batches():
    """Serve's default of 5 requests per replica would cap every batch at 5 (Serve warns so)."""
    pytest.importorskip("ray.serve")
    from runtime.ray_serve import kiln_deployment

    assert kiln_deployment(max_batch=8).max_ongoing_requests >= 8
