"""The harness end to end on the shared data: baselines beat random, runs repeat exactly."""

from __future__ import annotations

import orjson
import pytest

from training.harness import run_evaluation


@pytest.fixture(scope="module")
def rees46_run(tmp_path_factory):
    from railtower.settings import load_settings

    settings = load_settings(
        reports_dir=tmp_path_factory.mktemp("reports"),
        evaluation={"bootstrap_samples": 200},
    )
    return settings, run_evaluation(settings, ["rees46"], run_name="first")


def _by(run, rail, model):
    (task,) = [t for r in run.results for t in r.tasks if t.rail == rail and t.model == model]
    return task


def test_every_rail_and_baseline_is_scored(rees46_run):
    settings, run = rees46_run
    scored = {(t.rail, t.model) for r in run.results for t in r.tasks}
    rails = ("homepage_hero", "pdp_fbt", "cart_upsell")
    stages = ("fused_candidates", "+ranker", "+ranker+mmr", "+ranker+mmr+rules")
    models = (*settings.evaluation.baselines, *stages)
    assert scored == {(rail, m) for rail in rails for m in models}


def test_pipeline_pool_recalls_more_than_any_source_and_the_ranker_is_reported(rees46_run):
    _, run = rees46_run
    report = run.results[0].pipeline
    for rail in ("homepage_hero", "pdp_fbt"):
        recall = report["pool_recall"][rail]
        best_source = max(v["recall"] for k, v in recall.items() if k != "pool")
        assert recall["pool"]["recall"] >= best_source
        fit = report["rankers"][rail]
        assert fit["trained"] and fit["groups"] >= 100 and fit["importance"]
    text = (run.folder / "results.md").read_text()
    assert "rees46: ranking pipeline" in text and "MMR trade-off" in text
    assert (run.folder / "plots" / "rees46_pipeline.png").stat().st_size > 5_000


@pytest.mark.parametrize("rail", ["homepage_hero", "pdp_fbt"])
@pytest.mark.parametrize("model", ["covisitation", "session_knn"])
def test_neighbourhood_baselines_beat_random_by_a_wide_margin(rees46_run, rail, model):
    _, run = rees46_run
    best, rand = _by(run, rail, model), _by(run, rail, "random")
    assert best.metrics["recall@12"].mean > 10 * max(rand.metrics["recall@12"].mean, 1e-3)
    # the intervals do not even touch
    assert best.metrics["ndcg@12"].low > rand.metrics["ndcg@12"].high


def test_report_files_are_written(rees46_run):
    _, run = rees46_run
    folder = run.folder
    payload = orjson.loads((folder / "results.json").read_bytes())
    assert payload["split"] == "test"
    assert payload["datasets"][0]["split"]["kind"] == "time"
    assert "| rees46 | homepage_hero | session_knn |" in (folder / "results.md").read_text()
    pngs = sorted(p.name for p in (folder / "plots").glob("*.png"))
    assert "rees46_homepage_hero_metrics.png" in pngs
    assert "rees46_pdp_fbt_by_length.png" in pngs
    assert all((folder / "plots" / p).stat().st_size > 5_000 for p in pngs)
    assert (folder / "manifest.json").exists()


def test_same_seed_same_numbers(rees46_run):
    settings, first = rees46_run
    second = run_evaluation(settings, ["rees46"], run_name="second")
    for a, b in zip(first.results[0].tasks, second.results[0].tasks, strict=True):
        assert (a.rail, a.model, a.cases) == (b.rail, b.model, b.cases)
        assert a.metrics == b.metrics
        assert a.coverage == b.coverage


@pytest.mark.slow
def test_basket_and_id_only_data_sets_run(tmp_path):
    from railtower.settings import load_settings

    settings = load_settings(
        reports_dir=tmp_path,
        evaluation={
            "bootstrap_samples": 100,
            "max_sessions_per_task": 400,
            "baselines": ["random", "covisitation"],
            "refit": False,  # the baselines are the point here: one pipeline fit is enough
        },
        ranking={"ranker": {"oof_chunks": 0}},
    )
    run = run_evaluation(settings, ["uci_online_retail", "amazon_m2", "hm_catalogue"])
    for rail, dataset in (
        ("pdp_fbt", "uci_online_retail"),
        ("cart_upsell", "uci_online_retail"),
        ("homepage_hero", "amazon_m2"),
    ):
        covisit = [
            t
            for r in run.results
            for t in r.tasks
            if (t.dataset, t.rail, t.model) == (dataset, rail, "covisitation")
        ][0]
        rand = [
            t
            for r in run.results
            for t in r.tasks
            if (t.dataset, t.rail, t.model) == (dataset, rail, "random")
        ][0]
        assert covisit.metrics["ndcg@12"].low > rand.metrics["ndcg@12"].high
    hm = [r for r in run.results if r.dataset == "hm_catalogue"][0]
    assert not hm.tasks and hm.skipped
