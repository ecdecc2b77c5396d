"""The HTTP service: images on tiny (422 per bad field, token limits, 429), and, on a stand-in
pipeline, what every request is answered: body limits, deadlines, disconnects, statuses by error,
health and readiness, metrics, the API key and JSON logs."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import threading
import time

import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi", reason="the serving extra (pip install 'kiln[serve]') is not installed")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from runtime.server import ServeOptions, create_app  # noqa: E402
from tests.stub_pipe import StubPipe  # noqa: E402


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- on tiny --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    from runtime import load_pipeline

    return load_pipeline(tiny_artifact)


@pytest.fixture
def client(pipe):
    with TestClient(create_app(None, ServeOptions(max_wait=0.01), pipe=pipe)) as c:
        yield c


def test_png_and_json_answers(client):
    body = {"prompt": "a cat", "height": 64, "width": 128, "steps": 2, "seed": 3}
    r = client.post("/v1/images", json=body, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and len(r.headers["x-request-id"]) == 16
    png = Image.open(io.BytesIO(r.content))
    assert png.size == (128, 64)
    png_bytes = r.content
    r = client.post("/v1/images", json=body)
    data = r.json()
    assert r.status_code == 200 and data["size"] == [128, 64] and data["seed"] == 3
    assert base64.b64decode(data["image"]) == png_bytes  # same request, same seed: the same PNG either way
    assert client.get("/healthz").json()["status"] == "ok" and client.get("/readyz").json()["status"] == "ready"
    metrics = client.get("/metrics").text
    assert "# HELP kiln_http_responses_total" in metrics
    assert _metric(metrics, "kiln_requests_total") == 2 and _metric(metrics, 'kiln_http_responses_total{code="200"}') == 2
    assert _metric(metrics, 'kiln_request_latency_seconds_count{code="200"}') == 2
    assert _metric(metrics, "kiln_queue_depth") == 0


@pytest.mark.parametrize("field, value, allowed", [
    ("height", 1024, "height 1024 is outside what these engines were built for: 64..256, a multiple of 64"),
    ("height", 32, "64..256"),
    ("width", 100, "width 100 is outside what these engines were built for: 64..256, a multiple of 64"),
    ("steps", 0, "greater than or equal to 1"),
    ("steps", 10**9, "less than or equal to 200"),
    ("guidance_scale", -1, "greater than or equal to 0"),
    ("seed", -5, "greater than or equal to 0"),
    ("seed", 2**64, "less than or equal to 9223372036854775807"),
    ("prompt", "", "at least 1 character"),
    ("scheduler", "nope", "unknown scheduler 'nope'"),
    ("colour", "red", "Extra inputs are not permitted"),
])
def test_bad_fields_are_422_naming_the_field(client, field, value, allowed):
    r = client.post("/v1/images", json={"prompt": "x", "steps": 1, field: value})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"][-1] == field and allowed in error["msg"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_guidance_is_422(client, literal):
    r = client.post("/v1/images", content=f'{{"prompt": "x", "guidance_scale": {literal}}}'.encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == "guidance_scale"


def test_a_prompt_longer_than_the_text_encoder_reads_is_422(pipe):
    long = "lighthouse " * 10
    count = len(pipe.tokenizer(long).input_ids)  # tiny's tokenizer has no merges: a token a letter
    assert count > 77
    with TestClient(create_app(None, ServeOptions(max_wait=0.01), pipe=pipe)) as c:
        r = c.post("/v1/images", json={"prompt": long, "steps": 1, "height": 64, "width": 64})
        assert r.status_code == 422
        (error,) = r.json()["detail"]
        assert error["loc"] == ["body", "prompt"] and f"is {count} tokens long" in error["msg"] and "at most 77" in error["msg"]
        r = c.post("/v1/images", json={"prompt": "x", "negative_prompt": long, "steps": 1, "height": 64, "width": 64})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "negative_prompt"]
    with TestClient(create_app(None, ServeOptions(max_wait=0.01, truncate_prompts=True), pipe=pipe)) as c:
        assert c.post("/v1/images", json={"prompt": long, "steps": 1, "height": 64, "width": 64}).status_code == 200


def test_oversized_body_is_413(client):
    r = client.post("/v1/images", content=b"{" + b" " * 20000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_full_queue_is_429_with_retry_after(pipe):
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


# ---- on a stand-in pipeline ------------------------------------------------------------------------


@pytest.fixture
def stub(tmp_path):
    return StubPipe(tmp_path / "artifact")


def _asgi(app, requests, pause: float = 0.0):
    """Send `requests` [(method, path, kwargs)] concurrently to `app` (lifespan run), `pause` s apart."""
    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                         timeout=30) as c:
                async def one(i, method, path, kwargs):
                    await asyncio.sleep(i * pause)
                    return await c.request(method, path, **kwargs)

                return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))

    return asyncio.run(main())


def _session(app, steps):
    """Run `steps(client)` (a coroutine function) against `app` with its lifespan."""
    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
                return await steps(c)

    return asyncio.run(main())


async def _until(predicate, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def _post(body, **kwargs):
    return ("POST", "/v1/images", {"json": body, **kwargs})


def test_a_chunked_body_over_the_limit_is_413_counted_as_read(stub):
    async def chunks(n):
        yield b'{"prompt": "'
        for _ in range(n):
            yield b"x" * 1024
        yield b'"}'

    app = create_app(None, ServeOptions(max_wait=0), pipe=stub)
    json_type = {"content-type": "application/json"}
    big, small = _asgi(app, [("POST", "/v1/images", {"content": chunks(1024), "headers": json_type}),  # 1 MiB, chunked
                             ("POST", "/v1/images", {"content": chunks(1), "headers": json_type})])
    assert big.status_code == 413 and "over the limit of 16384 bytes" in big.json()["detail"]
    assert small.status_code == 200 and stub.computed == ["x" * 1024]


@pytest.mark.parametrize("error, status, loc", [
    ("shape", 422, ["body", "width"]),
    ("steps", 422, ["body", "steps"]),
    ("scheduler", 422, ["body", "scheduler"]),
    ("engine shape", 422, ["body"]),
    ("draining", 503, None),
    ("engine", 500, None),
])
def test_statuses_follow_the_error_type(stub, error, status, loc):
    from runtime.errors import RequestError, SchedulerError, ShapeError, ShuttingDownError

    errors = {"shape": ShapeError("too wide", field="width"), "steps": RequestError("no steps", field="steps"),
              "scheduler": SchedulerError("unknown scheduler 'x'"), "draining": ShuttingDownError("draining"),
              "engine shape": ShapeError("unet: input 'sample' has shape [9, 4, 8, 8], outside the range"),
              "engine": RuntimeError("engine failed")}
    app = create_app(None, ServeOptions(), pipe=stub)
    with TestClient(app) as c:
        async def submit(request, info=None):
            raise errors[error]

        app.state.batcher.submit = submit
        r = c.post("/v1/images", json={"prompt": "x"})
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        if loc:  # 422s keep FastAPI's shape of detail
            assert detail[0]["loc"] == loc and detail[0]["msg"]
        else:
            assert isinstance(detail, str)
        assert _metric(c.get("/metrics").text, f'kiln_http_responses_total{{code="{status}"}}') == 1


def test_an_engine_failure_is_500_with_a_request_id_and_no_internal_text(stub, caplog):
    stub.fail = RuntimeError("/secret/path/unet.onnx: Non-zero status code returned while running Conv node")
    app = create_app(None, ServeOptions(max_wait=0), pipe=stub)
    with caplog.at_level(logging.ERROR, logger="runtime.server"):
        (r,) = _asgi(app, [_post({"prompt": "FAIL now"})])
    assert r.status_code == 500
    rid = r.headers["x-request-id"]
    assert r.json() == {"detail": f"generation failed (request {rid}); the server log has the details"}
    assert "/secret/path" not in r.text and f"request {rid}: generation failed" in caplog.text


def test_past_its_deadline_a_request_is_504_and_dropped_if_not_started(tmp_path):
    stub = StubPipe(tmp_path / "a", delay=1.5)
    app = create_app(None, ServeOptions(max_batch=1, max_wait=0, request_timeout=0.5), pipe=stub)

    async def steps(c):
        first = asyncio.ensure_future(c.post("/v1/images", json={"prompt": "first"}))
        await _until(stub.started.is_set)  # the first is computing; the second waits behind it
        second = await c.post("/v1/images", json={"prompt": "second"})
        return await first, second

    first, second = _session(app, steps)
    assert (first.status_code, second.status_code) == (504, 504)
    assert "deadline of 0.5 s" in second.json()["detail"]
    assert stub.computed == ["first"]  # the second never started: its deadline passed in the queue


def test_a_client_that_leaves_is_not_computed(tmp_path):
    """Real uvicorn on loopback: six clients send a request and close the connection at once while
    the worker is busy; none of the six is computed, and the metrics count them."""
    import uvicorn

    stub = StubPipe(tmp_path / "a", delay=3.0)
    app = create_app(None, ServeOptions(max_batch=1, max_wait=0), pipe=stub)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
            holder = threading.Thread(target=lambda: c.post("/v1/images", json={"prompt": "busy"}))
            holder.start()
            assert stub.started.wait(10)
            for i in range(6):
                body = json.dumps({"prompt": f"gone {i}"}).encode()
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            holder.join(20)
            time.sleep(0.3)
            metrics = c.get("/metrics").text
        assert stub.computed == ["busy"]
        assert _metric(metrics, "kiln_client_disconnects_total") == 6 and _metric(metrics, "kiln_dropped_total") == 6
    finally:
        server.should_exit = True
        thread.join(20)


def test_health_fails_while_the_worker_hangs(tmp_path):
    stub = StubPipe(tmp_path / "a", delay=3.0)
    app = create_app(None, ServeOptions(max_wait=0, hang_timeout=1.0), pipe=stub)

    async def steps(c):
        image = asyncio.ensure_future(c.post("/v1/images", json={"prompt": "slow"}))
        await _until(stub.started.is_set)
        before = await c.get("/healthz")
        await asyncio.sleep(1.3)  # past the hang timeout, the batch still running
        during = await c.get("/healthz")
        return before, during, await image, await c.get("/healthz")

    before, during, image, after = _session(app, steps)
    assert before.status_code == 200 and image.status_code == 200 and after.status_code == 200
    assert during.status_code == 503 and "has run one batch for" in during.json()["reason"]


def test_a_sticky_cuda_error_fails_liveness_and_stops_the_service(stub):
    stub.fail = RuntimeError("CUDA error: an illegal memory access was encountered")
    stopped = []
    app = create_app(None, ServeOptions(max_wait=0), pipe=stub, on_fatal=stopped.append)

    async def steps(c):
        return await c.post("/v1/images", json={"prompt": "FAIL"}), await c.get("/healthz"), await c.get("/readyz")

    failed, health, ready = _session(app, steps)
    assert failed.status_code == 500 and health.status_code == 503 and ready.status_code == 503
    assert "illegal memory access" in health.json()["reason"] and len(stopped) == 1


def test_ready_only_once_loaded_and_not_while_draining(tmp_path, monkeypatch):
    import runtime.pipeline

    stub = StubPipe(tmp_path / "a")
    release = threading.Event()

    def slow_load(folder):
        assert release.wait(10)
        return stub

    monkeypatch.setattr(runtime.pipeline, "load_pipeline", slow_load)
    app = create_app(stub.manifest.folder, ServeOptions(max_wait=0))

    async def steps(c):
        loading, alive, early = await c.get("/readyz"), await c.get("/healthz"), await c.post("/v1/images", json={"prompt": "x"})
        release.set()
        await _until(lambda: app.state.health.loaded)
        return loading, alive, early, await c.get("/readyz"), await c.post("/v1/images", json={"prompt": "late"})

    loading, alive, early, ready, image = _session(app, steps)
    assert loading.status_code == 503 and loading.json()["status"] == "loading" and alive.status_code == 200
    assert early.status_code == 503 and "not ready (loading)" in early.json()["detail"]
    assert ready.status_code == 200 and image.status_code == 200
    with TestClient(create_app(None, ServeOptions(), pipe=stub)) as c:
        c.app.state.health.draining = True
        assert c.get("/readyz").json()["status"] == "draining" and c.get("/healthz").status_code == 200
        assert c.post("/v1/images", json={"prompt": "x"}).status_code == 503


def test_png_encoding_runs_off_the_event_loop(stub, monkeypatch):
    import runtime.server

    real = runtime.server.encode_png
    finished = []

    def slow_encode(image):
        time.sleep(0.8)
        finished.append("png")
        return real(image)

    monkeypatch.setattr(runtime.server, "encode_png", slow_encode)
    app = create_app(None, ServeOptions(max_wait=0), pipe=stub)

    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                async def health():
                    while "png" not in finished and not stub.computed:
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.2)  # the image is encoding now
                    r = await c.get("/healthz")
                    finished.append("healthz")
                    return r

                return await asyncio.gather(c.post("/v1/images", json={"prompt": "x"}), health())

    image, health = asyncio.run(main())
    assert image.status_code == 200 and health.status_code == 200
    assert finished == ["healthz", "png"]  # /healthz answered while the PNG was being encoded


def test_metrics_count_every_response(stub):
    app = create_app(None, ServeOptions(max_wait=0, api_key="k"), pipe=stub)
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as c:
        assert c.post("/v1/images", json={"prompt": "x"}, headers=auth).status_code == 200
        assert c.post("/v1/images", json={"prompt": "x", "steps": 0}, headers=auth).status_code == 422  # FastAPI's own
        assert c.post("/v1/images", content=b"{not json", headers={**auth, "content-type": "application/json"}
                      ).status_code == 422
        assert c.post("/v1/images", content=b"x" * 20000, headers=auth).status_code == 413
        assert c.post("/v1/images", json={"prompt": "x"}).status_code == 401
        metrics = c.get("/metrics", headers=auth).text
    for code, n in (("200", 1), ("422", 2), ("413", 1), ("401", 1)):
        assert _metric(metrics, f'kiln_http_responses_total{{code="{code}"}}') == n, code
        assert _metric(metrics, f'kiln_request_latency_seconds_count{{code="{code}"}}') == n, code
    assert "# HELP kiln_request_latency_seconds" in metrics


def test_the_api_key(stub):
    with TestClient(create_app(None, ServeOptions(max_wait=0, api_key="s3cret"), pipe=stub)) as c:
        assert c.post("/v1/images", json={"prompt": "x"}).status_code == 401
        r = c.post("/v1/images", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/metrics").status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.post("/v1/images", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_json_logs_one_line_per_request(stub, caplog):
    with caplog.at_level(logging.INFO, logger="runtime.access"):
        with TestClient(create_app(None, ServeOptions(max_wait=0, log_json=True), pipe=stub)) as c:
            rid = c.post("/v1/images", json={"prompt": "x"}).headers["x-request-id"]
            c.get("/healthz")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    (line,) = lines
    assert line["id"] == rid and line["status"] == 200 and line["path"] == "/v1/images"
    assert line["batch_size"] == 1 and line["queue_wait_s"] >= 0 and line["latency_s"] > 0


def test_sigterm_drains_then_exits(tmp_path):
    """`serve` under a signal: /readyz turns draining, new requests get 503, the request in flight
    still gets its image, and the process exits 0 once the queue is empty."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (f"from pathlib import Path\nfrom tests.stub_pipe import StubPipe\nfrom runtime.server import ServeOptions, serve\n"
              f"serve(None, ServeOptions(port={port}, max_wait=0, drain_timeout=20), "
              f"pipe=StubPipe(Path({str(tmp_path / 'a')!r}), delay=2.0, started_file={str(tmp_path / 'started')!r}))\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=root, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=30) as c:
            result = {}
            slow = threading.Thread(target=lambda: result.update(r=c.post("/v1/images", json={"prompt": "in flight"})))
            slow.start()
            while not (tmp_path / "started").exists():  # the request is being computed
                assert time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with httpx.Client(base_url=base, timeout=10) as other:
                ready, late = other.get("/readyz"), other.post("/v1/images", json={"prompt": "late"})
            slow.join(30)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert late.status_code == 503 and result["r"].status_code == 200
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_an_unrecoverable_engine_error_stops_the_process_with_an_error(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (f"from pathlib import Path\nfrom tests.stub_pipe import StubPipe\nfrom runtime.server import ServeOptions, serve\n"
              f"pipe = StubPipe(Path({str(tmp_path / 'a')!r}))\n"
              "pipe.fail = RuntimeError('CUDA error: an illegal memory access was encountered')\n"
              f"serve(None, ServeOptions(port={port}, max_wait=0), pipe=pipe)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=root, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.post(f"http://127.0.0.1:{port}/v1/images", json={"prompt": "FAIL"}, timeout=30).status_code == 500
        code = process.wait(30)
        assert code != 0 and "FatalEngineError" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_a_client_gone_before_its_body_arrived_is_a_499_and_never_reaches_the_app(stub):
    app = create_app(None, ServeOptions(max_wait=0), pipe=stub)
    sent = []

    async def main():
        async with app.router.lifespan_context(app):
            async def receive():
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/images", "headers": [], "query_string": b"",
                     "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": ""}
            await app(scope, receive, send)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return (await c.get("/metrics")).text

    metrics = asyncio.run(main())
    assert sent == [] and stub.computed == []
    assert _metric(metrics, 'kiln_http_responses_total{code="499"}') == 1
    assert _metric(metrics, 'kiln_http_responses_total{code="400"}') == 0


def test_a_body_the_json_parser_refuses_is_422(stub):
    with TestClient(create_app(None, ServeOptions(), pipe=stub)) as c:
        r = c.post("/v1/images", content=b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body"


def test_at_the_drain_deadline_queued_requests_get_503(tmp_path):
    from runtime.errors import ShuttingDownError

    stub = StubPipe(tmp_path / "a", delay=1.0)
    app = create_app(None, ServeOptions(max_batch=1, max_wait=0), pipe=stub)

    async def steps(c):
        first = asyncio.ensure_future(c.post("/v1/images", json={"prompt": "first"}))
        await _until(stub.started.is_set)
        queued = asyncio.ensure_future(c.post("/v1/images", json={"prompt": "queued"}))
        await _until(lambda: app.state.batcher.depth == 1)
        assert app.state.batcher.abort_queued(ShuttingDownError("stopping")) == 1  # what the drain does at its deadline
        return await first, await queued

    first, queued = _session(app, steps)
    assert first.status_code == 200 and queued.status_code == 503 and stub.computed == ["first"]


def test_a_request_that_leaves_the_queue_frees_its_place(tmp_path):
    stub = StubPipe(tmp_path / "a", delay=1.0)
    app = create_app(None, ServeOptions(max_batch=1, max_wait=0, max_queue=1), pipe=stub)

    async def steps(c):
        first = asyncio.ensure_future(c.post("/v1/images", json={"prompt": "first"}))
        await _until(stub.started.is_set)
        late = await c.post("/v1/images", json={"prompt": "late"}, headers={"X-Request-Timeout": "0.05"})
        depth = app.state.batcher.depth
        after = await c.post("/v1/images", json={"prompt": "after"})
        return await first, late, depth, after

    first, late, depth, after = _session(app, steps)
    assert late.status_code == 504 and depth == 0  # out of the queue at its deadline, not when its turn came
    assert first.status_code == 200 and after.status_code == 200 and stub.computed == ["first", "after"]
