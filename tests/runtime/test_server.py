"""The HTTP service on tiny: images, 422 per bad field, 429 when full, metrics, health."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi", reason="the serving extra (pip install 'kiln[serve]') is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from runtime import load_pipeline  # noqa: E402
from runtime.server import ServeOptions, create_app  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return load_pipeline(tiny_artifact)


@pytest.fixture
def client(pipe):
    with TestClient(create_app(None, ServeOptions(max_wait=0.01), pipe=pipe)) as c:
        yield c


def test_png_and_json_answers(client):
    body = {"prompt": "a cat", "height": 64, "width": 128, "steps": 2, "seed": 3}
    r = client.post("/v1/images", json=body, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(r.content))
    assert png.size == (128, 64)
    png_bytes = r.content
    r = client.post("/v1/images", json=body)
    data = r.json()
    assert r.status_code == 200 and data["size"] == [128, 64] and data["seed"] == 3
    assert base64.b64decode(data["image"]) == png_bytes  # same request, same seed: the same PNG either way
    assert client.get("/healthz").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert "kiln_requests_total 2" in metrics and 'kiln_http_responses_total{code="200"} 2' in metrics
    assert 'kiln_request_latency_seconds_bucket{le="+Inf"} 2' in metrics and "kiln_queue_depth 0" in metrics


@pytest.mark.parametrize("field, value, allowed", [
    ("height", 1024, "height 1024 is outside what these engines were built for: 64..256, a multiple of 64"),
    ("height", 32, "64..256"),
    ("width", 100, "width 100 is outside what these engines were built for: 64..256, a multiple of 64"),
    ("steps", 0, "greater than or equal to 1"),
    ("guidance_scale", -1, "greater than or equal to 0"),
    ("seed", -5, "greater than or equal to 0"),
    ("prompt", "", "at least 1 character"),
    ("scheduler", "nope", "unknown scheduler 'nope'"),
    ("colour", "red", "Extra inputs are not permitted"),
])
def test_bad_fields_are_422_naming_the_field(client, field, value, allowed):
    r = client.post("/v1/images", json={"prompt": "x", "steps": 1, field: value})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"][-1] == field and allowed in error["msg"]


def test_oversized_body_is_413(client):
    r = client.post("/v1/images", content=b"{" + b" " * 20000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_full_queue_is_429_with_retry_after(pipe):
    import asyncio

    import httpx

    async def main():
        app = create_app(None, ServeOptions(max_batch=1, max_wait=0, max_queue=1), pipe=pipe)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                body = {"prompt": "x", "steps": 3, "height": 64, "width": 64}
                return await asyncio.gather(*(c.post("/v1/images", json=body) for _ in range(4)))

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["detail"]


@pytest.fixture
def app_without_engines(tmp_path):
    """The service over a stand-in pipeline whose batcher answers what the test says."""
    import types

    from tests.records import write_artifact

    manifest = write_artifact(tmp_path / "a", {"name": "onnxruntime", "execution_provider": "CPUExecutionProvider"},
                              ".onnx")
    pipe = types.SimpleNamespace(manifest=manifest, scheduler=types.SimpleNamespace(config={}),
                                 set_progress_bar_config=lambda **kw: None)
    return create_app(None, ServeOptions(), pipe=pipe)


@pytest.mark.parametrize("error, status, loc", [
    ("shape", 422, ["body", "width"]),
    ("steps", 422, ["body", "steps"]),
    ("scheduler", 422, ["body", "scheduler"]),
    ("engine shape", 422, ["body"]),
    ("draining", 503, None),
    ("engine", 500, None),
])
def test_statuses_follow_the_error_type(app_without_engines, error, status, loc):
    from runtime.errors import RequestError, SchedulerError, ShapeError, ShuttingDownError

    errors = {"shape": ShapeError("too wide", field="width"), "steps": RequestError("no steps", field="steps"),
              "scheduler": SchedulerError("unknown scheduler 'x'"), "draining": ShuttingDownError("draining"),
              "engine shape": ShapeError("unet: input 'sample' has shape [9, 4, 8, 8], outside the range"),
              "engine": RuntimeError("engine failed")}

    async def submit(request):
        raise errors[error]

    app_without_engines.state.batcher.submit = submit
    with TestClient(app_without_engines) as c:
        r = c.post("/v1/images", json={"prompt": "x"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if loc:  # 422s keep FastAPI's shape of detail
        assert detail[0]["loc"] == loc and detail[0]["msg"]
    else:
        assert isinstance(detail, str)
    assert f'kiln_http_responses_total{{code="{status}"}} 1' in c.get("/metrics").text
