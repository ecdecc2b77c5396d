"""kiln's runtime: load an artifact folder into a drop-in diffusers pipeline. Imports neither
exporters nor engines; the heavy imports happen when `load_pipeline` is first used."""
from runtime.errors import ArtifactError, KilnError, RequestError, ShapeError
from runtime.version import __version__

__all__ = ["load_pipeline", "KilnError", "ArtifactError", "RequestError", "ShapeError", "__version__"]


def load_pipeline(folder, task: str = "text2img", backend: str | None = None, verify: bool = True, **engine_options):
    from runtime.pipeline import load_pipeline as _load

    return _load(folder, task=task, backend=backend, verify=verify, **engine_options)


load_pipeline.__doc__ = "Load an artifact folder as a diffusers pipeline; see runtime.pipeline.load_pipeline."
