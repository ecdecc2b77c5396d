"""`kiln loadtest URL`: N concurrent clients on a kiln service, bounded in requests and time;
throughput and latency percentiles. A benchmark: it reports, it does not judge."""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from runtime.errors import OptionsError, ServiceUnavailableError


@dataclass(frozen=True)
class LoadOptions:
    clients: int = 8
    requests: int = 64  # in all, across clients
    duration: float = 120.0  # seconds; whichever bound comes first
    steps: int = 4
    height: int | None = None
    width: int | None = None
    timeout: float = 300.0
    api_key: str | None = None  # sent as Authorization: Bearer KEY
    ready_wait: float = 60.0  # seconds to wait for /readyz (a service still loading its pipeline)

    def __post_init__(self):
        if self.clients < 1 or self.requests < 1 or self.duration <= 0:
            raise OptionsError(f"clients and requests must be >= 1 and duration > 0; got {self.clients}, "
                               f"{self.requests}, {self.duration}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    import numpy as np

    return float(np.percentile(values, q, method="inverted_cdf"))


async def _load(url: str, options: LoadOptions) -> dict:
    import httpx

    latencies: list[float] = []
    codes: dict[int, int] = {}
    first_error: dict[int, str] = {}  # a body for each failing status: why it failed
    issued = 0
    started = time.perf_counter()
    deadline = started + options.duration

    async def client(i: int, http):
        nonlocal issued
        while issued < options.requests and time.perf_counter() < deadline:
            seed = issued
            issued += 1
            body = {"prompt": f"load test {seed}", "seed": seed, "steps": options.steps}
            body.update({k: v for k, v in (("height", options.height), ("width", options.width)) if v})
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url.rstrip('/')}/v1/images", json=body, headers={"Accept": "image/png", **auth})
                code = r.status_code
                if code != 200:
                    first_error.setdefault(code, r.text[:300])
            except httpx.HTTPError as exc:
                code = -1
                first_error.setdefault(code, f"no answer ({type(exc).__name__}: {exc})")
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                latencies.append(time.perf_counter() - t0)

    auth = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    async with httpx.AsyncClient(timeout=options.timeout) as http:
        await _wait_ready(http, url, options.ready_wait)
        await asyncio.gather(*(client(i, http) for i in range(options.clients)))
    seconds = time.perf_counter() - started
    ok = len(latencies)
    return {
        "url": url, "clients": options.clients, "steps": options.steps, "seconds": seconds,
        "requests": sum(codes.values()), "ok": ok, "status_codes": {str(k): v for k, v in sorted(codes.items())},
        "errors": {str(k): v for k, v in sorted(first_error.items())},
        "throughput_images_per_s": ok / seconds if seconds else 0.0,
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                      "p99": percentile(latencies, 99), "mean": statistics.mean(latencies)} if ok else None,
    }


async def _wait_ready(http, url: str, seconds: float) -> None:
    """Until /readyz says ready: a service that is down is an error at once, one still loading or
    draining is waited for up to `seconds`."""
    import httpx

    deadline = time.perf_counter() + seconds
    while True:
        try:
            r = await http.get(f"{url.rstrip('/')}/readyz")
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(f"no kiln service answers at {url} ({exc}); start one with `kiln serve DIR`") from exc
        if r.status_code == 200:
            return
        if r.status_code in (401, 403, 404):  # not a kiln service's readiness, or not ours to use: waiting won't help
            raise ServiceUnavailableError(f"{url} answered {r.status_code} to /readyz: is it the kiln service's base URL "
                                          "(not .../v1/images), with --api-key if it needs one?")
        if time.perf_counter() > deadline:
            raise ServiceUnavailableError(f"the service at {url} is not ready after {seconds:.0f} s: "
                                          f"{r.json().get('status', r.status_code) if r.content else r.status_code}")
        await asyncio.sleep(0.5)


def check_url(url: str) -> str:
    """The service's base URL, or OptionsError for one without http(s):// and a host."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        example = f"http://{url}" if "://" not in url else "http://127.0.0.1:8000"
        raise OptionsError(f"the URL must start with http:// or https:// and name a host, e.g. {example} (got {url!r})")
    return url


def run_load(url: str, options: LoadOptions = LoadOptions()) -> dict:
    return asyncio.run(_load(check_url(url), options))
