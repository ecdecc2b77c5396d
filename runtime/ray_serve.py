"""Scale-out on Ray Serve: the same runtime in a deployment, one replica per device, Serve's batching.

    from runtime.ray_serve import kiln_app
    serve.run(kiln_app("artifacts/tiny", num_replicas=2))   # or: kiln serve DIR --ray

Serve collects up to `max_batch` calls (or `max_wait` seconds); they are grouped as the in-process
batcher groups them (same size, steps, guidance, scheduler) and each group is one pipeline call with
per-request generators. ray is imported only here (pip install 'kiln[serve]').
"""
from __future__ import annotations

import asyncio
import io
from typing import Any


def _to_request(body: dict[str, Any]):
    import dataclasses

    from runtime.batcher import ImageRequest

    allowed = {f.name for f in dataclasses.fields(ImageRequest)}
    unknown = set(body) - allowed
    if unknown or "prompt" not in body:
        from runtime.errors import RequestError

        raise RequestError(f"expected fields {sorted(allowed)} with a prompt; got unknown {sorted(unknown)}")
    return ImageRequest(**body)


def kiln_app(folder: str, max_batch: int = 8, max_wait: float = 0.1, num_replicas: int = 1):
    """A bound Serve application over the artifact in `folder`."""
    return kiln_deployment(max_batch, max_wait, num_replicas).bind(folder)


def kiln_deployment(max_batch: int = 8, max_wait: float = 0.1, num_replicas: int = 1):
    """The Serve deployment (unbound). On a GPU machine each replica takes one GPU; on CPU one CPU."""
    import torch
    from ray import serve

    gpus = 1 if torch.cuda.is_available() else 0

    # Serve admits 5 requests per replica by default, which would cap every batch at 5: admit two
    # batches' worth, so one can fill while the other runs.
    @serve.deployment(num_replicas=num_replicas, max_ongoing_requests=2 * max_batch,
                      ray_actor_options={"num_gpus": gpus, "num_cpus": 0 if gpus else 1})
    class KilnImages:
        def __init__(self, folder: str):
            from runtime.pipeline import load_pipeline

            self.pipe = load_pipeline(folder)
            self.pipe.set_progress_bar_config(disable=True)
            self.base = self.pipe.scheduler.config
            self.max_batch = min(max_batch, self.pipe.manifest.shape_range("batch")[2])

        async def image(self, body: dict) -> bytes:
            """One request: checked on its own (its error is its own), then batched by Serve."""
            from runtime.batcher import normalize_request

            return await self._batch(normalize_request(self.pipe, _to_request(body)))

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait)
        async def _batch(self, requests: list) -> list[bytes]:
            from runtime.batcher import split_groups

            out: dict[int, bytes] = {}
            indexed = list(enumerate(requests))
            for group in split_groups(indexed, lambda ir: ir[1].group_key(), self.max_batch):
                images = await asyncio.to_thread(self._generate, [r for _, r in group])
                for (i, _), image in zip(group, images):
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    out[i] = buffer.getvalue()
            return [out[i] for i in range(len(requests))]

        def _generate(self, requests):
            from runtime.batcher import generate_images

            return generate_images(self.pipe, requests, self.base)

        async def __call__(self, http_request):
            from starlette.responses import Response

            return Response(await self.image(await http_request.json()), media_type="image/png")

    return KilnImages
