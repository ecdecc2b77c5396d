"""The HTTP service: `kiln serve DIR` (FastAPI + uvicorn), one pipeline behind one batcher.

POST /v1/images   JSON {prompt, negative_prompt, height, width, steps, guidance_scale, seed, scheduler}
                  → image/png when the Accept header asks for it, else JSON {"image": base64 PNG, ...}
GET  /healthz     200 {"status": "ok"} once the engines are loaded
GET  /metrics     Prometheus text: requests, errors, refusals, batch sizes, queue depth, latency

Bad fields get 422 naming the field and what is allowed; a full queue gets 429 with Retry-After; bodies
over MAX_BODY_BYTES get 413. fastapi and uvicorn are imported only when the app is built.
"""

import base64
import io
import logging
import time
from dataclasses import dataclass

from runtime.batcher import Batcher, ImageRequest
from runtime.errors import QueueFullError, RequestError, ShuttingDownError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_wait: float = 0.1
    max_queue: int = 64


class Metrics:
    def __init__(self):
        self.latency = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.responses: dict[int, int] = {}

    def observe(self, status: int, seconds: float) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1
        if status == 200:
            self.latency_sum += seconds
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency[i] += 1

    def render(self, batcher: Batcher) -> str:
        s = batcher.stats
        lines = ["# TYPE kiln_requests_total counter", f"kiln_requests_total {s.requests}",
                 "# TYPE kiln_errors_total counter", f"kiln_errors_total {s.errors}",
                 "# TYPE kiln_refused_total counter", f"kiln_refused_total {s.refused}",
                 "# TYPE kiln_queue_depth gauge", f"kiln_queue_depth {batcher.depth}",
                 "# TYPE kiln_batches_total counter"]
        lines += [f'kiln_batches_total{{size="{n}"}} {c}' for n, c in sorted(s.batch_sizes.items())]
        lines.append("# TYPE kiln_http_responses_total counter")
        lines += [f'kiln_http_responses_total{{code="{c}"}} {n}' for c, n in sorted(self.responses.items())]
        lines.append("# TYPE kiln_request_latency_seconds histogram")
        for bound, count in zip(LATENCY_BUCKETS, self.latency):
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'kiln_request_latency_seconds_bucket{{le="{le}"}} {count}')
        lines += [f"kiln_request_latency_seconds_sum {self.latency_sum:.6f}",
                  f"kiln_request_latency_seconds_count {self.latency[-1]}"]
        return "\n".join(lines) + "\n"


def create_app(folder, options: ServeOptions = ServeOptions(), pipe=None):
    """The FastAPI app for the artifact in `folder` (or an already loaded `pipe`)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from pydantic import BaseModel, Field, field_validator

    from runtime.pipeline import load_pipeline

    if pipe is None:
        pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    manifest = pipe.manifest
    (h_lo, _, h_hi), (w_lo, _, w_hi) = manifest.shape_range("height"), manifest.shape_range("width")
    multiple = manifest.size_multiple

    class Body(BaseModel):
        model_config = {"extra": "forbid"}
        prompt: str = Field(min_length=1, max_length=2000)
        negative_prompt: str | None = Field(default=None, max_length=2000)
        height: int | None = None
        width: int | None = None
        steps: int | None = Field(default=None, ge=1, le=200)  # None: the family's default (runtime.families)
        guidance_scale: float | None = Field(default=None, ge=0, le=30)
        seed: int = Field(default=0, ge=0, le=2**63 - 1)
        scheduler: str | None = None

        @field_validator("height", "width")
        @classmethod
        def _in_profile(cls, value, info):
            lo, hi = (h_lo, h_hi) if info.field_name == "height" else (w_lo, w_hi)
            if value is not None and (not lo <= value <= hi or value % multiple):
                raise ValueError(f"{info.field_name} {value} is outside what these engines were built for: "
                                 f"{lo}..{hi}, a multiple of {multiple}")
            return value

    batcher = Batcher(pipe, options.max_batch, options.max_wait, options.max_queue)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        log.info("serving %s (max batch %d, max wait %.0f ms, queue %d)", manifest.folder, batcher.max_batch,
                 options.max_wait * 1000, options.max_queue)
        yield
        await batcher.stop()  # finishes what is queued and in flight

    app = FastAPI(title="kiln", lifespan=lifespan)
    app.state.batcher = batcher

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and int(length) > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"body of {length} bytes is over the limit of {MAX_BODY_BYTES}"}, 413)
        return await call_next(request)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "queue_depth": batcher.depth}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(batcher), media_type="text/plain; version=0.0.4")

    def _error(status: int, field: str | None, message: str, headers=None):
        """422s keep FastAPI's shape ([{"loc", "msg"}], "loc" naming the field where one is at fault)."""
        detail = [{"loc": ["body", field] if field else ["body"], "msg": message}] if status == 422 else message
        return JSONResponse({"detail": detail}, status, headers=headers)

    @app.post("/v1/images")
    async def images(body: Body, request: Request):
        started = time.perf_counter()
        req = ImageRequest(body.prompt, body.negative_prompt, body.height, body.width, body.steps, body.guidance_scale,
                           body.seed, body.scheduler)
        try:
            image = await batcher.submit(req)
        except QueueFullError as exc:
            metrics.observe(429, 0)
            return _error(429, None, str(exc), headers={"Retry-After": str(int(round(exc.retry_after)))})
        except RequestError as exc:  # this request cannot be served as asked (size, steps, scheduler)
            metrics.observe(422, 0)
            return _error(422, exc.field, str(exc))
        except ShuttingDownError as exc:
            metrics.observe(503, 0)
            return _error(503, None, str(exc))
        except Exception as exc:  # the batch failed: this request's error, the service goes on
            metrics.observe(500, 0)
            return _error(500, None, f"generation failed: {exc}")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        metrics.observe(200, time.perf_counter() - started)
        if "image/png" in request.headers.get("accept", ""):
            return Response(buffer.getvalue(), media_type="image/png")
        return {"image": base64.b64encode(buffer.getvalue()).decode(), "seed": body.seed, "size": list(image.size)}

    return app


def serve(folder, options: ServeOptions = ServeOptions()) -> None:
    """Run the service until interrupted; a signal finishes the requests in flight first."""
    import uvicorn

    uvicorn.run(create_app(folder, options), host=options.host, port=options.port, log_level="info",
                timeout_graceful_shutdown=120)
