"""The Ray Serve deployment: requests validated like the HTTP service's before they join a batch,
one bad request or failing group failing only itself, bounded queues, a health check, GPUs from the
cluster; and a local CPU Ray cluster answering two requests."""
from __future__ import annotations

import asyncio
import io
import types

import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the serving extra (pip install 'kiln[serve]') is not installed")

from runtime.errors import RequestError  # noqa: E402
from tests.stub_pipe import StubPipe  # noqa: E402


@pytest.fixture
def replica(tmp_path, monkeypatch):
    """The deployment's class itself (no cluster) over a stand-in pipeline."""
    import runtime.pipeline
    from runtime.ray_serve import kiln_deployment

    stub = StubPipe(tmp_path / "a")
    monkeypatch.setattr(runtime.pipeline, "load_pipeline", lambda folder: stub)
    cls = kiln_deployment(gpus_per_replica=0, max_wait=0.05).func_or_class
    obj = cls(str(stub.manifest.folder))
    obj.stub = stub

    async def alone(request):  # Serve's batching needs a replica context; here each request is its own batch
        return (await obj.run_batch([request]))[0]

    obj._batch = alone
    return obj


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "guidance_scale": [7.5]}, "guidance_scale"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "steps": 10**9}, "steps"),
    ({"prompt": "x", "height": 100}, "height"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": " ".join(["word"] * 80)}, "prompt"),  # over the text encoder's 77 tokens
])
def test_bad_requests_are_refused_before_they_join_a_batch(replica, body, field):
    with pytest.raises(RequestError) as err:
        replica.validated(body)
    assert err.value.field == field


def test_a_bad_request_or_a_failing_group_fails_only_itself(replica):
    from runtime.errors import FatalEngineError

    replica.stub.fail = FatalEngineError("engine broke")

    with pytest.raises(RequestError):  # refused before it could join any batch
        replica.validated({"prompt": "x", "seed": 2**64})
    batch = [replica.validated(b) for b in ({"prompt": "fine", "seed": 1}, {"prompt": "FAIL", "seed": 2, "steps": 3},
                                            {"prompt": "fine too"})]
    (ok, fine), (failed_ok, failed), (ok_too, fine_too) = asyncio.run(replica.run_batch(batch))
    assert ok and ok_too and not failed_ok and isinstance(failed, FatalEngineError)  # the group of 3 steps alone failed
    assert Image.open(io.BytesIO(fine)).size == (128, 128) and Image.open(io.BytesIO(fine_too)).size == (128, 128)
    assert replica.stub.computed == ["fine", "fine too", "FAIL"]  # one call for the group of two
    with pytest.raises(RuntimeError, match="cannot recover"):  # Serve replaces a replica whose check raises
        replica.check_health()


def test_http_statuses(replica):
    from starlette.requests import Request

    def request(body: bytes):
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)

    async def main():
        return [await replica(request(b)) for b in (b'{"prompt": "x"}', b'{"prompt": "x", "steps": 1000000000}',
                                                    b"{not json", b'{"prompt": "FAIL"}')]

    replica.stub.fail = RuntimeError("/secret/path: Conv failed")
    ok, bad, malformed, failed = asyncio.run(main())
    assert (ok.status_code, bad.status_code, malformed.status_code, failed.status_code) == (200, 422, 422, 500)
    assert b"/secret/path" not in failed.body and b'"steps"' in bad.body


def test_bounded_and_gpus_from_the_cluster(monkeypatch):
    from runtime import ray_serve

    deployment = ray_serve.kiln_deployment(max_batch=8, gpus_per_replica=0, max_queued_requests=16)
    # Serve's default of 5 ongoing requests per replica would cap every batch at 5 (Serve warns so)
    assert deployment.max_ongoing_requests >= 8 and deployment.max_queued_requests == 16
    fake = types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 16, "GPU": 2})
    monkeypatch.setitem(__import__("sys").modules, "ray", fake)
    assert ray_serve.gpus_per_replica(ray_serve.RayOptions()) == 1.0
    fake.cluster_resources = lambda: {"CPU": 16}
    assert ray_serve.gpus_per_replica(ray_serve.RayOptions()) == 0.0
    assert ray_serve.gpus_per_replica(ray_serve.RayOptions(gpus_per_replica=0.5)) == 0.5


@pytest.mark.slow
def test_ray_deployment_answers(tiny_artifact, tmp_path):
    """Images, a bad field's error, and a LoRA the deployment registered (tiny is refittable)."""
    from ray import serve

    from exporters.builtin import ensure_builtin
    from runtime.ray_serve import kiln_app
    from tests.loras import make_lora

    lora = make_lora(ensure_builtin("tiny"), tmp_path / "style", seed=7)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(kiln_app(str(tiny_artifact), max_wait=0.2, loras=(("style", str(lora), 1.0),)),
                           name="kiln-test", route_prefix=None)
        bodies = [{"prompt": "a cat", "steps": 2, "height": 64, "width": 64, "seed": s} for s in (1, 2)]
        responses = [handle.image.remote(b) for b in [*bodies, {**bodies[0], "loras": ["style"]}]]
        bad = handle.image.remote({"prompt": "a cat", "guidance_scale": [7.5]})
        unknown = handle.image.remote({**bodies[0], "loras": ["other"]})
        images = [Image.open(io.BytesIO(r.result(timeout_s=120))) for r in responses]
        assert [i.size for i in images] == [(64, 64)] * 3
        assert images[0].tobytes() != images[1].tobytes()
        assert images[0].tobytes() != images[2].tobytes()  # same request with the LoRA: another image
        with pytest.raises(Exception, match="guidance_scale"):
            bad.result(timeout_s=60)
        with pytest.raises(Exception, match="no LoRA named 'other' here; this service serves style"):
            unknown.result(timeout_s=60)
    finally:
        serve.shutdown()
        ray.shutdown()
