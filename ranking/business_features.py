"""The re-ranker's features: one definition for training and serving, so they cannot skew.

:class:`ItemStats` is fitted once on the training window (popularity and trend, first and
last sighting, price, category, brand, stock, margin, and the learned category
complementarity) and saved with the bundle; :func:`build_features` turns a fused
candidate table plus the queries that asked for it into the feature matrix, in the fixed
column order of :data:`FEATURES`. Training calls it on past requests, serving on live ones.
The price-history features (:mod:`ranking.price_history`) join them: the item's own recent
price level, its discount against it and the deal-spike flag, from prices known strictly
before each request.

One module on purpose: this is the one feature definition training and serving share;
`ItemStats` (what is fitted and saved) and `build_features` (what reads it) kept side by
side are what keeps the column order and the two sides from skewing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import scipy.sparse as sp

from railtower.schemas import category_levels
from railtower.settings import EventWeights, PriceHistorySettings, RankingSettings
from ranking.candidate_fusion import EVIDENCE_COLUMNS, PAIR_COLUMNS, SOURCES, CandidateTable
from ranking.price_history import PRICE_FEATURES, PriceHistory, price_features
from ranking.retriever import Catalogue, Query, event_weight_array
from towers.item_features import PriceBands, stable_bucket

SOURCE_FEATURES = (
    "fused",
    "sources",
    *(f"{s}_{v}" for s in SOURCES for v in ("score", "rank")),
    *PAIR_COLUMNS,
    *EVIDENCE_COLUMNS,
)
ITEM_FEATURES = (
    "popularity_log",
    "recent_popularity_log",
    "trend",
    "price_log",
    "price_band",
    "age_hours_log",
    "idle_hours_log",
    "stock",
    "margin",
)
SESSION_FEATURES = (
    "price_vs_session",
    "band_gap",
    "leaf_match",
    "top_match",
    "brand_match",
    "focus_same_leaf",
    "complement_lift",
)
CONTEXT_FEATURES = ("hour", "context", "session_length", "cart_size", "has_anchor")
FEATURES: tuple[str, ...] = (
    SOURCE_FEATURES + ITEM_FEATURES + SESSION_FEATURES + CONTEXT_FEATURES + PRICE_FEATURES
)
# LightGBM treats these as unordered categories, not numbers.
CATEGORICAL: tuple[str, ...] = ("context",)
_CONTEXT_BUCKETS = 64
_NONE = -1  # code of "no category / no brand"
_MIN_PAIR_SESSIONS = 2  # category pairs seen together in fewer sessions carry no lift


@dataclass
class ItemStats:
    """Per-item statistics of the training window, row-aligned with the catalogue.

    Attributes:
        item_ids: the catalogue's ids, in catalogue order.
        popularity / recent_popularity: event-weighted counts over the whole window and
            over its last `short_window_share` (NaN where the data has no clock).
        first_seen / last_seen: epoch seconds of the item's first and last event (NaN:
            never seen or no clock).
        price: catalogue price, else the median price its events showed (NaN: unknown).
        price_band: quantile band of the price within its top category (0: unknown).
        leaf / top / brand: integer codes (-1: none).
        stock / margin: from the catalogue where it has them, else NaN.
        complement: (leaves, leaves) sparse log-lift of "a session touching leaf a goes on
            to cart or buy from leaf b"; the learned complementarity of pdp_fbt and cart.
        end_time: the window's last event (epoch seconds), "now" for queries with no clock.
        short_share: the trend window as a share of the whole window.
        prices: every price the window's events showed, by item and time (the serving
            path extends it with the catalogue topic's price updates); None: no prices.
        price_settings: windows and deal threshold of the price-history features.
        price_features: False leaves the price-history columns NaN (ranking.price_features).
    """

    item_ids: np.ndarray
    popularity: np.ndarray
    recent_popularity: np.ndarray
    first_seen: np.ndarray
    last_seen: np.ndarray
    price: np.ndarray
    price_band: np.ndarray
    leaf: np.ndarray
    top: np.ndarray
    brand: np.ndarray
    stock: np.ndarray
    margin: np.ndarray
    complement: sp.csr_matrix
    end_time: float
    short_share: float
    prices: PriceHistory | None = None
    price_settings: PriceHistorySettings = field(default_factory=lambda: PriceHistorySettings())
    price_features: bool = True

    def __post_init__(self) -> None:
        self.row: dict[str, int] = {item: i for i, item in enumerate(self.item_ids.tolist())}

    @classmethod
    def fit(
        cls,
        events: pd.DataFrame,
        items: pd.DataFrame,
        catalogue: Catalogue,
        settings: RankingSettings,
        weights: EventWeights,
        price_bands: int,
        strong_event_types: Sequence[str],
    ) -> ItemStats:
        """Statistics of `events` (the training window) over the catalogue `items`."""
        n = len(catalogue)
        rows = catalogue.indices(events["item_id"])
        known = rows >= 0
        ev = events.loc[known]
        rows = rows[known]
        w = event_weight_array(ev["event_type"], weights)
        timed = "event_time" in ev.columns and ev["event_time"].notna().all() and len(ev) > 0
        popularity = np.bincount(rows, weights=w, minlength=n)
        recent = np.full(n, np.nan)
        first = np.full(n, np.nan)
        last = np.full(n, np.nan)
        end = np.nan
        if timed:
            seconds = ev["event_time"].astype("int64").to_numpy() / 1e9
            start, end = float(seconds.min()), float(seconds.max())
            cut = end - settings.short_window_share * (end - start)
            late = seconds >= cut
            recent = np.bincount(rows[late], weights=w[late], minlength=n)
            first = _per_row(rows, seconds, n, np.minimum, np.inf)
            last = _per_row(rows, seconds, n, np.maximum, -np.inf)
        catalogue_items = items.set_index(items["item_id"].astype(str)).reindex(catalogue.ids)
        price = _float_column(catalogue_items, "price")
        if "price" in ev.columns:
            seen = ev.assign(row=rows).dropna(subset=["price"]).groupby("row")["price"].median()
            missing = np.isnan(price)
            fill = seen.reindex(np.arange(n)).to_numpy(dtype=float)
            price[missing] = fill[missing]
        frame = pd.DataFrame(
            {"category_path": _column(catalogue_items, "category_path"), "price": price}
        )
        bands = PriceBands.fit(frame, price_bands).assign(frame)
        leaf, leaves = _codes(frame["category_path"])
        top, _ = _codes(pd.Series([category_levels(p, 1)[0] for p in frame["category_path"]]))
        brand, _ = _codes(_column(catalogue_items, "brand"))
        sessions = ev["session_id"].astype("category").cat.codes.to_numpy()
        strong = ev["event_type"].isin(set(strong_event_types)).to_numpy()
        complement = _complement_lift(sessions, leaf[rows], strong, len(leaves))
        prices = PriceHistory.empty(n)
        if timed and "price" in ev.columns:
            # arrival order within a timestamp is the events' order, as on the stream
            prices = PriceHistory.from_observations(
                n, rows, seconds, pd.to_numeric(ev["price"], errors="coerce").to_numpy(float)
            )
        return cls(
            item_ids=np.asarray(catalogue.ids).astype(str),
            popularity=popularity,
            recent_popularity=recent,
            first_seen=first,
            last_seen=last,
            price=price,
            price_band=bands.astype(np.int64),
            leaf=leaf,
            top=top,
            brand=brand,
            stock=_float_column(catalogue_items, "stock"),
            margin=_float_column(catalogue_items, "margin"),
            complement=complement,
            end_time=end,
            short_share=settings.short_window_share,
            prices=prices,
            price_settings=settings.prices,
            price_features=settings.price_features,
        )

    # ------------------------------------------------------------------ persistence

    _ARRAYS = (
        "item_ids",
        "popularity",
        "recent_popularity",
        "first_seen",
        "last_seen",
        "price",
        "price_band",
        "leaf",
        "top",
        "brand",
        "stock",
        "margin",
    )

    def save(self, folder: Path) -> list[Path]:
        """Write item_stats.npz, complement.npz and item_stats.json; return their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays = folder / "item_stats.npz"
        np.savez(arrays, **{name: getattr(self, name) for name in self._ARRAYS})
        lift = folder / "complement.npz"
        sp.save_npz(lift, self.complement)
        meta = folder / "item_stats.json"
        meta.write_bytes(
            orjson.dumps(
                {
                    "end_time": self.end_time,
                    "short_share": self.short_share,
                    "price_settings": self.price_settings.model_dump(),
                    "price_features": self.price_features,
                }
            )
        )
        written = [arrays, lift, meta]
        if self.prices is not None:
            written.append(self.prices.save(folder / "price_history.npz"))
        return written

    @classmethod
    def load(cls, folder: Path) -> ItemStats:
        with np.load(folder / "item_stats.npz", allow_pickle=False) as data:
            arrays = {name: data[name] for name in cls._ARRAYS}
        meta = orjson.loads((folder / "item_stats.json").read_bytes())
        end = meta["end_time"]
        history = folder / "price_history.npz"
        return cls(
            **arrays,
            complement=sp.load_npz(folder / "complement.npz").tocsr(),
            end_time=float("nan") if end is None else float(end),
            short_share=float(meta["short_share"]),
            prices=PriceHistory.load(history) if history.exists() else None,
            price_settings=PriceHistorySettings.model_validate(meta.get("price_settings", {})),
            price_features=bool(meta.get("price_features", True)),
        )

    def request_times(self, queries: Sequence[Query]) -> np.ndarray:
        """Per query, the time its features are evaluated at: the session's last event,
        else the window's end (NaN with no clock)."""
        return np.array(
            [max(q.session_times) if q.session_times else self.end_time for q in queries],
            dtype=float,
        )

    def price_matrix(self, rows: np.ndarray, nows_s: np.ndarray, ranker: bool = True) -> np.ndarray:
        """Price-history features of item `rows` at `nows_s`, NaN without a price history.

        `ranking.price_features` switches them off for the re-ranker only (`ranker=True`):
        the deals rail reads the same features whatever the ranker uses.
        """
        if (ranker and not self.price_features) or self.prices is None:
            return np.full((len(rows), len(PRICE_FEATURES)), np.nan)
        clock = self.prices.request_clock(nows_s)
        return price_features(self.prices, rows, clock, self.price_settings)


def build_features(table: CandidateTable, queries: Sequence[Query], stats: ItemStats) -> np.ndarray:
    """The (rows of `table`, len(FEATURES)) float32 feature matrix, NaN where unknown.

    Args:
        table: fused candidates; row order is kept.
        queries: the batch the table answers (table["query"] indexes it).
        stats: statistics of the training window the ranker was (or is being) trained on.
    """
    out = np.full((len(table), len(FEATURES)), np.nan, dtype=np.float32)
    col = {name: i for i, name in enumerate(FEATURES)}
    for name in SOURCE_FEATURES:
        if name in table.columns:  # a table built without pair evidence leaves them NaN
            out[:, col[name]] = table[name]
    # a dict lookup per row: Series.map(dict) would copy the whole catalogue's dict per call
    index = stats.row
    ids = table["item_id"]
    rows = np.fromiter(map(index.get, ids, repeat(-1)), np.int64, len(ids))
    known = rows >= 0
    r = rows[known]

    def put(name: str, values: np.ndarray) -> None:
        out[known, col[name]] = values

    put("popularity_log", np.log1p(stats.popularity[r]))
    put("recent_popularity_log", np.log1p(stats.recent_popularity[r]))
    # Recent share of the item's events against the share of time the recent window spans:
    # > 0 rising, < 0 fading.
    put(
        "trend",
        np.log(
            (stats.recent_popularity[r] + 1.0) / (stats.short_share * stats.popularity[r] + 1.0)
        ),
    )
    put("price_log", np.log1p(stats.price[r]))
    put("price_band", stats.price_band[r].astype(float))
    put("stock", stats.stock[r])
    put("margin", stats.margin[r])

    query_of = table["query"]
    _session_features(out, rows, query_of, queries, stats, col)
    # Point in time: each row sees only the prices known before its own request.
    nows = stats.request_times(queries)[query_of] if len(queries) else np.zeros(0)
    start = col[PRICE_FEATURES[0]]
    out[:, start : start + len(PRICE_FEATURES)] = stats.price_matrix(rows, nows)
    return out


@dataclass
class _Sessions:
    """What each query of a batch contributes to its rows' session features: one value
    per query (NaN where it has none), and its seed lists flattened as (query, value) pairs:
    a wholesale basket names hundreds of items, so lists padded to the longest would cost
    rows x longest basket (6 GB on a UCI batch)."""

    now: np.ndarray
    hour: np.ndarray
    context: np.ndarray
    length: np.ndarray
    cart: np.ndarray
    anchor: np.ndarray
    has_seeds: np.ndarray
    price_median: np.ndarray
    band_median: np.ndarray
    # catalogue rows of the session, cart and anchor items (repeats kept), by query
    seeds: tuple[np.ndarray, np.ndarray]
    # rows of the item the request is about (the anchor, else the cart, else the newest)
    focus: tuple[np.ndarray, np.ndarray]
    # distinct leaf codes of the seeds, _NONE left out
    seed_leaves: tuple[np.ndarray, np.ndarray]


def _sessions(queries: Sequence[Query], stats: ItemStats) -> _Sessions:
    """The per-query values, in one pass over the queries (cheap: a few items each)."""
    n = len(queries)
    values = [np.full(n, np.nan) for _ in range(9)]
    now, hour, context, length, cart, anchor, has_seeds, price_median, band_median = values
    seeds: list[list[int]] = []
    focus: list[list[int]] = []
    leaves: list[list[int]] = []
    for q, query in enumerate(queries):
        seed = [stats.row[i] for i in (*query.session_items, *query.cart) if i in stats.row]
        if query.anchor is not None and query.anchor in stats.row:
            seed.append(stats.row[query.anchor])
        focus_ids = (
            [query.anchor] if query.anchor else list(query.cart) or list(query.session_items[-1:])
        )
        focus.append([stats.row[i] for i in focus_ids if i in stats.row])
        seeds.append(seed)
        now[q] = max(query.session_times) if query.session_times else stats.end_time
        if query.session_times:
            hour[q] = (now[q] % 86400) / 3600.0
        if query.context:
            context[q] = stable_bucket([query.context], _CONTEXT_BUCKETS, "context")[0]
        length[q], cart[q] = len(query.session_items), len(query.cart)
        anchor[q] = float(query.anchor is not None)
        has_seeds[q] = float(len(seed) > 0)
        if not seed:
            leaves.append([])
            continue
        seed_rows = np.array(seed, dtype=np.int64)
        prices = [p for p in stats.price[seed_rows].tolist() if not math.isnan(p)]
        if any(math.isfinite(p) for p in prices) and _median(prices) > 0:
            price_median[q] = _median(prices)  # np.nanmedian: NaN left out
        bands = [b for b in stats.price_band[seed_rows].tolist() if b > 0]
        if bands:
            band_median[q] = _median(bands)
        leaves.append(sorted({c for c in stats.leaf[seed_rows].tolist() if c != _NONE}))
    return _Sessions(*values, _flat(seeds), _flat(focus), _flat(leaves))


def _median(values: Sequence[float]) -> float:
    """numpy's median of a short list, in plain Python (a numpy call per query cost more
    than the arithmetic): the middle value, or the mean of the two middle ones, computed
    as numpy computes it, so the features are bit for bit what np.median gave."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (float(ordered[middle - 1]) + float(ordered[middle])) / 2.0


def _flat(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(query of each value, the values), int64, lists concatenated in query order."""
    query = np.repeat(np.arange(len(lists), dtype=np.int64), [len(x) for x in lists])
    return query, np.array([v for x in lists for v in x], dtype=np.int64)


def _session_features(
    out: np.ndarray,
    rows: np.ndarray,
    query_of: np.ndarray,
    queries: Sequence[Query],
    stats: ItemStats,
    col: dict[str, int],
) -> None:
    """Fill every row's features of how its candidate relates to its query's session and
    request, for the whole batch at once: numpy over the rows, with each query's values
    (`_sessions`) spread to its rows; this ran once per query and was a third of the
    re-ranker stage. A query without seed items (no known session, cart or anchor item)
    leaves the seed-based features NaN."""
    per = _sessions(queries, stats)
    known = rows >= 0
    r = np.where(known, rows, 0)
    now = per.now[query_of]

    def put(name: str, values: np.ndarray, where: np.ndarray = known) -> None:
        out[:, col[name]] = np.where(where, values, np.nan)

    put("age_hours_log", np.log1p(np.maximum(now - stats.first_seen[r], 0.0) / 3600.0))
    put("idle_hours_log", np.log1p(np.maximum(now - stats.last_seen[r], 0.0) / 3600.0))
    for name, values in (
        ("hour", per.hour),
        ("context", per.context),
        ("session_length", per.length),
        ("cart_size", per.cart),
        ("has_anchor", per.anchor),
    ):
        out[:, col[name]] = values[query_of]
    seeded = known & (per.has_seeds[query_of] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        put("price_vs_session", np.log((stats.price[r] + 1e-6) / per.price_median[query_of]))
    band = stats.price_band[r]
    put("band_gap", np.where(band > 0, band - per.band_median[query_of], np.nan))
    (seed_query, seed_rows), (focus_query, focus_rows) = per.seeds, per.focus
    n = len(queries)
    for name, codes, by, of in (
        ("leaf_match", stats.leaf, seed_query, seed_rows),
        ("top_match", stats.top, seed_query, seed_rows),
        ("brand_match", stats.brand, seed_query, seed_rows),
        ("focus_same_leaf", stats.leaf, focus_query, focus_rows),
    ):
        put(name, _match_share(codes[r], query_of, by, codes[of], n), seeded)
    put("complement_lift", _complement(stats, stats.leaf[r], query_of, per.seed_leaves), seeded)


def _complement(
    stats: ItemStats,
    leaves: np.ndarray,
    query_of: np.ndarray,
    seed_leaves: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Per row, the largest stored complement lift from any of its query's seed leaves to
    the candidate's leaf; NaN when none is stored or the candidate has no leaf.

    Each (query, seed leaf) expands to the lifts stored in that leaf's row (few: pairs seen
    in two sessions at least), the best per (query, leaf) is kept, and each row looks its
    own up."""
    lift = np.full(len(leaves), np.nan)
    matrix = stats.complement
    seed_query, seed_leaf = seed_leaves
    if not matrix.nnz or not len(seed_leaf):
        return lift
    starts, ends = matrix.indptr[seed_leaf], matrix.indptr[seed_leaf + 1]
    counts = (ends - starts).astype(np.int64)
    offsets = np.repeat(starts - np.cumsum(np.r_[0, counts[:-1]]), counts)
    entries = offsets + np.arange(int(counts.sum()), dtype=np.int64)
    # a stored lift is never 0 (_complement_lift nudges a neutral one); an explicit zero
    # counts as not stored, as the sparse matrix's nonzeros did
    value = matrix.data[entries]
    width = matrix.shape[1]
    key = np.repeat(seed_query, counts) * width + matrix.indices[entries].astype(np.int64)
    key, value = key[value != 0], value[value != 0]
    if not len(key):
        return lift
    order = np.lexsort((value, key))  # by key, largest value last within each key
    last = np.r_[key[order][1:] != key[order][:-1], True]
    keys, best = key[order][last], value[order][last]
    ask = leaves >= 0
    wanted = query_of * width + leaves
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    hit = ask & (keys[at] == wanted)
    lift[hit] = best[at[hit]]
    return lift


def _match_share(
    codes: np.ndarray,
    query_of: np.ndarray,
    seed_query: np.ndarray,
    seed_codes: np.ndarray,
    queries: int,
) -> np.ndarray:
    """Per row, the share of its query's seed codes (`seed_query` names each seed's query)
    equal to the row's code, `_NONE` seeds left out; NaN where the row's code is `_NONE` or
    none of its query's seeds has a code."""
    counted = seed_codes != _NONE
    seed_query, seed_codes = seed_query[counted], seed_codes[counted]
    seeds = np.bincount(seed_query, minlength=queries)[query_of]
    width = int(max(codes.max(initial=0), seed_codes.max(initial=0))) + 1
    keys, same = np.unique(seed_query * width + seed_codes, return_counts=True)
    wanted = query_of * width + codes
    hits = np.zeros(len(codes), dtype=np.int64)
    if len(keys):
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        found = (codes != _NONE) & (keys[at] == wanted)
        hits[found] = same[at[found]]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = hits / seeds
    return np.where((codes != _NONE) & (seeds > 0), share, np.nan)


def _complement_lift(
    sessions: np.ndarray, leaves: np.ndarray, strong: np.ndarray, n_leaves: int
) -> sp.csr_matrix:
    """Log-lift of P(strong event in leaf b | session touched leaf a) over P(strong in b).

    Only pairs seen together in at least two sessions are kept; a lift from one session is
    an anecdote. Without categories or strong events the matrix is empty.
    """
    has = leaves != _NONE
    if n_leaves == 0 or not (has & strong).any():
        return sp.csr_matrix((n_leaves, n_leaves))
    n_sessions = int(sessions.max()) + 1
    touched = sp.csr_matrix(
        (np.ones(has.sum()), (sessions[has], leaves[has])), shape=(n_sessions, n_leaves)
    )
    touched.data[:] = 1.0
    took = has & strong
    bought = sp.csr_matrix(
        (np.ones(took.sum()), (sessions[took], leaves[took])), shape=(n_sessions, n_leaves)
    )
    bought.data[:] = 1.0
    together = (touched.T @ bought).tocoo()
    keep = together.data >= _MIN_PAIR_SESSIONS
    a, b, count = together.row[keep], together.col[keep], together.data[keep]
    touched_n = np.asarray(touched.sum(axis=0)).ravel()
    bought_n = np.asarray(bought.sum(axis=0)).ravel()
    lift = np.log(count * n_sessions / (touched_n[a] * bought_n[b]))
    # log-lift 0 would vanish from a sparse matrix; nudge it so "known, neutral" survives.
    lift[lift == 0] = 1e-6
    return sp.csr_matrix((lift, (a, b)), shape=(n_leaves, n_leaves))


def _per_row(
    rows: np.ndarray, values: np.ndarray, n: int, op: np.ufunc, start: float
) -> np.ndarray:
    out = np.full(n, start)
    op.at(out, rows, values)
    out[np.isinf(out)] = np.nan
    return out


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame.columns:
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    return frame[name].astype(object).where(frame[name].notna(), None)


def _float_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)


def _codes(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer code per value (-1 for none) and the sorted distinct values."""
    text = pd.Series(values).astype(object).where(pd.Series(values).notna(), None)
    distinct = sorted({v for v in text if isinstance(v, str) and v})
    index = {v: i for i, v in enumerate(distinct)}
    codes = np.array([index.get(v, _NONE) if isinstance(v, str) else _NONE for v in text])
    return codes.astype(np.int64), distinct
