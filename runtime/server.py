"""The HTTP service: `kiln serve DIR` (FastAPI + uvicorn), one pipeline behind one batcher.

POST /v1/images  JSON {prompt, negative_prompt, height, width, steps, guidance_scale, seed, scheduler, loras}
                 → image/png when the Accept header asks for it, else JSON {"image": base64 PNG, ...}
GET  /healthz    liveness: 200 unless the worker hangs or an engine failed beyond repair
GET  /readyz     readiness: 200 once the pipeline is loaded, 503 while loading or draining
GET  /metrics    Prometheus (prometheus_client)

Every request answers once: 422 names the field (bad fields, prompts over the token limit, sizes
outside the engines), 429 with Retry-After when the queue is full, 503 while loading or draining,
504 past its deadline (the server's, or a shorter X-Request-Timeout of the client's), 500 with a
request id when the engines fail, 413 for bodies over the limit, 401 without the API key. A client
that leaves is not computed. fastapi, uvicorn and prometheus_client are imported only when the app
is built (the serving extra).
"""

import asyncio
import base64
import io
import logging
from dataclasses import dataclass

from runtime.errors import FatalEngineError, QueueFullError, RequestError, ShuttingDownError
from runtime.health import Health, is_fatal

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_wait: float = 0.1
    max_queue: int = 64
    request_timeout: float = 60.0  # seconds from arrival to answer; past it 504
    drain_timeout: float = 30.0  # seconds a stopping service finishes queued work (Kubernetes' grace period)
    hang_timeout: float = 300.0  # seconds one batch may run before /healthz fails
    api_key: str | None = None
    truncate_prompts: bool = False  # cut prompts to the text encoder's length instead of refusing them
    log_json: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    loras: tuple = ()  # ((name, file or hub id, default weight), ...): requests may name them (runtime/lora_serving.py)
    lora_cache: int = 4  # merged LoRA sets kept


def drain_budget(drain_timeout: float) -> tuple[float, float]:
    """(seconds the drain waits for the queue, seconds left for each of uvicorn's close and the
    batcher's stop): together at most `drain_timeout`."""
    grace = max(0.5, min(5.0, drain_timeout / 6))
    return max(0.0, drain_timeout - 2 * grace), grace


def check_port(host: str, port: int) -> None:
    """ServiceError at once when the address is taken (uvicorn would find out after loading)."""
    import socket

    from runtime.errors import ServiceError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            import errno

            advice = ("another program has it; pick another --port or stop that program" if exc.errno == errno.EADDRINUSE
                      else "check --host: it must be an address of this machine (127.0.0.1, 0.0.0.0, ...)")
            raise ServiceError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): {advice}") from None


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _disconnected(receive) -> None:
    """Returns when the client has gone (after its body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(folder, options: ServeOptions = ServeOptions(), pipe=None, on_fatal=None):
    """The FastAPI app for the artifact in `folder` (or an already loaded `pipe`). The pipeline loads
    in the background while /healthz answers and /readyz says loading. `on_fatal(reason)` is called
    once when the service can no longer work (the pipeline did not load, an engine failed beyond
    repair): `serve` stops the process with an error then."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from runtime.api import image_request_model, validation_errors
    from runtime.batcher import Batcher
    from runtime.http_layers import ApiKey, BodyLimit, RequestContext
    from runtime.manifest import load_manifest
    from runtime.metrics import ServiceMetrics

    manifest = pipe.manifest if pipe is not None else load_manifest(folder)  # a damaged folder fails here, at once
    Body = image_request_model(manifest)
    health = Health(hang_timeout=options.hang_timeout)
    state = {"batcher": None}
    metrics = ServiceMetrics(lambda: state["batcher"])

    def fail(reason: str) -> None:
        if health.fatal is None:
            health.fatal = reason
            log.error("the service cannot go on: %s", reason)
            if on_fatal is not None:
                on_fatal(reason)

    def prepare(loaded):
        from runtime.lora_serving import register_loras
        from runtime.vae_tiling import tile_above_the_vae

        register_loras(loaded, options.loras, options.lora_cache)
        tile_above_the_vae(loaded)  # sizes the UNet takes but the VAE decoder engine does not decode in tiles
        return loaded

    def start(loaded) -> None:
        loaded.set_progress_bar_config(disable=True)
        batcher = Batcher(loaded, options.max_batch, options.max_wait, options.max_queue, options.truncate_prompts)
        batcher.start()
        state["batcher"], app.state.batcher = batcher, batcher
        health.loaded = True
        log.info("serving %s (max batch %d, max wait %.0f ms, queue %d, deadline %.0f s)", manifest.folder,
                 batcher.max_batch, options.max_wait * 1000, options.max_queue, options.request_timeout)

    async def load() -> None:
        from runtime.pipeline import load_pipeline

        try:
            loaded = await asyncio.to_thread(lambda: prepare(load_pipeline(folder)))
        except Exception as exc:  # the artifact or engines are unusable: the service cannot start
            health.load_error = str(exc)
            fail(f"the pipeline could not be loaded: {exc}")
            return
        start(loaded)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loading = None
        if pipe is not None:
            start(prepare(pipe))
        else:
            loading = asyncio.create_task(load())
        yield
        health.draining = True
        if loading is not None:
            loading.cancel()
        batcher = state["batcher"]  # finishes what is queued and in flight, within the drain's budget
        if batcher is not None and not await batcher.stop(timeout=drain_budget(options.drain_timeout)[1]):
            fail("the engine worker did not finish its batch before the service stopped (hung?)")

    app = FastAPI(title="kiln", lifespan=lifespan)
    app.state.batcher = None
    app.state.health = health
    app.state.options = options

    def _error(status: int, field: str | None, message: str, headers=None):
        """422s keep FastAPI's shape ([{"loc", "msg"}], "loc" naming the field where one is at fault)."""
        detail = [{"loc": ["body", field] if field else ["body"], "msg": message}] if status == 422 else message
        return JSONResponse({"detail": detail}, status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": validation_errors(exc)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def unparsable(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and request.url.path == "/v1/images":  # a body FastAPI could not parse
            return JSONResponse({"detail": [{"loc": ["body"], "msg": f"the body could not be parsed: {exc.detail}"}]}, 422)
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/healthz")
    async def healthz():
        alive, why = health.liveness(state["batcher"])
        batcher = state["batcher"]
        return JSONResponse({"status": "ok" if alive else "failing", "reason": why,
                             "queue_depth": batcher.depth if batcher else 0}, 200 if alive else 503)

    @app.get("/readyz")
    async def readyz():
        ready, why = health.readiness(state["batcher"])
        batcher = state["batcher"]
        return JSONResponse({"status": why, "queue_depth": batcher.depth if batcher else 0}, 200 if ready else 503)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/images")
    async def images(body: Body, request: Request):
        info = request.scope["state"].get("kiln", {})
        ready, why = health.readiness(state["batcher"])
        if not ready:
            return _error(503, None, f"not ready ({why}); retry shortly or on another replica",
                          headers={"Retry-After": "5"})
        timeout = options.request_timeout
        asked = request.headers.get("x-request-timeout")  # a client's own, shorter deadline
        if asked is not None:
            try:
                timeout = min(timeout, float(asked))
            except ValueError:
                timeout = float("nan")
            if not timeout > 0:
                return JSONResponse({"detail": [{"loc": ["header", "x-request-timeout"],
                                                 "msg": f"expected seconds > 0, got {asked!r}"}]}, 422)
        batcher = state["batcher"]
        work = asyncio.ensure_future(batcher.submit(body.to_request(), info))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the handler itself was cancelled (shutdown): its request too
            work.cancel()
            raise
        finally:
            gone.cancel()
        if work not in done:
            work.cancel()  # not computed if its batch has not started; its result is dropped if it has
            await asyncio.gather(work, return_exceptions=True)  # out of the queue before we answer
            if gone in done:
                metrics.disconnects.inc()
                return Response(status_code=499)  # nobody reads it: the client closed the connection
            metrics.timeouts.inc()
            return _error(504, None, f"no image within the deadline of {timeout:g} s "
                                     f"(request {info.get('request_id')}); retry with fewer steps or later")
        try:
            image = work.result()
        except QueueFullError as exc:
            return _error(429, None, str(exc), headers={"Retry-After": str(int(round(exc.retry_after)))})
        except RequestError as exc:  # this request cannot be served as asked (size, steps, scheduler, prompt)
            return _error(422, exc.field, str(exc))
        except ShuttingDownError as exc:
            return _error(503, None, str(exc))
        except Exception as exc:  # the batch failed: this request's error, the service goes on
            rid = info.get("request_id")
            log.error("request %s: generation failed: %s: %s", rid, type(exc).__name__, exc)
            if is_fatal(exc):
                fail(f"{type(exc).__name__}: {exc}")
            return _error(500, None, f"generation failed (request {rid}); the server log has the details")
        png = await asyncio.to_thread(encode_png, image)  # 50-150 ms for 512-1024 px: not on the event loop
        if "image/png" in request.headers.get("accept", ""):
            return Response(png, media_type="image/png")
        encoded = await asyncio.to_thread(lambda: base64.b64encode(png).decode())
        return {"image": encoded, "seed": body.seed, "size": list(image.size)}

    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    app.add_middleware(ApiKey, key=options.api_key)
    app.add_middleware(RequestContext, metrics=metrics, log_json=options.log_json)
    return app


def serve(folder, options: ServeOptions = ServeOptions(), pipe=None) -> None:
    """Run the service until a signal: then /readyz turns false, new requests get 503, queued ones
    finish (at most `drain_timeout` seconds), and the process exits. An unrecoverable engine error
    stops it with FatalEngineError, so that an orchestrator restarts it."""
    import time

    import uvicorn

    wait_for_queue, grace = drain_budget(options.drain_timeout)

    class KilnServer(uvicorn.Server):
        """uvicorn, with a drain before the shutdown: the first signal stops readiness and new work,
        the queue empties (or its share of drain_timeout passes, and what is still queued gets 503),
        then uvicorn stops as usual."""

        drain_deadline: float | None = None

        def handle_exit(self, sig, frame):
            health = app.state.health
            if health.draining or self.should_exit:
                return super().handle_exit(sig, frame)  # a second signal: uvicorn's own (force)
            log.info("draining: finishing queued requests (at most %.0f s), refusing new ones", options.drain_timeout)
            health.draining = True
            self.drain_deadline = time.monotonic() + wait_for_queue

        async def on_tick(self, counter: int) -> bool:
            batcher = app.state.batcher
            if self.drain_deadline is not None and not self.should_exit:
                if batcher is None or batcher.idle:
                    self.should_exit = True
                elif time.monotonic() > self.drain_deadline:
                    refused = batcher.abort_queued(ShuttingDownError("the server is stopping; retry on another replica"))
                    log.warning("drain time is up: %d queued requests answered 503", refused)
                    self.should_exit = True
            return await super().on_tick(counter)

    fatal: list[str] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        server.should_exit = True

    check_port(options.host, options.port)  # before anything loads
    app = create_app(folder, options, pipe=pipe, on_fatal=on_fatal)
    server = KilnServer(uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                                       access_log=not options.log_json, timeout_graceful_shutdown=max(1, round(grace))))
    server.run()
    if fatal:
        raise FatalEngineError(f"the service stopped: {fatal[0]}")
