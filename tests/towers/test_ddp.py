"""Lightning DDP with two CPU processes (gloo) trains the towers to the single-process metrics.

Strategy "ddp" re-executes the entry point once per extra rank, so both runs go through the
command line (`python -m training.towers_eval`) in subprocesses, never through pytest's own
process. Both use the same small config (one transformer layer, 32-d, a few epochs, 300
sessions per rail) and the same global batch; the DDP run splits it over two ranks. Each run
scores its own bundle on the same REES46 test cases with the harness's session-bootstrap
interval, and the DDP point estimates must fall inside the single-process 95% intervals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = {
    "RAILTOWER_TRAINING__MAX_EPOCHS": "6",
    "RAILTOWER_TRAINING__PATIENCE": "2",
    "RAILTOWER_TRAINING__BATCH_SIZE": "256",
    # CPU on purpose: two ranks on a one-GPU machine would not start; the GPU path is the
    # same code with accelerator=auto (see training.fit_towers.build_trainer)
    "RAILTOWER_TRAINING__ACCELERATOR": "cpu",
    "RAILTOWER_TOWERS__LAYERS": "1",
    "RAILTOWER_TOWERS__DIM": "32",
    "RAILTOWER_EVALUATION__MAX_SESSIONS_PER_TASK": "300",
    "RAILTOWER_EVALUATION__BOOTSTRAP_SAMPLES": "200",
    "RAILTOWER_LOG_LEVEL": "INFO",
}
RUNS = {
    "single": {"RAILTOWER_TRAINING__DEVICES": "1", "RAILTOWER_TRAINING__STRATEGY": "auto"},
    "ddp": {"RAILTOWER_TRAINING__DEVICES": "2", "RAILTOWER_TRAINING__STRATEGY": "ddp"},
}
TIMEOUT_S = 900  # a hang (a rank that never joins) must fail, not block CI


def start(name: str, root: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **SMALL,
        **RUNS[name],
        "RAILTOWER_ARTIFACTS_DIR": str(root / name / "artifacts"),
        "RAILTOWER_REPORTS_DIR": str(root / name / "reports"),
        "RAILTOWER_SERVING__TRITON_REPOSITORY": str(root / name / "triton_models"),
    }
    command = [sys.executable, "-m", "training.towers_eval", "-d", "rees46"]
    command += ["--version", name, "--out", str(root / f"{name}.json")]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Both runs at once (each is mostly single-threaded Python between steps)."""
    root = tmp_path_factory.mktemp("ddp")
    procs = {name: start(name, root) for name in RUNS}
    out = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"{name} run failed (rc={proc.returncode}):\n{log[-4000:]}"
        out[name] = {
            **json.loads((root / f"{name}.json").read_text()),
            "log": log,
            "bundles": sorted(p.name for p in (root / name / "artifacts").iterdir()),
        }
    return out


def hero(run: dict) -> dict:
    (task,) = [t for t in run["tasks"] if t["rail"] == "homepage_hero"]
    return task


def test_each_run_trained_with_its_intended_world_size(runs):
    single, ddp = runs["single"]["training"], runs["ddp"]["training"]
    assert (single["world_size"], single["strategy"]) == (1, "SingleDeviceStrategy")
    assert (ddp["world_size"], ddp["strategy"]) == (2, "DDPStrategy")
    assert "distributed_backend=gloo" in runs["ddp"]["log"]
    # the global batch is kept: two ranks of 128 against one process of 256
    assert ddp["global_batch"] == single["global_batch"] == 256
    assert ddp["per_rank_batch"] == 128


def test_ddp_metrics_lie_within_the_single_process_interval(runs):
    single, ddp = hero(runs["single"]), hero(runs["ddp"])
    assert single["cases"] == ddp["cases"] > 100  # the same test cases, enough of them
    for metric in ("ndcg@12", "recall@120"):
        ci = single["metrics"][metric]
        point = ddp["metrics"][metric]["mean"]
        assert ci["low"] <= point <= ci["high"], (
            f"{metric}: DDP {point:.4f} outside the single-process interval "
            f"[{ci['low']:.4f}, {ci['high']:.4f}] (mean {ci['mean']:.4f})"
        )
    assert ddp["metrics"]["ndcg@12"]["mean"] > 0.05  # it learned something: random is ~0


def test_only_rank_zero_exports_and_scores(runs):
    ddp = runs["ddp"]
    # rank 1 re-ran the command but left after training: one bundle, one training report,
    # each rail scored once
    assert ddp["bundles"] == ["ddp", "work"]
    assert ddp["log"].count("towers trained") == 1
    assert ddp["log"].count("scored") == len(ddp["tasks"])
    assert "GLOBAL_RANK: 1" in ddp["log"]  # and it really ran as a second process


def test_each_ranks_share_of_the_softmax_averages_to_the_single_process_loss():
    """The loss math behind the equivalence, without a process group: two ranks' halves of
    a batch, each against the gathered positives, average to the one-process loss (repeated
    items across the halves included, which must be masked on both ranks)."""
    import torch

    from railtower.settings import TrainingSettings
    from training.two_tower import TwoTowerModule

    torch.manual_seed(0)
    users, positives = torch.randn(8, 4), torch.randn(8, 4)
    targets = torch.tensor([0, 1, 2, 3, 1, 5, 6, 0])
    # the real method with only the attributes it reads: no trainer is attached here. The
    # uniform random negatives are drawn per rank, so the equivalence is the in-batch part's.
    module = SimpleNamespace(
        training_cfg=TrainingSettings(random_negatives=0),
        log_q=torch.log(torch.rand(10)),
        device=torch.device("cpu"),
        catalogue=range(10),
    )
    full = TwoTowerModule.sampled_softmax(module, users, positives, targets)
    halves = [
        TwoTowerModule.sampled_softmax(module, users[rows], positives, targets[rows], targets, at)
        for rows, at in ((slice(0, 4), 0), (slice(4, 8), 4))
    ]
    assert torch.allclose(full, torch.stack(halves).mean())
    # and a rank that did not gather (its own 4 negatives only) computes something else
    alone = TwoTowerModule.sampled_softmax(module, users[:4], positives[:4], targets[:4])
    assert not torch.allclose(alone, halves[0])
