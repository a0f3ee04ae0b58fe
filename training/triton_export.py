"""Export a tower bundle's session encoder as a new version of the Triton user-tower model."""

from __future__ import annotations

import shutil
from pathlib import Path

from railtower.settings import PROJECT_ROOT

TEMPLATE = PROJECT_ROOT / "triton_models" / "user_tower"
KEEP_VERSIONS = 6  # older version folders are pruned; the config loads every one kept


def export_user_tower(encoder: Path, bundle_version: str, repository: Path, model: str) -> int:
    """Copy `encoder` (TorchScript) into `<repository>/<model>/<n>/` with the backend code.

    Returns the new version number n (one above the highest present).
    """
    model_dir = repository / model
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.pbtxt", "model.py"):
        if model_dir.resolve() != TEMPLATE.resolve():
            shutil.copy2(TEMPLATE / name, model_dir / name)
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    version = (versions[-1] if versions else 0) + 1
    staging = model_dir / f".{version}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shutil.copy2(TEMPLATE / "model.py", staging / "model.py")
    shutil.copy2(encoder, staging / "session_encoder.pt")
    (staging / "bundle.txt").write_text(bundle_version + "\n")
    # Renamed into place only when complete: a polling Triton never sees half a version.
    staging.rename(model_dir / str(version))
    for old in versions[: max(0, len(versions) + 1 - KEEP_VERSIONS)]:
        shutil.rmtree(model_dir / str(old), ignore_errors=True)
    return version
