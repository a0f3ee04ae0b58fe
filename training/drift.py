"""`railtower drift`: has recent data moved away from what the served bundle was trained on?

Two families of checks, each against thresholds in `drift.*`:

- **event mix**: the population stability index (PSI) of event types, top-level categories
  and price bands (the bundle's own quantile bands, applied to each event's price), plus
  the share of recent events on items the training window never saw;
  PSI = sum_b (q_b - p_b) * ln(q_b / p_b) over bins b, p the reference and q the recent
  shares, each floored at `PSI_FLOOR` so an empty bin costs a bounded amount;
- **item embeddings**: the item-tower vectors of the items events touched (activity
  weighted: one vector per event) in each window; the cosine distance between the two
  mean vectors, and an unbiased RBF-kernel MMD^2 (bandwidth: the median pairwise squared
  distance) on `drift.sample_size` sampled events per window with a permutation p-value.
  Items the bundle has no vector for are encoded by its item tower from the catalogue.

A flag means "retrain": exit code 4, and `--retrain` runs the nightly job instead.

One module on purpose: it is one command (`railtower drift`); the statistics are small
pure functions, and the windows, thresholds and report they feed are only meaningful
together. The statistics would move out first if another command needed them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import pandas as pd  # noqa: E402

from railtower.datasets import load_dataset  # noqa: E402
from railtower.errors import RailtowerError  # noqa: E402
from railtower.logs import get_logger  # noqa: E402
from railtower.manifest import new_version, now_iso  # noqa: E402
from railtower.production import pointer_path  # noqa: E402
from railtower.schemas import category_levels  # noqa: E402
from railtower.settings import DriftSettings, Settings  # noqa: E402
from ranking.bundle import ITEM_TOWER, TowerBundle  # noqa: E402
from ranking.item_attributes import ItemAttributes  # noqa: E402
from ranking.rails_bundle import RailsBundle  # noqa: E402
from towers.item_content import ItemContentEncoder  # noqa: E402
from towers.item_features import PriceBands  # noqa: E402
from towers.text_encoder import TextEncoder  # noqa: E402
from training.fit_towers import catalogue_images  # noqa: E402

log = get_logger(__name__)

EXIT_FLAGGED = 4
PSI_FLOOR = 1e-4
NO_CATEGORY, OTHER = "(none)", "(other)"
VectorLookup = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


class DriftError(RailtowerError):
    """Drift cannot be measured (no bundle, no clock, an empty window); the message says why."""


@dataclass
class DriftReport:
    flagged: bool
    reasons: list[str]
    payload: dict[str, Any]
    json_path: Path
    markdown_path: Path
    plot_path: Path


# ------------------------------------------------------------------ statistics


def psi(reference: np.ndarray, recent: np.ndarray) -> float:
    """Population stability index of two count (or share) vectors over the same bins.

    Example:
        >>> round(psi(np.array([50, 50]), np.array([80, 20])), 4)
        0.4159
    """
    if reference.shape != recent.shape or reference.sum() <= 0 or recent.sum() <= 0:
        raise ValueError("psi needs two non-empty count vectors over the same bins")
    p = np.maximum(reference / reference.sum(), PSI_FLOOR)
    q = np.maximum(recent / recent.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def feature_psi(
    reference: pd.Series, recent: pd.Series, max_bins: int | None = None
) -> dict[str, Any]:
    """PSI of one categorical feature; bins beyond the `max_bins` most frequent (in the
    reference) share one "other" bin, so a long tail does not dominate the index."""
    ref, rec = reference.astype(str), recent.astype(str)
    if max_bins is not None:
        keep = set(ref.value_counts().index[: max_bins - 1])
        ref, rec = ref.where(ref.isin(keep), OTHER), rec.where(rec.isin(keep), OTHER)
    bins = sorted(set(ref) | set(rec))
    p = ref.value_counts().reindex(bins, fill_value=0).to_numpy(float)
    q = rec.value_counts().reindex(bins, fill_value=0).to_numpy(float)
    return {
        "psi": psi(p, q),
        "bins": [
            {"bin": b, "reference": float(pi / p.sum()), "recent": float(qi / q.sum())}
            for b, pi, qi in zip(bins, p, q, strict=True)
        ],
    }


def mmd_permutation_test(
    x: np.ndarray, y: np.ndarray, permutations: int, seed: int
) -> tuple[float, float, float]:
    """Unbiased RBF-kernel MMD^2 of samples x (n, D) and y (m, D), its permutation p-value
    and the kernel bandwidth (median pairwise squared distance of the pooled sample)."""
    z = np.vstack([x, y]).astype(np.float64)
    n, total = len(x), len(x) + len(y)
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    off = d2[np.triu_indices(total, k=1)]
    bandwidth = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    kernel = np.exp(-d2 / bandwidth)

    def statistic(order: np.ndarray) -> float:
        a, b = order[:n], order[n:]
        kxx, kyy = kernel[np.ix_(a, a)], kernel[np.ix_(b, b)]
        m = total - n
        within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        return float(within_x + within_y - 2.0 * kernel[np.ix_(a, b)].mean())

    observed = statistic(np.arange(total))
    rng = np.random.default_rng(seed)
    exceed = sum(statistic(rng.permutation(total)) >= observed for _ in range(permutations))
    return observed, (1 + exceed) / (1 + permutations), bandwidth


# ------------------------------------------------------------------ comparing two windows


def compare_windows(
    reference: pd.DataFrame,
    recent: pd.DataFrame,
    catalogue: pd.DataFrame,
    price_bands: PriceBands,
    vectors: VectorLookup,
    settings: DriftSettings,
    seed: int,
) -> dict[str, Any]:
    """Every drift statistic of `recent` against `reference` (canonical events) and the
    flags they raise; see the module docstring for the definitions."""
    if reference.empty or recent.empty:
        raise DriftError(
            f"cannot compare an empty window (reference {len(reference)}, recent {len(recent)} "
            "events); widen --recent-days or check the bundle's training window"
        )
    path_of = dict(zip(catalogue["item_id"].astype(str), catalogue["category_path"], strict=True))

    def tops(events: pd.DataFrame) -> pd.Series:
        return (
            events["item_id"]
            .astype(str)
            .map(lambda i: category_levels(path_of.get(i), 1)[0] or NO_CATEGORY)
        )

    def bands(events: pd.DataFrame) -> pd.Series:
        frame = pd.DataFrame(
            {"category_path": events["item_id"].astype(str).map(path_of), "price": events["price"]}
        )
        return pd.Series(price_bands.assign(frame)).map(lambda b: f"band {b}" if b else "no price")

    features = {
        "event_type": feature_psi(reference["event_type"], recent["event_type"]),
        "top_category": feature_psi(tops(reference), tops(recent), settings.max_categories),
        "price_band": feature_psi(bands(reference), bands(recent)),
    }
    seen = set(reference["item_id"].astype(str))
    unseen_share = float((~recent["item_id"].astype(str).isin(seen)).mean())
    embedding = embedding_shift(reference, recent, vectors, settings, seed)
    reasons = [
        f"event mix: PSI of {name} {f['psi']:.3f} > {settings.psi_threshold}"
        for name, f in features.items()
        if f["psi"] > settings.psi_threshold
    ]
    if unseen_share > settings.max_unseen_share:
        reasons.append(
            f"unseen items: {unseen_share:.1%} of recent events are on items the training "
            f"window never saw (> {settings.max_unseen_share:.0%})"
        )
    if embedding["mean_cosine_distance"] > settings.max_mean_cosine_distance:
        reasons.append(
            f"item embeddings: mean-vector cosine distance {embedding['mean_cosine_distance']:.4f}"
            f" > {settings.max_mean_cosine_distance}"
        )
    if embedding["mmd_p_value"] < settings.mmd_alpha and embedding["mmd2"] >= settings.mmd_min:
        reasons.append(
            f"item embeddings: MMD^2 {embedding['mmd2']:.4f} >= {settings.mmd_min} "
            f"(permutation p = {embedding['mmd_p_value']:.4f} < {settings.mmd_alpha})"
        )
    return {
        "flagged": bool(reasons),
        "reasons": reasons,
        "events": {"reference": len(reference), "recent": len(recent)},
        "features": features,
        "unseen_share": unseen_share,
        "embedding": embedding,
    }


def embedding_shift(
    reference: pd.DataFrame,
    recent: pd.DataFrame,
    vectors: VectorLookup,
    settings: DriftSettings,
    seed: int,
) -> dict[str, Any]:
    """Mean-vector cosine distance (all events) and the MMD test (sampled events)."""
    rng = np.random.default_rng(seed)

    def event_vectors(events: pd.DataFrame) -> tuple[np.ndarray, int]:
        matrix, found = vectors(events["item_id"].astype(str).tolist())
        return matrix[found], int((~found).sum())

    ref, ref_missing = event_vectors(reference)
    rec, rec_missing = event_vectors(recent)
    if len(ref) < 2 or len(rec) < 2:
        raise DriftError("fewer than two events with an item vector in a window")
    ref_mean, rec_mean = ref.mean(axis=0), rec.mean(axis=0)
    cosine = float(ref_mean @ rec_mean / (np.linalg.norm(ref_mean) * np.linalg.norm(rec_mean)))

    def sample(matrix: np.ndarray) -> np.ndarray:
        if len(matrix) <= settings.sample_size:
            return matrix
        return matrix[rng.choice(len(matrix), settings.sample_size, replace=False)]

    x, y = sample(ref), sample(rec)
    mmd2, p_value, bandwidth = mmd_permutation_test(x, y, settings.permutations, seed)
    unit = ref_mean / np.linalg.norm(ref_mean)
    return {
        "mean_cosine_distance": 1.0 - cosine,
        "mmd2": mmd2,
        "mmd_p_value": p_value,
        "mmd_bandwidth": bandwidth,
        "sampled": {"reference": len(x), "recent": len(y)},
        "without_vector": {"reference": ref_missing, "recent": rec_missing},
        # similarity of each sampled event's item to the reference mean: the histogram
        "similarity_to_reference_mean": {
            "reference": (x @ unit).round(5).tolist(),
            "recent": (y @ unit).round(5).tolist(),
        },
    }


# ------------------------------------------------------------------ item vectors


def bundle_vectors(
    bundle: TowerBundle, catalogue: pd.DataFrame, settings: Settings
) -> VectorLookup:
    """Item vectors from the bundle; items it lacks but the catalogue has are encoded by
    the bundle's item tower (its featurizer state, MiniLM text, photos where configured)."""
    known = dict(bundle.item_row)
    table = bundle.item_vectors
    by_id = catalogue.assign(item_id=catalogue["item_id"].astype(str)).drop_duplicates("item_id")
    new = by_id[~by_id["item_id"].isin(known)].reset_index(drop=True)
    if len(new):
        log.info("encoding items the bundle has no vector for", items=len(new))
        extra = encode_items(bundle, new, settings)
        known.update({item: len(table) + i for i, item in enumerate(new["item_id"])})
        table = np.vstack([table, extra])

    def lookup(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.array([known.get(i, -1) for i in ids], dtype=np.int64)
        found = rows >= 0
        return table[np.where(found, rows, 0)], found

    return lookup


def encode_items(bundle: TowerBundle, items: pd.DataFrame, settings: Settings) -> np.ndarray:
    """(N, D) float32 item-tower vectors of catalogue rows, featurised as training did."""
    texts = TextEncoder(settings.text.model_path, settings.cache_dir, settings.text.batch_size)
    encoder = ItemContentEncoder(bundle.folder / ITEM_TOWER, bundle.featurizer, texts.encode)
    image, has_image = catalogue_images(items, settings)
    return encoder.encode(items, image, has_image)


# ------------------------------------------------------------------ the command


def run_drift(
    settings: Settings,
    dataset: str,
    bundle: Path | None = None,
    recent_days: float | None = None,
    run_name: str | None = None,
) -> DriftReport:
    """Compare the newest `recent_days` of a data set with the bundle's training window.

    The recent window holds the events after the training window's end within the newest
    `recent_days` (if the data has not moved past the training window, simply the newest
    `recent_days`, noted in the report). Writes reports/<run>/drift/{drift.json, drift.md,
    drift.png}.

    Raises:
        DriftError: no bundle, no clock, or an empty window.
    """
    pointer = pointer_path(settings.artifacts_dir, settings.promotion, dataset)
    folder = bundle or (pointer.resolve() if pointer.is_symlink() else None)
    if folder is None or not folder.exists():
        raise DriftError(
            f"no bundle to compare against: {pointer} is not a production pointer; pass "
            f"--bundle or run `railtower nightly -d {dataset}` first"
        )
    rails = RailsBundle.load(folder)
    window = rails.manifest.data[0] if rails.manifest.data else None
    data = load_dataset(dataset, settings)
    if data.events is None or not data.has_time or window is None or window.start is None:
        raise DriftError(f"{dataset}: drift needs timed events and a bundle with a time window")
    events, days = data.events, recent_days or settings.drift.recent_days
    start, end = pd.Timestamp(window.start), pd.Timestamp(window.end)
    reference = events[(events["event_time"] >= start) & (events["event_time"] <= end)]
    newest = events["event_time"] >= events["event_time"].max() - pd.Timedelta(days=days)
    recent = events[newest & (events["event_time"] > end)]
    note = "events after the training window, within the newest recent_days"
    if recent.empty:
        recent, note = events[newest], "no events after the training window: the newest days"
    tower = (
        None
        if rails.tower_bundle is None
        else TowerBundle.load(settings.artifacts_dir / rails.tower_bundle)
    )
    catalogue = pd.concat([rails.items, data.items]).drop_duplicates("item_id", keep="last")
    if tower is None:
        raise DriftError(f"{folder} has no tower bundle: there are no item embeddings to compare")
    result = compare_windows(
        reference,
        recent,
        catalogue,
        ItemAttributes.from_frame(rails.items, settings.towers.price_bands).price_bands,
        bundle_vectors(tower, catalogue, settings),
        settings.drift,
        settings.seed,
    )
    payload = {
        "dataset": dataset,
        "bundle": str(folder),
        "tower_bundle": tower.version,
        "created_at": now_iso(),
        "reference_window": {"start": str(start), "end": str(end)},
        "recent_window": {
            "start": str(recent["event_time"].min()),
            "end": str(recent["event_time"].max()),
            "recent_days": days,
            "note": note,
        },
        "thresholds": settings.drift.model_dump(mode="json"),
        **result,
    }
    out = settings.reports_dir / (run_name or new_version(f"drift-{dataset}")) / "drift"
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_bytes(
        orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    (out / "drift.md").write_text(drift_markdown(payload, settings.drift))
    plot_drift(payload, settings.drift, out / "drift.png")
    log.info("drift measured", dataset=dataset, flagged=result["flagged"], folder=str(out))
    return DriftReport(
        result["flagged"],
        result["reasons"],
        payload,
        out / "drift.json",
        out / "drift.md",
        out / "drift.png",
    )


def drift_markdown(payload: dict[str, Any], settings: DriftSettings) -> str:
    e = payload["embedding"]
    flag = "FLAGGED" if payload["flagged"] else "no drift flagged"
    mmd_flag = e["mmd_p_value"] < settings.mmd_alpha and e["mmd2"] >= settings.mmd_min
    lines = [
        f"## Drift {payload['dataset']}: {flag}",
        "",
        f"Bundle `{payload['bundle']}`; reference {payload['reference_window']['start']} to "
        f"{payload['reference_window']['end']} ({payload['events']['reference']:,} events); recent "
        f"{payload['recent_window']['start']} to {payload['recent_window']['end']} "
        f"({payload['events']['recent']:,} events; {payload['recent_window']['note']}).",
        "",
        "| statistic | value | threshold | flagged |",
        "|---|---|---|---|",
    ]
    for name, f in payload["features"].items():
        over = f["psi"] > settings.psi_threshold
        lines.append(f"| PSI {name} | {f['psi']:.4f} | {settings.psi_threshold} | {over} |")
    lines += [
        f"| unseen-item share | {payload['unseen_share']:.4f} | {settings.max_unseen_share} | "
        f"{payload['unseen_share'] > settings.max_unseen_share} |",
        f"| mean-embedding cosine distance | {e['mean_cosine_distance']:.5f} | "
        f"{settings.max_mean_cosine_distance} | "
        f"{e['mean_cosine_distance'] > settings.max_mean_cosine_distance} |",
        f"| MMD^2 (p-value) | {e['mmd2']:.5f} (p = {e['mmd_p_value']:.4f}) | >= {settings.mmd_min} "
        f"and p < {settings.mmd_alpha} | {mmd_flag} |",
        "",
        f"MMD on {e['sampled']['reference']} / {e['sampled']['recent']} sampled events, "
        f"{settings.permutations} permutations, bandwidth {e['mmd_bandwidth']:.4f}.",
        "",
        *(f"- {r}" for r in payload["reasons"]),
    ]
    return "\n".join(lines) + "\n"


def plot_drift(payload: dict[str, Any], settings: DriftSettings, path: Path) -> None:
    """PSI bars per feature with the threshold line; similarity-to-reference histograms."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(payload["features"])
    values = [payload["features"][n]["psi"] for n in names]
    colours = ["tab:red" if v > settings.psi_threshold else "tab:blue" for v in values]
    left.bar(names, values, color=colours)
    left.axhline(settings.psi_threshold, color="black", linestyle="--", label="threshold")
    left.set_ylabel("PSI")
    left.set_title("event-mix drift")
    left.legend()
    sims = payload["embedding"]["similarity_to_reference_mean"]
    bins = np.linspace(-1, 1, 41)
    right.hist(sims["reference"], bins=bins, alpha=0.6, density=True, label="reference")
    right.hist(sims["recent"], bins=bins, alpha=0.6, density=True, label="recent")
    right.set_xlabel("cosine similarity to the reference mean item vector")
    right.set_title(f"item-embedding shift (MMD^2 {payload['embedding']['mmd2']:.4f})")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
