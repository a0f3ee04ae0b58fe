"""Per-slot provenance (`explain=true`) on the real trained bundle and a real Redis.

Checks that the fields are present and agree with each other and with the stages they
describe: the final rank is the slot, stage ranks come from the fused table the sources
produced, a pinned item shows its pin, a reason names the session item whose item-tower
vector is closest (recomputed here), a cache hit says so, and without the flag no slot
carries a provenance key at all.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from devstack.local_services import free_port, redis_server
from ranking.candidate_fusion import SOURCES
from ranking.retriever import Query
from ranking.rule_set import RuleSet
from serving.api_models import RailRequest
from serving.app import create_app
from serving.metrics import Metrics
from serving.rail_service import load_rails
from serving.service import RailService
from serving.stages import in_process_vector
from serving.user_vectors import VectorTowerSource
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

pytestmark = pytest.mark.integration

SESSION = [("1005115", "view"), ("1004767", "view"), ("1005105", "cart")]
T0 = 1569890000.0


@pytest.fixture(scope="module")
def service(trained_rees46, tmp_path_factory):
    settings, bundle = trained_rees46
    port = free_port()
    server = redis_server(port, tmp_path_factory.mktemp("redis")).start()
    store = SessionStore(f"redis://127.0.0.1:{port}/0", 2.0, 50, 600, 600)
    loaded = load_rails(bundle, settings)
    yield RailService(settings, loaded, store, None, Metrics())
    server.stop()


def _seed(service: RailService, session_id: str) -> None:
    events = [
        (f"{session_id}-{k}", HistoryEvent(item, kind, T0 + 60 * k), None)
        for k, (item, kind) in enumerate(SESSION)
    ]
    service.store.append_events(session_id, events)


KEY = "explain-test-admin-key-0123456789"


def test_without_the_flag_no_slot_has_a_provenance_key(service):
    _seed(service, "lean")
    security = service.settings.security.model_copy(update={"admin_api_key": SecretStr(KEY)})
    settings = service.settings.model_copy(update={"security": security})
    with TestClient(create_app(settings, service)) as client:
        body = {"session_id": "lean", "item_id": "1005115", "slots": 8}
        key = {"X-API-Key": KEY}
        plain = client.post("/v1/rails/pdp_fbt", json=body).json()
        explained = client.post(
            "/v1/rails/pdp_fbt", json=body | {"explain": True}, headers=key
        ).json()
        by_query = client.post("/v1/rails/pdp_fbt?explain=true", json=body, headers=key).json()
        # a shopper's client cannot read another session's history or the rules' effects
        anonymous = client.post("/v1/rails/pdp_fbt?explain=true", json=body)
        wrong = client.post(
            "/v1/rails/pdp_fbt", json=body | {"explain": True}, headers={"X-API-Key": "x" * 20}
        )
    assert anonymous.status_code == 401 and "X-API-Key" in anonymous.json()["error"]
    assert wrong.status_code == 401 and "does not match" in wrong.json()["error"]
    unset = service.settings.security.model_copy(update={"admin_api_key": None})
    off = service.settings.model_copy(update={"security": unset})
    with TestClient(create_app(off, service)) as client:
        refused = client.post("/v1/rails/pdp_fbt?explain=true", json=body)
    assert refused.status_code == 403 and "ADMIN_API_KEY" in refused.json()["error"]
    assert all("provenance" not in item for item in plain["items"])
    assert set(plain["items"][0]) == {"item_id", "score", "title", "category"}
    assert all("provenance" in item for item in explained["items"])
    assert all("provenance" in item for item in by_query["items"])
    # explaining never changes the answer
    ids = [i["item_id"] for i in plain["items"]]
    assert [i["item_id"] for i in explained["items"]] == ids
    assert [i["item_id"] for i in by_query["items"]] == ids


def test_stage_ranks_agree_with_the_slots_and_the_sources(service):
    _seed(service, "ranks")
    response = service.serve(
        "homepage_hero", RailRequest(session_id="ranks", slots=10, explain=True)
    )
    assert response.served_by == "computed"
    for slot, item in enumerate(response.items):
        p = item.provenance
        assert p is not None and p.final_rank == slot + 1
        if p.tier == "candidates":
            assert p.sources and {s.source for s in p.sources} <= set(SOURCES)
            assert all(s.rank >= 1 for s in p.sources)
            assert p.fused_rank is not None and p.ranker_rank is not None
            assert p.mmr_rank is not None
    # MMR's order is the rules' input: without a rule touching them, the unruled slots keep it
    mmr = [i.provenance.mmr_rank for i in response.items if not i.provenance.rules]
    assert mmr == sorted(mmr)


def test_a_pinned_item_shows_the_pin_rule(service):
    loaded = service.loaded
    before = loaded.pipeline.rule_set
    pinned = "4804056"
    loaded.pipeline.rule_set = RuleSet.model_validate(
        {
            "name": "pin",
            "version": "1",
            "rules": [
                {"kind": "boost", "category": "electronics", "factor": 1.2},
                {"kind": "pin", "item_id": pinned, "slot": 2},
            ],
        }
    )
    try:
        response = service.serve(
            "pdp_fbt", RailRequest(session_id="pin", item_id="1005115", slots=6, explain=True)
        )
    finally:
        loaded.pipeline.rule_set = before
    second = response.items[1]
    assert second.item_id == pinned
    pins = [r for r in second.provenance.rules if r.kind == "pin"]
    assert len(pins) == 1 and pins[0].rule_index == 1 and "slot 2" in pins[0].detail
    if second.provenance.fused_rank is None:
        assert second.provenance.tier == "pin"
    boosted = [i for i in response.items if any(r.kind == "boost" for r in i.provenance.rules)]
    for item in boosted:
        assert (item.category or "").startswith("electronics")


def test_the_reason_names_the_closest_session_item_by_title(service):
    _seed(service, "why")
    loaded = service.loaded
    response = service.serve("homepage_hero", RailRequest(session_id="why", slots=8, explain=True))
    towers = loaded.towers
    assert towers is not None
    session = [item for item, _ in SESSION]
    vectors = towers.item_vectors[[towers.item_row[i] for i in session]].astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    explained = [i for i in response.items if i.provenance.reason is not None]
    assert explained, "no slot carries a reason"
    for item in explained:
        reason = item.provenance.reason
        target = towers.item_vectors[towers.item_row[item.item_id]].astype(np.float64)
        cosines = vectors @ (target / np.linalg.norm(target))
        assert reason.item_id == session[int(np.argmax(cosines))]
        assert reason.measure == "item_tower_cosine"
        assert reason.value == pytest.approx(float(cosines.max()), abs=1e-3)
        assert reason.title == loaded.titles.get(reason.item_id)
        assert reason.role == "session"
        assert (reason.title or reason.item_id) in reason.text
        verb = "added" if reason.event_type == "cart" else "viewed"
        assert reason.text.startswith(f"because you {verb}")


def test_a_cache_hit_says_it_came_from_the_cache(service):
    _seed(service, "cached")
    request = RailRequest(session_id="cached", slots=6, explain=True)
    first = service.serve("homepage_hero", request)
    second = service.serve("homepage_hero", request)
    assert first.served_by == "computed" and second.served_by == "cache"
    assert [i.item_id for i in second.items] == [i.item_id for i in first.items]
    for slot, item in enumerate(second.items):
        p = item.provenance
        assert p.tier == "cache" and p.final_rank == slot + 1
        assert p.fused_rank is None and p.sources == [] and "not stored" in p.note
    # the reason is measured from the same session state either way
    assert [i.provenance.reason for i in second.items] == [i.provenance.reason for i in first.items]


def test_items_the_rules_fill_in_say_popular_fill(service):
    loaded = service.loaded
    before = loaded.pipeline.rule_set
    query = Query(anchor="1005115", exclude=frozenset(["1005115"]))
    vector = in_process_vector(loaded, query)
    table = loaded.pipeline.candidate_table(
        [query], {**loaded.pipeline.sources, "two_tower": VectorTowerSource(loaded.towers, vector)}
    )
    named = table.frame["item_id"].tolist()
    # block every candidate the sources name: the rules must fill the rail from popular items
    loaded.pipeline.rule_set = RuleSet.model_validate(
        {
            "name": "block",
            "version": "1",
            "rules": [{"kind": "block", "item_id": i} for i in named],
        }
    )
    request = RailRequest(session_id="fill", item_id="1005115", slots=12, explain=True)
    try:
        response = service.serve("pdp_fbt", request)
    finally:
        loaded.pipeline.rule_set = before
    assert response.served_by == "computed" and len(response.items) == 12
    assert not {i.item_id for i in response.items} & set(named)
    for item in response.items:
        p = item.provenance
        assert p.tier == "popular_fill" and p.fused_rank is None and p.reason is None


def test_the_computation_failed_fallback_says_so(service):
    class Unreachable:
        def candidates(self, queries, k):  # type: ignore[no-untyped-def]  # noqa: ARG002
            raise ConnectionError("co-visitation store unreachable")

    loaded = service.loaded
    pipeline = dataclasses.replace(
        loaded.pipeline, sources={**loaded.pipeline.sources, "covisitation": Unreachable()}
    )
    broken = RailService(
        service.settings, dataclasses.replace(loaded, pipeline=pipeline), None, None, Metrics()
    )
    response = broken.serve(
        "pdp_fbt", RailRequest(session_id="f", item_id="1005115", slots=5, explain=True)
    )
    assert response.served_by == "fallback" and len(response.items) == 5
    assert all(i.provenance.tier == "fallback" for i in response.items)
    assert [i.provenance.final_rank for i in response.items] == [1, 2, 3, 4, 5]
