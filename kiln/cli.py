"""The `kiln` command: export, build, inspect, generate, bench, serve, loadtest. Commands only
build option dataclasses and call library functions; every KilnError becomes a one-line message
and exit status 2."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from runtime.errors import KilnError

log = logging.getLogger("kiln")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that the same cleanup as for Ctrl-C runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


class KilnGroup(click.Group):
    def invoke(self, ctx):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except KilnError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
            click.echo(f"stopped by {signal.Signals(signum).name}: nothing half-written was kept", err=True)
            sys.exit(128 + signum)


@click.group(cls=KilnGroup)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (graph passes, parity tables).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
@click.version_option(package_name="kiln")
def cli(verbose: bool, quiet: bool):
    """kiln: build Stable Diffusion engines ahead of time and run them as a diffusers pipeline."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # torchvision and similar notices, not ours
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    setup_logging(level)


def setup_logging(level: int) -> None:
    """Progress from kiln's own packages goes to stderr, so stdout stays clean for --json."""
    for name in ("exporters", "engines", "runtime", "kiln"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_kiln", False) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record."""

    _kiln = True

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _register() -> None:
    from kiln import cli_build, cli_run

    for command in (cli_build.export, cli_build.build, cli_build.inspect, cli_run.generate, cli_run.bench,
                    cli_run.serve, cli_run.loadtest):
        cli.add_command(command)


_register()


def main():
    cli(prog_name="kiln")


if __name__ == "__main__":
    main()
