"""`kiln serve` on an artifact whose pipeline fails on purpose, for the soak test:
    python -m tests.soak.faulty_server ARTIFACT PORT
Batches whose prompts contain FAIL raise inside the pipeline, as a broken engine would; everything
else is the real service (runtime.server.serve) on the real engines."""
from __future__ import annotations

import sys


class FaultyPipeline:
    """The loaded pipeline, except that a call with a FAIL prompt raises."""

    def __init__(self, pipe):
        object.__setattr__(self, "_pipe", pipe)

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):  # pipe.scheduler = ... goes to the real pipeline
        setattr(self._pipe, name, value)

    def __call__(self, *args, **kwargs):
        if any("FAIL" in p for p in kwargs.get("prompt") or []):
            raise RuntimeError("injected engine failure")
        return self._pipe(*args, **kwargs)


def main(folder: str, port: int) -> None:
    import logging

    from runtime import load_pipeline
    from runtime.server import ServeOptions, serve

    logging.basicConfig(level=logging.WARNING)
    pipe = FaultyPipeline(load_pipeline(folder))
    serve(folder, ServeOptions(port=port, max_batch=4, max_wait=0.05, max_queue=64, request_timeout=30,
                               drain_timeout=5), pipe=pipe)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
