"""kiln's front door: the `kiln` command, benchmarks and the load test. Nothing below imports it:
runtime/ (what services import), exporters/ and engines/ are libraries, used from here."""
from runtime.version import __version__

__all__ = ["__version__"]
