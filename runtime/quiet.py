"""Other libraries' notices that say nothing to a kiln user, kept out of its output (kiln's own
`-v` shows them again), and progress that a log can read."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator


def verbose() -> bool:
    """True when kiln runs with -v (its loggers at DEBUG)."""
    return logging.getLogger("runtime").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def quiet(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise these loggers to `level` for the block (unless -v); their old levels come back after."""
    if verbose():
        yield
        return
    if "transformers" in names:  # it sets its logger's level when first imported: do that first
        import transformers.utils.logging  # noqa: F401
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


@contextlib.contextmanager
def progress_bars_on_terminals_only() -> Iterator[None]:
    """diffusers' and transformers' loading bars redraw a line with carriage returns: on a terminal
    that is progress, in a log (make, CI, a file) it is one glued line. Off unless stderr is a terminal."""
    if sys.stderr.isatty():
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    was_on = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for m in was_on:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m in was_on:  # a user's own choice to turn them off stays
            m.enable_progress_bar()


@contextlib.contextmanager
def heartbeat(log: logging.Logger, what: str, every: float = 15.0) -> Iterator[None]:
    """Log "still <what> (N s)" every `every` seconds while the block runs, so that long silent work
    (a UNet export, a calibration pass) shows it is alive."""
    done = threading.Event()
    started = time.perf_counter()

    def beat():
        while not done.wait(every):
            log.info("... still %s (%.0f s)", what, time.perf_counter() - started)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
