"""Scale-out on Ray Serve: the same runtime in a deployment, one replica per device, Serve's batching.

    from runtime.ray_serve import kiln_app
    serve.run(kiln_app("artifacts/tiny", num_replicas=2))   # or: kiln serve DIR --ray

Each request is validated with the HTTP service's own request model and checked against the engines
before it joins a Serve batch, so a bad request fails alone (4xx over HTTP, RequestError through a
handle). Serve's batches are grouped as the in-process batcher groups them; a failing group fails
only its own requests. The queue is bounded (max_queued_requests), the health check fails like
/healthz, and GPUs per replica come from the cluster or a flag. ray is imported only here
(pip install 'kiln[serve]').
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, fields, replace

from runtime.errors import RequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    max_batch: int = 8
    max_wait: float = 0.1
    num_replicas: int = 1
    max_queued_requests: int = 64  # per caller (each proxy or handle), beyond those admitted; past it Serve answers 503
    gpus_per_replica: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0
    truncate_prompts: bool = False
    hang_timeout: float = 300.0  # one batch running longer fails the replica's health check
    loras: tuple = ()  # ((name, file or hub id, default weight), ...), as ServeOptions.loras
    lora_cache: int = 4


def _options(options: RayOptions | None, overrides: dict) -> RayOptions:
    unknown = set(overrides) - {f.name for f in fields(RayOptions)}
    if unknown:
        raise TypeError(f"unknown Ray options {sorted(unknown)}")
    return replace(options or RayOptions(), **overrides)


def gpus_per_replica(options: RayOptions) -> float:
    """The flag, else one GPU when the Ray cluster has any (not what the driver's torch sees)."""
    if options.gpus_per_replica is not None:
        return options.gpus_per_replica
    import ray

    if not ray.is_initialized():
        ray.init()
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


_POSITIONAL = ("max_batch", "max_wait", "num_replicas")  # the order of the arguments before RayOptions


def kiln_app(folder: str, *args, options: RayOptions | None = None, **overrides):
    """A bound Serve application over the artifact in `folder`: kiln_app(folder, max_batch, max_wait,
    num_replicas) as before, or options=RayOptions(...) and keyword overrides of its fields."""
    return kiln_deployment(*args, options=options, **overrides).bind(folder)


def kiln_deployment(*args, options: RayOptions | None = None, **overrides):
    """The Serve deployment (unbound); arguments as for kiln_app."""
    from ray import serve

    if args and isinstance(args[0], RayOptions):
        options, args = args[0], args[1:]
    if len(args) > len(_POSITIONAL):
        raise TypeError(f"at most {len(_POSITIONAL)} positional options ({', '.join(_POSITIONAL)})")
    options = _options(options, {**dict(zip(_POSITIONAL, args)), **overrides})
    gpus = gpus_per_replica(options)

    # Serve admits 5 requests per replica by default, which would cap every batch at 5: admit two
    # batches' worth, so one can fill while the other runs.
    @serve.deployment(num_replicas=options.num_replicas, max_ongoing_requests=2 * options.max_batch,
                      max_queued_requests=options.max_queued_requests, health_check_period_s=10,
                      health_check_timeout_s=30, ray_actor_options={"num_gpus": gpus, "num_cpus": 0 if gpus else 1})
    class KilnImages:
        def __init__(self, folder: str):
            from runtime.api import image_request_model
            from runtime.batcher import counting_tokenizer
            from runtime.health import Health
            from runtime.lora_serving import register_loras
            from runtime.pipeline import load_pipeline
            from runtime.vae_tiling import tile_above_the_vae

            self.pipe = load_pipeline(folder)
            register_loras(self.pipe, options.loras, options.lora_cache)
            tile_above_the_vae(self.pipe)
            self.pipe.set_progress_bar_config(disable=True)
            counting_tokenizer(self.pipe)  # requests are checked on the event loop while a thread generates
            self.body_model = image_request_model(self.pipe.manifest)
            self.base = self.pipe.scheduler.config
            self.max_batch = min(options.max_batch, self.pipe.manifest.shape_range("batch")[2])
            self.health = Health(hang_timeout=options.hang_timeout, loaded=True)
            self.running_since: float | None = None

        def validated(self, body):
            """The request a body asks for, checked like the HTTP service checks it; RequestError otherwise."""
            from pydantic import ValidationError

            from runtime.api import validation_errors
            from runtime.batcher import normalize_request

            if not isinstance(body, dict):
                raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
            try:
                model = self.body_model.model_validate(body)
            except ValidationError as exc:
                (first, *_) = validation_errors(exc)
                field = str(first["loc"][-1]) if first["loc"] else None
                raise RequestError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in validation_errors(exc)),
                                   field=field) from None
            return normalize_request(self.pipe, model.to_request(), options.truncate_prompts)

        async def image(self, body: dict) -> bytes:
            """One request: checked on its own (its error is its own), then batched by Serve."""
            ok, value = await self._batch(self.validated(body))
            if not ok:
                raise value
            return value

        @serve.batch(max_batch_size=options.max_batch, batch_wait_timeout_s=options.max_wait)
        async def _batch(self, requests: list) -> list[tuple[bool, object]]:
            return await self.run_batch(requests)

        async def run_batch(self, requests: list) -> list[tuple[bool, object]]:
            """Serve's batch, grouped as the in-process batcher groups; (True, PNG) or (False, error) each."""
            from runtime.batcher import split_groups
            from runtime.server import encode_png

            out: dict[int, tuple[bool, object]] = {}
            for group in split_groups(list(enumerate(requests)), lambda ir: ir[1].group_key(), self.max_batch):
                try:
                    images = await asyncio.to_thread(self._generate, [r for _, r in group])
                except Exception as exc:  # this group's error, not its neighbours'
                    self._note_failure(exc)
                    out.update({i: (False, exc) for i, _ in group})
                    continue
                for (i, _), image in zip(group, images):
                    out[i] = (True, await asyncio.to_thread(encode_png, image))
            return [out[i] for i in range(len(requests))]

        def _generate(self, requests):
            from runtime.batcher import generate_images

            self.running_since = time.perf_counter()
            try:
                return generate_images(self.pipe, requests, self.base)
            finally:
                self.running_since = None

        def _note_failure(self, exc: Exception) -> None:
            from runtime.health import is_fatal

            log.warning("batch failed: %s: %s", type(exc).__name__, exc)
            if is_fatal(exc):
                self.health.fatal = f"{type(exc).__name__}: {exc}"

        def check_health(self):
            """Serve calls this periodically; a raise makes it replace the replica (like a failing /healthz)."""
            alive, why = self.health.liveness(self)
            if not alive:
                raise RuntimeError(why)

        async def __call__(self, http_request):
            from starlette.responses import JSONResponse, Response

            try:
                body = await http_request.json()
            except ValueError as exc:
                return JSONResponse({"detail": [{"loc": ["body"], "msg": f"the body is not JSON: {exc}"}]}, 422)
            try:
                return Response(await self.image(body), media_type="image/png")
            except RequestError as exc:
                loc = ["body", exc.field] if exc.field else ["body"]
                return JSONResponse({"detail": [{"loc": loc, "msg": str(exc)}]}, 422)
            except Exception as exc:  # the engines failed: no internal text to the client
                rid = uuid.uuid4().hex[:16]
                log.error("request %s: generation failed: %s: %s", rid, type(exc).__name__, exc)
                return JSONResponse({"detail": f"generation failed (request {rid}); the replica log has the details"},
                                    500)

    return KilnImages
