"""The one artifact manifest: what a bundle or an evaluation run is made of, and proof of it.

Every folder Railtower writes for others to load (a trained bundle, an evaluation run)
carries `manifest.json`: its version, the data window it saw, its metrics, the settings
fingerprint, library versions and a SHA-256 per file. Loading verifies the hashes, so a
half-copied or hand-edited bundle is refused instead of served.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from railtower.errors import ArtifactMismatch
from railtower.settings import PROJECT_ROOT

MANIFEST = "manifest.json"
_LIBRARIES = ("torch", "numpy", "pandas", "scipy", "lightgbm", "hnswlib", "railtower")


class DataWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str
    files: dict[str, str]  # path -> sha256
    events: int | None = None
    start: str | None = None
    end: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["bundle", "evaluation", "rails"]
    version: str
    created_at: str
    git_commit: str | None
    settings_fingerprint: str
    data: list[DataWindow] = []
    metrics: dict[str, Any] = {}
    files: dict[str, str] = {}  # path relative to the folder -> sha256
    libraries: dict[str, str] = {}

    def write(self, folder: Path) -> Path:
        """Hash every file in `folder` (but the manifest) and write the manifest beside them."""
        files = {
            str(p.relative_to(folder)): sha256_of(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        final = self.model_copy(update={"files": files})
        path = folder / MANIFEST
        path.write_bytes(orjson.dumps(final.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
        return path

    @classmethod
    def load(cls, folder: Path, verify: bool = True) -> Manifest:
        """Read a folder's manifest; with `verify`, refuse it if any file differs from it."""
        path = folder / MANIFEST
        if not path.exists():
            raise ArtifactMismatch(
                f"{folder} has no {MANIFEST}; serving loads bundles, not loose files"
            )
        manifest = cls.model_validate(orjson.loads(path.read_bytes()))
        if verify:
            for rel, digest in manifest.files.items():
                file = folder / rel
                if not file.exists():
                    raise ArtifactMismatch(f"{file} is listed in {path} but missing")
                if sha256_of(file) != digest:
                    raise ArtifactMismatch(
                        f"{file} does not match its hash in {path}; "
                        "rebuild the bundle instead of editing it"
                    )
        return manifest


def new_version(prefix: str = "") -> str:
    """A sortable version string: UTC time plus the short commit."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    commit = git_commit()
    return "-".join(p for p in (prefix, stamp, (commit or "nogit")[:8]) if p)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
