"""Export a tower bundle's two towers as new versions of the Triton models: the session
encoder as `user_tower`, the item tower (which encodes items listed after training) as
`item_tower`.

Each model's committed `triton_models/<model>/config.pbtxt` is the template: outputs, backend
and version policy are fixed by the code that feeds the model. Its `input` block is rendered
from the one spec of that tower's inputs (`towers.session_features.SESSION_INPUTS`,
`towers.item_features.ITEM_TOWER_INPUTS`), and how Triton runs it
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
from towers.item_features import ITEM_TOWER_INPUTS
from towers.session_features import SESSION_INPUTS

TEMPLATE = PROJECT_ROOT / "triton_models" / "user_tower"
ITEM_TEMPLATE = PROJECT_ROOT / "triton_models" / "item_tower"
ITEM_TOWER_FILE = "item_tower.pt"  # the file name the item tower's model.py loads
KEEP_VERSIONS = 6  # older version folders are pruned; the config loads every one kept

# The two blocks of the template the settings own; everything else is copied as it is.
_BATCHING = re.compile(r"^dynamic_batching\s*\{[^}]*\}\n", re.MULTILINE)
_INSTANCES = re.compile(r"^instance_group\s*\[[^\]]*\]\n", re.MULTILINE)
# The inputs come from the one session-side spec (towers.session_features.SESSION_INPUTS).
_INPUTS = re.compile(r"^input\s*\[\n(?:[ \t].*\n)*\]\n", re.MULTILINE)  # indented rows


def session_input_rows() -> list[str]:
    """The user tower's `input` rows, from the session-side spec."""
    return [
        f'  {{ name: "{i.name}", data_type: TYPE_INT64, dims: [ {-1 if i.per_event else 1} ] }}'
        for i in SESSION_INPUTS
    ]


def item_input_rows() -> list[str]:
    """The item tower's `input` rows, from the item tower's input spec."""
    return [
        f'  {{ name: "{i.name}", data_type: TYPE_{i.dtype}, dims: [ {i.dims} ] }}'
        for i in ITEM_TOWER_INPUTS
    ]


def render_config(
    template: str, triton: TritonModelSettings, inputs: list[str] | None = None
) -> str:
    """`template` (config.pbtxt text) with its dynamic_batching and instance_group blocks
    replaced by the ones `triton` describes, and its input block by `inputs` (rows; default
    the user tower's).

    Raises:
        ValueError: the template lacks one of the two blocks (edited by hand?).
    """
    blocks = (("dynamic_batching", _BATCHING), ("instance_group", _INSTANCES), ("input", _INPUTS))
    for name, pattern in blocks:
        if len(pattern.findall(template)) != 1:
            raise ValueError(
                f"the model's config.pbtxt template (triton_models/<model>/) must hold exactly "
                f"one {name} block for the export to fill (from serving.triton and the "
                "tower's input spec); restore it from git"
            )
    declared = re.search(r"^max_batch_size:\s*(\d+)", template, re.MULTILINE)
    if declared is None or int(declared.group(1)) != TRITON_MAX_BATCH:
        # clients chunk requests by TRITON_MAX_BATCH; a different model limit would refuse them
        raise ValueError(
            "the model's config.pbtxt template (triton_models/<model>/) must declare "
            f"max_batch_size: {TRITON_MAX_BATCH} "
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
    block = "input [\n" + ",\n".join(inputs or session_input_rows()) + "\n]\n"
    text = _BATCHING.sub(lambda _: batching, template)
    text = _INPUTS.sub(lambda _: block, text)
    return _INSTANCES.sub(lambda _: instances, text)


def write_config(model_dir: Path, triton: TritonModelSettings, template: Path = TEMPLATE) -> Path:
    """Write the rendered config.pbtxt of the model whose template folder is `template` into
    `model_dir` (atomically, only if it changed)."""
    path = model_dir / "config.pbtxt"
    rows = item_input_rows() if template == ITEM_TEMPLATE else session_input_rows()
    text = render_config((template / "config.pbtxt").read_text(), triton, rows)
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
    return _export(
        TEMPLATE, encoder, "session_encoder.pt", bundle_version, repository, model, triton
    )


def export_item_tower(
    item_tower: Path,
    bundle_version: str,
    repository: Path,
    model: str,
    triton: TritonModelSettings | None = None,
) -> int:
    """Copy the bundle's TorchScript item tower into `<repository>/<model>/<n>/` like
    `export_user_tower`; returns the new version number n."""
    return _export(
        ITEM_TEMPLATE, item_tower, ITEM_TOWER_FILE, bundle_version, repository, model, triton
    )


def _export(
    template: Path,
    weights: Path,
    name: str,
    bundle_version: str,
    repository: Path,
    model: str,
    triton: TritonModelSettings | None,
) -> int:
    triton = triton or get_settings().serving.triton
    model_dir = repository / model
    model_dir.mkdir(parents=True, exist_ok=True)
    if model_dir.resolve() != template.resolve():
        shutil.copy2(template / "model.py", model_dir / "model.py")
    write_config(model_dir, triton, template)
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    version = (versions[-1] if versions else 0) + 1
    staging = model_dir / f".{version}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shutil.copy2(template / "model.py", staging / "model.py")
    shutil.copy2(weights, staging / name)
    (staging / "bundle.txt").write_text(bundle_version + "\n")
    # Renamed into place only when complete: a polling Triton never sees half a version.
    staging.rename(model_dir / str(version))
    for old in versions[: max(0, len(versions) + 1 - KEEP_VERSIONS)]:
        shutil.rmtree(model_dir / str(old), ignore_errors=True)
    return version
