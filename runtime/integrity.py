"""Is an artifact folder safe to load? Every path the runtime opens (engine files and their external
data, refit weights, the tokenizer and scheduler files) must be a relative path inside the folder
after symlinks are resolved, and listed with its sha256; a file a loader would read that is not
listed is refused. Checksums are verified before any engine file is parsed."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from runtime.errors import ArtifactError, format_table
from runtime.files import path_problem
from runtime.manifest import Manifest, verify_files

__all__ = ["check_artifact", "onnx_external_locations", "path_problem"]


def check_artifact(manifest: Manifest, components, assets=(), verify: bool = True) -> None:
    """Confine and (verify=True) checksum everything loading `components` and the `assets` folders
    (the family's tokenizers and scheduler) reads; ArtifactError with one table of every problem."""
    folder = manifest.folder
    listed = manifest.data["files"]
    problems = [(rel, "a relative path inside the folder", why) for rel in listed
                if (why := path_problem(folder, rel))]
    missing = [name for name in components if name not in manifest.data["components"]]
    if missing:
        raise ArtifactError(f"{folder} has no {', '.join(missing)} engine; rebuild it with them")
    for name in components:
        c = manifest.data["components"][name]
        extra = [c["refit_onnx"]] if c.get("refit_onnx") else []
        extra += [c["refit"]["weights"]] if c.get("refit") else []
        for rel in dict.fromkeys([c["file"], *c["files"], *extra]):
            if rel not in listed:
                problems.append((rel, f"{name}: a file listed in the manifest", path_problem(folder, rel) or "not listed"))
    for asset in assets:
        problems += _asset_problems(folder, asset, listed)
    if problems:
        raise ArtifactError(f"{folder} is not safe to load:\n" + format_table(["path", "expected", "found"], problems)
                            + "\nAn artifact may name only files inside itself, each listed with its sha256; rebuild it")
    if verify:
        verify_files(manifest)
    problems = [row for name in components for row in _external_data_problems(manifest, name)]
    if problems:
        raise ArtifactError(f"{folder}: engine graphs read files the manifest does not list:\n"
                            + format_table(["graph", "reads", "found"], problems) + "\nRebuild the artifact")


def _asset_problems(folder: Path, asset: str, listed) -> list[tuple[str, str, str]]:
    """Every file below an asset folder is read by some loader: each must be confined and listed."""
    why = path_problem(folder, asset)
    if why:
        return [(asset, "a folder inside the artifact", why)]
    rows = []
    for root, dirs, files in os.walk(folder / asset):
        for entry in dirs + files:
            rel = (Path(root) / entry).relative_to(folder).as_posix()
            if (why := path_problem(folder, rel)):
                rows.append((rel, "inside the folder", why))
            elif entry in files and rel not in listed:
                rows.append((rel, "listed in the manifest's files", "not listed (a loader would read it)"))
    return rows


def _external_data_problems(manifest: Manifest, name: str) -> list[tuple[str, str, str]]:
    """External data an ONNX graph of this component names must be a listed file next to it."""
    c = manifest.data["components"][name]
    graphs = [rel for rel in (c["file"], c.get("refit_onnx")) if rel and rel.endswith(".onnx")]
    rows = []
    for rel in graphs:
        for location in onnx_external_locations(manifest.folder / rel):
            target = (PurePosixPath(rel).parent / location).as_posix()
            if path_problem(manifest.folder, target) or target not in manifest.data["files"]:
                rows.append((rel, location, "outside the folder or not listed"))
    return rows


def onnx_external_locations(path: Path) -> set[str]:
    """The external data files an ONNX model refers to, in every graph it holds (subgraphs of If and
    Loop, functions, sparse initializers, tensor attributes); its weights stay unread."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own untyped errors for a damaged file
        raise ArtifactError(f"{path} is not a readable ONNX graph ({type(exc).__name__}); rebuild the artifact") from exc
    return {e.value for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def _tensors(model):
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for sparse in g.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            nodes.extend(g.node)
            continue
        for a in nodes.pop().attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
