"""Export a tower bundle's session encoder as a new version of the Triton user-tower model.

The committed `triton_models/user_tower/config.pbtxt` is the template: outputs, backend and
version policy are fixed by the code that feeds the model. Its `input` block is rendered from
the one session-side spec (`towers.session_features.SESSION_INPUTS`), and how Triton runs it
(`instance_group` count and kind, `dynamic_batching` delay and preferred sizes) is
configuration (`serving.triton`), so the export renders those three blocks into the
repository's config.pbtxt. A config that did not change is not rewritten, so a
polling Triton does not reload the model for nothing.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from railtower.settings import (
    PROJECT_ROOT,
    TRITON_MAX_BATCH,
    TritonModelSettings,
    get_settings,
)
from towers.session_features import SESSION_INPUTS

TEMPLATE = PROJECT_ROOT / "triton_models" / "user_tower"
KEEP_VERSIONS = 6  # older version folders are pruned; the config loads every one kept

# The two blocks of the template the settings own; everything else is copied as it is.
_BATCHING = re.compile(r"^dynamic_batching\s*\{[^}]*\}\n", re.MULTILINE)
_INSTANCES = re.compile(r"^instance_group\s*\[[^\]]*\]\n", re.MULTILINE)
# The inputs come from the one session-side spec (towers.session_features.SESSION_INPUTS).
_INPUTS = re.compile(r"^input\s*\[\n(?:[ \t].*\n)*\]\n", re.MULTILINE)  # indented rows


def render_config(template: str, triton: TritonModelSettings) -> str:
    """`template` (config.pbtxt text) with its dynamic_batching and instance_group blocks
    replaced by the ones `triton` describes.

    Raises:
        ValueError: the template lacks one of the two blocks (edited by hand?).
    """
    blocks = (("dynamic_batching", _BATCHING), ("instance_group", _INSTANCES), ("input", _INPUTS))
    for name, pattern in blocks:
        if len(pattern.findall(template)) != 1:
            raise ValueError(
                f"{TEMPLATE / 'config.pbtxt'} must hold exactly one {name} block for the "
                "export to fill (from serving.triton and the session inputs); restore it from git"
            )
    declared = re.search(r"^max_batch_size:\s*(\d+)", template, re.MULTILINE)
    if declared is None or int(declared.group(1)) != TRITON_MAX_BATCH:
        # clients chunk requests by TRITON_MAX_BATCH; a different model limit would refuse them
        raise ValueError(
            f"{TEMPLATE / 'config.pbtxt'} must declare max_batch_size: {TRITON_MAX_BATCH} "
            "(railtower.settings.TRITON_MAX_BATCH); change both together"
        )
    sizes = ", ".join(str(size) for size in triton.preferred_batch_sizes)
    batching = (
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {triton.max_queue_delay_us}\n"
        + (f"  preferred_batch_size: [ {sizes} ]\n" if sizes else "")
        + "}\n"
    )
    instances = f"instance_group [ {{ count: {triton.instances}, kind: {triton.kind} }} ]\n"
    rows = [
        f'  {{ name: "{i.name}", data_type: TYPE_INT64, dims: [ {-1 if i.per_event else 1} ] }}'
        for i in SESSION_INPUTS
    ]
    inputs = "input [\n" + ",\n".join(rows) + "\n]\n"
    text = _BATCHING.sub(lambda _: batching, template)
    text = _INPUTS.sub(lambda _: inputs, text)
    return _INSTANCES.sub(lambda _: instances, text)


def write_config(model_dir: Path, triton: TritonModelSettings) -> Path:
    """Write the rendered config.pbtxt into `model_dir` (atomically, only if it changed)."""
    path = model_dir / "config.pbtxt"
    text = render_config((TEMPLATE / "config.pbtxt").read_text(), triton)
    if path.exists() and path.read_text() == text:
        return path
    staging = model_dir / f".config.pbtxt.{os.getpid()}.tmp"
    staging.write_text(text)
    os.replace(staging, path)  # a polling Triton reads the old file or the new, never half
    return path


def export_user_tower(
    encoder: Path,
    bundle_version: str,
    repository: Path,
    model: str,
    triton: TritonModelSettings | None = None,
) -> int:
    """Copy `encoder` (TorchScript) into `<repository>/<model>/<n>/` with the backend code,
    and write the model's config.pbtxt from `triton` (default: `serving.triton`).

    Returns the new version number n (one above the highest present).
    """
    triton = triton or get_settings().serving.triton
    model_dir = repository / model
    model_dir.mkdir(parents=True, exist_ok=True)
    if model_dir.resolve() != TEMPLATE.resolve():
        shutil.copy2(TEMPLATE / "model.py", model_dir / "model.py")
    write_config(model_dir, triton)
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
