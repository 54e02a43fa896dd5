"""The export directory: programs plus ``manifest.json``, which says how to feed them and holds a
sha256 of every file, so a tampered or truncated artifact is refused before anything runs.

Loading needs only ``torch``: this module imports nothing else from the package, so a serving
process may copy it, or read the manifest itself (its format is documented in docs/serving.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
FORMAT = "lightning-mtr-artifact/1"
PROGRAM = "model.pt2"
AOT_PROGRAM = "model.aoti.pt2"  # AOTInductor package, for C++ (--aot)


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these loggers: torch's harmless warnings would bury a scorer's own
    one-line messages on stderr."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` to write into; the caller moves its results into ``out``
    only once all of them are written, so a failed or refused run leaves ``out`` as it was. The
    staging directory is gone afterwards either way."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class ArtifactError(ValueError):
    """A missing, unreadable, tampered or truncated artifact."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """``manifest`` plus ``files``: the sha256 of every file written so far in ``directory``."""
    files = {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, **manifest, "files": files}, indent=2) + "\n")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest, once every file it lists is present and matches its sha256."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: no {MANIFEST}; not an export of lightning-mtr") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{directory / MANIFEST}: not valid JSON ({error}); the artifact is damaged") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{directory / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, digest in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing; the artifact is incomplete")
        if sha256(path) != digest:
            raise ArtifactError(f"{path}: sha256 differs from {MANIFEST} (tampered or truncated); export it again")
    return manifest


@dataclass
class Artifact:
    """A checked artifact: ``score(dense, values, lengths[, weights]) -> {output: [B]}`` (``weights``:
    for a schema with weighted ids, see ``manifest["inputs"]``)."""

    directory: Path
    manifest: dict[str, Any]
    program: torch.nn.Module

    @property
    def output_names(self) -> list[str]:
        return [output["name"] for output in self.manifest["outputs"]]

    def score(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
              weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.program(dense, values, lengths, *(() if weights is None else (weights,)))


def load_artifact(directory: str | Path, program: str = PROGRAM) -> Artifact:
    """Check the manifest and every file's sha256, then load ``program``."""
    manifest = read_manifest(directory)
    if program not in manifest["files"]:
        raise ArtifactError(f"{directory}: no {program} in {MANIFEST}")
    with quiet_loggers("torch._export.serde.serialize"):  # "Symbol u1 did not appear in the graph", each load
        return Artifact(Path(directory), manifest, torch.export.load(Path(directory) / program).module())
