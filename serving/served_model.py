"""The model an API process serves, and what keeps it current: loading and hot swaps, the
live canary's challenger (serving.canary_route), the catalogue changes (stock, price,
retirements, new items: serving.new_items; a sync's changes applied as one batch) and
the price stream other processes publish to Redis.

The request path (serving.service.RailService) builds on it; the refresh consumer drives it
through the same object (streaming.consumer.RailRefresher), so the consumer's process sees
every change the API processes see.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import redis

from railtower.canary import CANARY_ARM, read_canary
from railtower.errors import ArtifactMismatch
from railtower.heap import settle_heap
from railtower.logs import get_logger
from railtower.settings import RAILS, Settings
from ranking.engine import compute
from ranking.rail_inputs import RAIL_INPUTS, rail_parts, rail_query
from serving.canary_route import CanaryRoute
from serving.metrics import Metrics
from serving.new_items import apply_records
from serving.price_follower import PriceFollower
from serving.rail_service import LoadedRails, load_rails
from serving.user_vectors import TritonUserTower
from state.price_store import PricePoint, PriceStore, price_points_ttl_s
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

log = get_logger(__name__)

PRODUCTION_ARM = "production"


class CatalogueWatcher(Protocol):
    """Sees every catalogue change this process applies (the shadow arms' challenger must
    see the same stock, retirements and new items as production), a sync's changes at once
    (item -> record), so its new listings are encoded in one batch too."""

    def catalogue_changed(self, records: Mapping[str, Mapping[str, object]]) -> None: ...


class ServedModel:
    """The served model and its state stores; swapped whole, never edited in place by a
    request (each request reads `loaded` once)."""

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedRails | None,
        store: SessionStore | None,
        triton: TritonUserTower | None,
        metrics: Metrics,
    ) -> None:
        self.settings, self.loaded, self.store, self.triton = settings, loaded, store, triton
        self.metrics = metrics
        self._swap_lock = threading.Lock()
        # Held by a catalogue sync for its whole read-apply-record step and by a swap for its
        # replay-and-assign step: a sync that read a change and applied it to the old model
        # must not record its version after a swap whose replay came before that change.
        self._catalogue_lock = threading.Lock()
        self.source: Path | None = None
        self._catalogue_version = 0
        # Price observations the consumer published (state.price_store): deals and the
        # re-ranker's price-history features follow them.
        self.prices = (
            None
            if store is None
            else PriceFollower(
                PriceStore(
                    store.client,
                    settings.serving.price_points_max,
                    settings.serving.state_ttl_s,
                    price_points_ttl_s(settings),
                )
            )
        )
        self.observer: CatalogueWatcher | None = None
        # The live canary's challenger and its share of sessions (None: production only);
        # replaced whole by follow_canary, read once per request by `route`.
        self.canary: CanaryRoute | None = None

    @property
    def ready(self) -> bool:
        """Ready when a model (index, rankers, rules) is loaded."""
        return self.loaded is not None

    def load(self, folder: Path) -> bool:
        """Load `folder` and swap it in; on failure keep serving the last good model.

        Returns True when the new model is now served.
        """
        with self._swap_lock:
            try:
                fresh = load_rails(folder, self.settings)
            except (ArtifactMismatch, OSError, ValueError) as exc:
                self.metrics.errors.labels(kind="bundle_load").inc()
                log.error(
                    "bundle not loaded; keeping the current model",
                    folder=str(folder),
                    error=str(exc),
                    serving=None if self.loaded is None else self.loaded.version,
                )
                return False
            _warm_up(fresh, self.triton)
            # the stock and prices this process has applied hold for the new model too: an
            # item out of stock must not come back because the bundle changed
            with self._catalogue_lock:
                self._catalogue_version = self._replay_catalogue(fresh)
                self.loaded, self.source = fresh, folder.resolve()
            self.settle("model loaded")
            self.metrics.model_info.info({"version": fresh.version})
            log.info("serving model", version=fresh.version, folder=str(folder))
            return True

    def settle(self, reason: str) -> None:
        """One full collection now, then the loaded models are out of the collector's way
        (railtower.heap): the pause is paid here, on the loading thread, not by requests."""
        if self.settings.serving.settle_heap:
            settle_heap(reason)

    def reload_if_moved(self, pointer: Path) -> bool:
        """Hot-swap when the production pointer now names another bundle."""
        if not pointer.exists() or pointer.resolve() == self.source:
            return False
        return self.load(pointer)

    def route(self, session_id: str) -> tuple[LoadedRails | None, str]:
        """The model that serves `session_id` and its arm: the canary's challenger for the
        sessions its share takes, production for the rest."""
        canary = self.canary
        if canary is not None and canary.takes(session_id):
            return canary.loaded, CANARY_ARM
        return self.loaded, PRODUCTION_ARM

    def follow_canary(self, pointer: Path) -> bool:
        """Apply the canary state beside `pointer` (railtower.canary): load the challenger
        when a canary starts, follow its share, drop it when it ends. A challenger that
        fails to load leaves production serving every session. Returns True on a change.
        """
        try:
            state = read_canary(pointer)
        except (OSError, ValueError) as exc:
            self.metrics.errors.labels(kind="canary_state").inc()
            log.error("canary state unreadable; keeping the current routing", error=str(exc))
            return False
        route = self.canary
        if state is not None and state.status == "promoted":
            # The pointer names the challenger now: serve it as production before the
            # route goes, so its sessions never flip back to the old model in between.
            self.reload_if_moved(pointer)
        if state is None or not state.live:
            self.canary = None
            if route is not None:
                log.info("canary over", version=route.version, status=state and state.status)
            return route is not None
        source = Path(state.challenger_path).resolve()
        if route is not None and route.source == source:
            if route.state == state:
                return False
            self.canary = CanaryRoute(
                route.version, state.share, state.salt, route.loaded, source, state
            )
            log.info("canary share", version=route.version, share=state.share)
            return True
        with self._swap_lock:
            try:
                fresh = load_rails(source, self.settings)
            except (ArtifactMismatch, OSError, ValueError) as exc:
                self.metrics.errors.labels(kind="canary_load").inc()
                log.error("challenger not loaded; production serves every session", error=str(exc))
                self.canary = None
                return route is not None
            _warm_up(fresh, self.triton)
            with self._catalogue_lock:  # the same stock and prices as production
                self._replay_catalogue(fresh)
                self.canary = CanaryRoute(
                    fresh.version, state.share, state.salt, fresh, source, state
                )
            self.settle("challenger loaded")
        log.info("canary serving", version=fresh.version, share=state.share)
        return True

    def _replay_catalogue(self, fresh: LoadedRails) -> int:
        """Apply every published price/stock change to a model about to be served; returns
        the catalogue version it reached (-1 if Redis cannot say: the next catalogue sync
        then replays them all)."""
        if self.store is None:
            return self._catalogue_version
        try:
            version, changes = self.store.catalogue_changes(-1)
        except redis.RedisError:
            return -1
        apply_records(fresh, changes)  # new listings: one encoding batch, one index swap
        return version

    def watch_catalogue(self, observer: CatalogueWatcher) -> None:
        """Attach `observer` (the shadow arms' runner) and give it every record published so
        far: its challenger is loaded after production replayed the catalogue, and must
        start from the same stock, retirements and new items, not from the next change."""
        with self._catalogue_lock:
            self.observer = observer  # type: ignore[assignment]
            if self.store is None:
                return
            try:
                _, changes = self.store.catalogue_changes(-1)
            except redis.RedisError:
                return  # the next sync after a change brings that item only; logged there
            observer.catalogue_changed(changes)

    def apply_catalogue_change(self, item_id: str, price: float | None, stock: int | None) -> bool:
        """Apply a price/stock change to the served model's item attributes.

        Returns False for an item the model does not know (it cannot be recommended anyway).
        """
        return self.apply_catalogue_record(item_id, {"price": price, "stock": stock})

    def apply_catalogue_record(self, item_id: str, record: Mapping[str, object]) -> bool:
        """Apply a catalogue record (price, stock, margin, `retired`, a new item's listing:
        serving.new_items) to every model this process serves.

        Returns False when the production model neither knows the item nor gets a listing.
        """
        return self.apply_catalogue_records({item_id: record}) == 1

    def apply_catalogue_records(self, records: Mapping[str, Mapping[str, object]]) -> int:
        """Apply many catalogue records (item -> record) to every model this process serves,
        each model's new listings encoded in one batch and indexed by one swap
        (serving.new_items.apply_records). Returns how many the production model applied."""
        if not records:
            return 0
        if self.observer is not None:  # a shadowed challenger must see the same stock
            self.observer.catalogue_changed(records)
        canary = self.canary  # so must the canary's: an item out of stock leaves both arms
        if canary is not None:
            apply_records(canary.loaded, records)
        loaded = self.loaded
        return 0 if loaded is None else apply_records(loaded, records)

    def sync_catalogue(self) -> int:
        """Pull the catalogue changes other processes published to Redis; return how many."""
        if self.store is None:
            return 0
        with self._catalogue_lock:
            try:
                version, changes = self.store.catalogue_changes(self._catalogue_version)
                if self.prices is not None:
                    self.prices.sync(self.loaded)
            except redis.RedisError:
                return 0  # Redis down: keep the attributes we have
            self.apply_catalogue_records(changes)
            self._catalogue_version = version
            return len(changes)

    def append_prices(self, points: Sequence[PricePoint]) -> int:
        """Append price observations to the shared stream (the consumer's step); returns how
        many were new. Raises redis.RedisError if Redis is down."""
        return 0 if self.prices is None else self.prices.store.append(points)

    def sync_prices(self) -> int:
        """Follow the price stream into the served model; returns how many points were read.
        Raises redis.RedisError if Redis is down."""
        return 0 if self.prices is None else self.prices.sync(self.loaded)


def _warm_up(loaded: LoadedRails, triton: TritonUserTower | None) -> None:
    """Run each rail once before the model takes traffic: the first LightGBM, TorchScript and
    Triton calls are several times slower than the rest, and no shopper should pay for them."""
    item = str(loaded.catalogue.ids[0])
    if triton is not None and loaded.towers is not None:
        inputs = loaded.towers.session_inputs([[HistoryEvent(item, "view", 0.0)]], [None])
        try:
            triton.encode(inputs, loaded.towers.triton_version)
        except Exception:  # noqa: BLE001 - Triton may come up later; requests fall back meanwhile
            log.warning("triton not answering at load; requests use the in-process tower")
    for rail in RAILS:
        anchor, cart = rail_parts(rail, item, [item] if RAIL_INPUTS[rail].cart else [])
        session = () if anchor or cart else (item,)
        query = rail_query(anchor, cart, session, ("view",) * len(session))
        compute(loaded.pipeline, rail, [query])
