"""The service's Prometheus metrics (prometheus_client, one registry per app): every HTTP response
by status code with its latency, client disconnects and deadlines, and the batcher's own counts."""
from __future__ import annotations

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))
PROBES = ("/healthz", "/readyz", "/metrics")  # not counted: pollers would drown the requests


class ServiceMetrics:
    def __init__(self, batcher_of):
        """`batcher_of()`: the batcher whose counts to export (None while the pipeline loads)."""
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.responses = Counter("kiln_http_responses", "HTTP responses to requests, by status code", ["code"],
                                 registry=self.registry)
        self.latency = Histogram("kiln_request_latency_seconds", "Seconds from request to response, by status code",
                                 ["code"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.disconnects = Counter("kiln_client_disconnects", "Requests whose client left before the answer",
                                   registry=self.registry)
        self.timeouts = Counter("kiln_request_timeouts", "Requests past their deadline, answered 504",
                                registry=self.registry)
        self.registry.register(_BatcherCollector(batcher_of))

    def observe(self, path: str, code: int, seconds: float) -> None:
        if path in PROBES:
            return
        self.responses.labels(code=str(code)).inc()
        self.latency.labels(code=str(code)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BatcherCollector:
    """Reads BatcherStats at scrape time (the batcher itself knows nothing of Prometheus)."""

    def __init__(self, batcher_of):
        self.batcher_of = batcher_of

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        batcher = self.batcher_of()
        s = batcher.stats if batcher is not None else None
        for name, doc, value in (
            ("kiln_requests", "Requests queued for the engines", s.requests if s else 0),
            ("kiln_errors", "Requests whose batch failed", s.errors if s else 0),
            ("kiln_refused", "Requests turned away by a full queue", s.refused if s else 0),
            ("kiln_dropped", "Queued requests not computed: their client left or their deadline passed first",
             s.dropped if s else 0),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        batches = CounterMetricFamily("kiln_batches", "Engine calls, by the number of requests in them", labels=["size"])
        for size, count in sorted((s.batch_sizes if s else {}).items()):
            batches.add_metric([str(size)], count)
        yield batches
        yield GaugeMetricFamily("kiln_queue_depth", "Requests waiting for a batch", value=batcher.depth if batcher else 0)
        from runtime.lora_serving import swap_counts

        swaps, seconds = (swap_counts(batcher.pipe) if batcher is not None else None) or (0, 0.0)
        yield CounterMetricFamily("kiln_lora_swaps", "LoRA set changes swapped into the engines", value=swaps)
        yield CounterMetricFamily("kiln_lora_swap_seconds", "Seconds spent swapping LoRA weights into the engines",
                                  value=seconds)
