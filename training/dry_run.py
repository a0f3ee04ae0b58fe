"""A rule-set dry run on real held-out requests: what publishing would change, slot by slot.

The requests are sampled from the data set's test split and ranked by the pipeline up to
MMR (sources fitted on the training window, no towers, so it runs in seconds); then the
current and the proposed rule sets are applied to the same ranked lists.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from railtower.datasets import load_dataset
from railtower.errors import RuleSetError
from railtower.settings import Settings, load_dataset_spec
from ranking.rule_set import NO_RULES
from ranking.rules import DryRunReport, dry_run, load_rule_set
from training.fit_pipeline import fit_pipeline
from training.past_purchases import PastPurchases
from training.split import split_events
from training.tasks import build_cases


def dry_run_rule_sets(
    settings: Settings,
    dataset_name: str,
    proposed_path: Path,
    current_path: Path | None,
    requests_per_rail: int,
) -> DryRunReport:
    """Compare two rule sets on `requests_per_rail` sampled requests of every rail.

    Raises:
        RuleSetError: either rule set is invalid (the message names line and field).
    """
    proposed = load_rule_set(proposed_path)
    current_file = current_path or settings.ranking.rules_path
    current = load_rule_set(current_file) if current_file is not None else NO_RULES
    spec = load_dataset_spec(dataset_name, settings)
    dataset = load_dataset(spec, settings)
    if dataset.events is None or not spec.rails:
        raise RuleSetError(f"{dataset_name} has no events: no request to dry-run rules on")
    split = split_events(dataset.events, dataset.has_time, settings.split, settings.seed)
    pipeline = fit_pipeline(dataset, split, settings, "test").pipeline
    sampled = []
    past = PastPurchases.of(dataset, settings.serving.purchase_memory)
    for rail in spec.rails:
        cases = build_cases(rail, split.test, spec, settings.evaluation, settings.seed, past)
        queries = [c.query for c in itertools.islice(cases, requests_per_rail)]
        if not queries:
            continue
        ranked = pipeline.run(rail, queries, stages=("mmr",))["mmr"]
        sampled += [
            (rail, [c for c in row if c.item_id not in q.exclude])
            for row, q in zip(ranked, queries, strict=True)
        ]
    now = pipeline.request_time(queries[0]) if sampled else None
    if now is None:
        raise RuleSetError(f"{dataset_name} has no held-out request to dry-run rules on")
    return dry_run(current, proposed, sampled, pipeline.attributes, settings.evaluation.slots, now)
