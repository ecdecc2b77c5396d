"""`kiln loadtest`: percentiles, bounds, and a clear error when nothing answers."""
from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

from kiln.cli import cli
from kiln.loadtest import LoadOptions, percentile, run_load
from runtime.errors import OptionsError, ServiceUnavailableError


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50.0, 95.0, 99.0)
    assert percentile([3.0], 99) == 3.0


def test_no_service_is_one_error():
    pytest.importorskip("httpx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(cli, ["loadtest", f"http://127.0.0.1:{port}", "--requests", "1"])
    assert r.exit_code == 2 and "no kiln service answers" in r.output
    with pytest.raises(ServiceUnavailableError):
        run_load(f"http://127.0.0.1:{port}", LoadOptions(requests=1))


def test_load_options_are_checked():
    with pytest.raises(OptionsError, match="clients and requests must be >= 1"):
        LoadOptions(clients=0)
