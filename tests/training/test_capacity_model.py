"""The capacity model's arithmetic on small fabricated benchmark files, and the README block."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "capacity_model.py"
_spec = importlib.util.spec_from_file_location("capacity_model", SCRIPT)
assert _spec is not None and _spec.loader is not None
cm = importlib.util.module_from_spec(_spec)
sys.modules["capacity_model"] = cm  # dataclasses resolve their module by name
_spec.loader.exec_module(cm)

A = cm.Assumptions(headroom=1.0)


def write(folder: Path, name: str, payload: object) -> None:
    (folder / name).write_text(json.dumps(payload))


@pytest.fixture
def benchmarks(tmp_path: Path) -> Path:
    # Schemas as the other benchmarks write them now: rates nested under a count.
    write(
        tmp_path,
        "consumer_group.json",
        {"runs": [{"consumers": 1, "events_per_s": 400.0}, {"consumers": 2, "events_per_s": 600}]},
    )
    write(
        tmp_path,
        "triton_instances.json",
        {
            "settings": [
                {"instances": 1, "rows": [{"sessions_per_s": 300.0}, {"sessions_per_s": 500.0}]},
                {"instances": 2, "rows": [{"sessions_per_s": 700.0}]},
            ]
        },
    )
    write(
        tmp_path,
        "api_replicas.json",
        {
            "configs": [
                {"replicas": 2, "rows": [{"throughput_rps": 150, "p99": 90.0}]},
                {"replicas": 2, "rows": [{"throughput_rps": 200, "p99": 120.0}]},
                {"replicas": 4, "rows": [{"throughput_rps": 380, "p99": 100.0}]},
            ]
        },
    )
    write(
        tmp_path,
        "redis_memory.json",
        {"bytes_per_session": 2048, "bytes_per_vector": 300, "bytes_per_rail": 1000},
    )
    write(
        tmp_path,
        "ann_scale.json",
        {
            "results": [{"n": 1000, "build_s": 2.0, "index_file_bytes": 500_000}],
            "fit": {
                "build_s": {"c": 0.001, "b": 1.0},
                "index_bytes": {"a": 0.0, "per_item": 500.0},
                "fitted_on": [1000, 3000],
            },
        },
    )
    return tmp_path


def figure(rows: list[list[str]], name: str) -> list[str]:
    (row,) = [r for r in rows if r[0] == name]
    return row[1:]


def test_doubling_peak_events_doubles_consumers_and_instances(benchmarks):
    inputs = cm.read_inputs(benchmarks)
    shops = [cm.Shop("a", 1000, 2000, 1000), cm.Shop("b", 1000, 4000, 1000)]
    rows = cm.capacity_rows(shops, inputs, A)
    # one consumer does 400 events/s: 2000 -> 5, 4000 -> 10
    assert figure(rows, "refresh consumers")[:2] == ["5", "10"]
    # best setting at one instance is 500 vectors/s: 4 and 8 instances
    assert figure(rows, "Triton user-tower instances")[:2] == ["4", "8"]
    # two workers measured 200 rails/s: 100 per worker
    assert figure(rows, "API workers")[:2] == ["20", "40"]
    assert figure(rows, "topic partitions")[:2] == ["10", "20"]
    assert "consumer_group.json" in figure(rows, "refresh consumers")[-1]
    # the p99 reported is the one measured with the rate used, not the first one in the file
    assert figure(rows, "API p99 at the measured rate")[0] == "120 ms"


def test_headroom_raises_the_units_needed(benchmarks):
    inputs = cm.read_inputs(benchmarks)
    shop = [cm.Shop("a", 1000, 2000, 1000)]
    full = figure(cm.capacity_rows(shop, inputs, A), "refresh consumers")[0]
    half = figure(cm.capacity_rows(shop, inputs, cm.Assumptions(headroom=0.5)), "refresh consumers")
    assert (int(full), int(half[0])) == (5, 10)


def test_redis_total_is_live_sessions_times_measured_bytes(benchmarks):
    inputs = cm.read_inputs(benchmarks)
    shop = cm.Shop("a", 86_400, 1, 10)
    total = cm.redis_bytes(shop, inputs, cm.Assumptions(state_ttl_s=86_400, prewarm_ttl_s=100))
    # 86,400 live sessions x (2048 + 300) + at most 1 event/s x 100 s pre-warmed rails x 1000
    assert total.value == 86_400 * 2348 + 100 * 1000


def test_hnsw_uses_the_measurement_where_there_is_one_and_says_when_it_extrapolates(benchmarks):
    inputs = cm.read_inputs(benchmarks)
    seconds, size = cm.hnsw_at(inputs.hnsw, 1000)
    assert (seconds.value, size.value, seconds.note) == (2.0, 500_000, "")
    seconds, size = cm.hnsw_at(inputs.hnsw, 10_000_000)
    assert seconds.value == pytest.approx(10_000.0) and size.value == 5e9
    assert seconds.note.startswith("extrapolated")
    (_, _, _, source) = cm.hnsw_rows(inputs.hnsw)[1]
    assert "extrapolated" in source


def test_a_missing_file_is_not_measured_never_a_number(benchmarks):
    (benchmarks / "consumer_group.json").unlink()
    (benchmarks / "redis_memory.json").unlink()
    rows = cm.capacity_rows([cm.Shop("a", 1000, 2000, 1000)], cm.read_inputs(benchmarks), A)
    assert figure(rows, "refresh consumers") == ["not measured", "not measured"]
    assert figure(rows, "topic partitions")[0] == "not measured"
    assert figure(rows, "Redis total")[0] == "not measured"
    assert figure(rows, "API workers")[0] == "20"  # the files that exist still count


def test_the_readme_block_is_replaced_and_the_rest_kept(benchmarks):
    readme = benchmarks / "README.md"
    readme.write_text(f"# Shop\nbefore\n{cm.START}\nold table\n{cm.END}\nafter\n")
    cm.main(["--benchmarks", str(benchmarks), "--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and "### Capacity model" in text
    assert text.startswith("# Shop\nbefore\n") and text.endswith(f"{cm.END}\nafter\n")
    assert (benchmarks / "capacity.md").read_text().strip() in text
    cm.main(["--benchmarks", str(benchmarks), "--readme", str(readme)])
    assert readme.read_text() == text  # idempotent


def test_missing_markers_fail_with_what_to_add(benchmarks):
    readme = benchmarks / "README.md"
    readme.write_text("# Shop\nno markers here\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--benchmarks", str(benchmarks), "--readme", str(readme)],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "<!-- capacity:start -->" in done.stderr and "<!-- capacity:end -->" in done.stderr
    assert readme.read_text() == "# Shop\nno markers here\n"


def test_a_rate_served_mostly_degraded_is_not_capacity():
    rows = {
        "configs": [
            {
                "replicas": 1,
                "rows": [
                    {"concurrency": 4, "rails_per_s": 40.0, "degraded_share": 0.01, "p99": 100},
                    {"concurrency": 16, "rails_per_s": 60.0, "degraded_share": 0.9, "p99": 900},
                ],
            }
        ]
    }
    rate = cm.rate_by(rows, "api_replicas.json", ("replicas",), ("rails_per_s",))
    assert rate is not None and rate.per_unit == 40.0
