"""RecBole's SASRec as a peer of the towers: train on session JSONL, rank queries from JSONL.

Runs in the peer venv (`.venv-peers`, made by `bash benchmarks/peers/install.sh`) and never
imports the project: RecBole 1.2.1 needs numpy<2 and pins of its own, so the project talks
to it through files (benchmarks/peers/sasrec.py drives both subcommands).

    train --sessions S.jsonl --workdir W [--epochs N ...]
        S.jsonl: one {"session": id, "items": [item ids, oldest first]} per line. Trains
        SASRec with RecBole's own recipe (every prefix -> next item, full-softmax CE,
        early stopping on RecBole's leave-one-out validation inside these sessions) and
        writes W/model.pt, W/items.json and W/train.json.
    rank --workdir W --queries Q.jsonl --k K --out R.jsonl [--allowed A.txt]
        Q.jsonl: one {"items": [history, oldest first], "exclude": [ids]} per line. Writes
        one {"items": [K best item ids]} per query, in query order, over the full
        catalogue the model knows (restricted to A.txt's ids, one a line, when given).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_logger, init_seed

# Importing recbole.model.sequential_recommender runs sine.py, which switches autograd's
# anomaly detection on for the whole process: every backward op then checks for NaNs,
# about 4x slower training on CPU. SASRec does not need it.
torch.autograd.set_detect_anomaly(False)
# RecBole 1.2.1 uses pandas' chained inplace fillna; the warning says nothing about results.
warnings.filterwarnings("ignore", category=FutureWarning, module="recbole")

DATASET = "sessions"
# Scores held at once while ranking or validating, in floats: rows x catalogue stays
# near 256 MB even on Amazon-M2's catalogue.
SCORE_BUDGET = 2**26


def write_atomic(sessions: Path, folder: Path) -> Counter[str]:
    """Write RecBole's atomic `.inter` file from session JSONL; item counts (popularity).

    The timestamp is a running row number, so every session's order survives RecBole's
    sort by time (its leave-one-out and its prefix augmentation both rely on that order),
    whatever clock the data had.
    """
    folder.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    row = 0
    with sessions.open() as lines, (folder / f"{DATASET}.inter").open("w") as out:
        out.write("session_id:token\titem_id:token\ttimestamp:float\n")
        for line in lines:
            record = json.loads(line)
            session = str(record["session"])
            for item in record["items"]:
                item = str(item)
                if any(c in item or c in session for c in "\t\n"):
                    raise ValueError(f"ids must not hold tabs or newlines: {session!r} {item!r}")
                out.write(f"{session}\t{item}\t{row}\n")
                counts[item] += 1
                row += 1
    return counts


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.workdir.resolve()
    sessions = args.sessions.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # RecBole writes its log/ and log_tensorboard/ under the working directory.
    os.chdir(workdir)
    for stale in (workdir / "saved").glob("SASRec-*.pth"):  # an earlier run's checkpoints
        stale.unlink()
    counts = write_atomic(sessions, workdir / "data" / DATASET)
    device = _device()
    # RecBole's Config also reads `--key=value` from sys.argv as overrides; this script's
    # own flags (--epochs=3, --hidden=128) must reach it through config_dict only.
    sys.argv = sys.argv[:1]
    config = Config(
        model="SASRec",
        dataset=DATASET,
        config_dict={
            "data_path": str(workdir / "data"),
            "checkpoint_dir": str(workdir / "saved"),
            "USER_ID_FIELD": "session_id",
            "ITEM_ID_FIELD": "item_id",
            "TIME_FIELD": "timestamp",
            "load_col": {"inter": ["session_id", "item_id", "timestamp"]},
            "MAX_ITEM_LIST_LENGTH": args.max_len,
            "hidden_size": args.hidden,
            "inner_size": 4 * args.hidden,
            "n_layers": args.layers,
            "n_heads": args.heads,
            "loss_type": "CE",
            "train_neg_sample_args": None,
            "learning_rate": args.lr,
            "epochs": args.epochs,
            "stopping_step": args.patience,
            "train_batch_size": args.batch_size,
            # the last prefix -> item of each session is RecBole's validation; no test part
            "eval_args": {
                "split": {"LS": "valid_only"},
                "order": "TO",
                "group_by": "user",
                "mode": "full",
            },
            "metrics": ["Recall", "NDCG"],
            "topk": [10, 20],
            "valid_metric": args.valid_metric,
            "seed": args.seed,
            "reproducibility": True,
            "use_gpu": device == "cuda",
            "gpu_id": "0" if device == "cuda" else "",
            "show_progress": False,
            "log_wandb": False,
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logging.getLogger().setLevel(logging.INFO)
    started = time.perf_counter()
    dataset = create_dataset(config)
    n_items = dataset.item_num
    config["eval_batch_size"] = max(1, min(4096, SCORE_BUDGET // max(n_items, 1)))
    train_data, valid_data, _ = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    scores: list[tuple[int, float]] = []
    best_score, _ = trainer.fit(
        train_data,
        valid_data,
        saved=True,
        show_progress=False,
        callback_fn=lambda epoch, score: scores.append((epoch, float(score))),
    )
    seconds = time.perf_counter() - started
    # RecBole's checkpoint pickles its Config, which torch>=2.6 refuses by default.
    best = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    torch.save(
        {"state_dict": best["state_dict"], "config": config, "n_items": n_items},
        workdir / "model.pt",
    )
    tokens = [str(t) for t in dataset.field2id_token["item_id"]]
    popular = [item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    (workdir / "items.json").write_text(json.dumps({"tokens": tokens, "popular": popular}))
    report = {
        "model": "SASRec",
        "recbole": __import__("recbole").__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": device,
        "sessions": len(dataset.field2id_token["session_id"]) - 1,
        "items": n_items - 1,
        "training_examples": len(train_data.dataset),
        "validation_examples": len(valid_data.dataset),
        "epochs_max": args.epochs,
        "epochs": len(scores),
        "best_epoch": int(best["epoch"]),
        "valid_metric": args.valid_metric,
        "best_valid_score": float(best_score),
        "valid_scores": [s for _, s in scores],
        "seconds": round(seconds, 2),
        "hyperparameters": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "lr": args.lr,
            "max_len": args.max_len,
            "batch_size": args.batch_size,
            "patience": args.patience,
            "seed": args.seed,
        },
    }
    (workdir / "train.json").write_text(json.dumps(report, indent=2))
    return report


class _Vocabulary:
    """What SASRec reads from a RecBole Dataset to build itself: the item count."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    def num(self, _field: str) -> int:
        return self.n_items


def load_model(workdir: Path, device: str) -> tuple[SASRec, list[str], list[str]]:
    """The best SASRec of `train`, its internal-id -> item-id tokens and popularity order."""
    saved = torch.load(workdir / "model.pt", map_location="cpu", weights_only=False)
    config = saved["config"]
    config["device"] = torch.device(device)
    model = SASRec(config, _Vocabulary(saved["n_items"]))
    model.load_state_dict(saved["state_dict"])
    model.to(device).eval()
    items = json.loads((workdir / "items.json").read_text())
    return model, items["tokens"], items["popular"]


def rank(args: argparse.Namespace) -> int:
    device = _device()
    model, tokens, popular = load_model(args.workdir.resolve(), device)
    index = {t: i for i, t in enumerate(tokens) if i > 0}  # 0 is RecBole's [PAD]
    allowed_ids: set[str] | None = None
    usable = torch.ones(len(tokens), dtype=torch.bool)
    usable[0] = False
    if args.allowed is not None:
        allowed_ids = set(args.allowed.read_text().split())
        usable &= torch.tensor([t in allowed_ids for t in tokens])
    queries = [json.loads(line) for line in args.queries.read_text().splitlines() if line]
    results: list[list[str]] = [[] for _ in queries]
    with_history: list[tuple[int, list[int]]] = []
    for row, query in enumerate(queries):
        history = [index[str(i)] for i in query.get("items", []) if str(i) in index]
        if history:
            with_history.append((row, history[-model.max_seq_length :]))
        else:
            results[row] = _popular(popular, query, allowed_ids, args.k)
    batch = max(1, min(1024, SCORE_BUDGET // len(tokens)))
    usable = usable.to(device)
    with torch.no_grad():
        for start in range(0, len(with_history), batch):
            chunk = with_history[start : start + batch]
            seq = torch.zeros(len(chunk), model.max_seq_length, dtype=torch.long)
            for r, (_, history) in enumerate(chunk):
                # RecBole's layout: items left-aligned, padding after, length alongside.
                seq[r, : len(history)] = torch.tensor(history)
            lengths = torch.tensor([len(h) for _, h in chunk])
            output = model.forward(seq.to(device), lengths.to(device))
            scores = output @ model.item_embedding.weight.T
            scores[:, ~usable] = -torch.inf
            for r, (row, _) in enumerate(chunk):
                banned = [index[str(i)] for i in queries[row].get("exclude", []) if str(i) in index]
                if banned:
                    scores[r, banned] = -torch.inf
            k = min(args.k, scores.shape[1])
            values, top = torch.topk(scores, k, dim=1)
            for r, (row, _) in enumerate(chunk):
                picked = [
                    tokens[i]
                    for v, i in zip(values[r].tolist(), top[r].tolist(), strict=True)
                    if v > -np.inf
                ]
                results[row] = picked
    for row, items in enumerate(results):
        if len(items) < args.k:  # a tiny allowed set or a long exclude list
            have = set(items)
            fill = _popular(popular, queries[row], allowed_ids, args.k + len(items))
            items += [i for i in fill if i not in have][: args.k - len(items)]
    with args.out.open("w") as out:
        for items in results:
            out.write(json.dumps({"items": items}) + "\n")
    return len(with_history)


def _popular(
    popular: list[str], query: dict[str, Any], allowed: set[str] | None, k: int
) -> list[str]:
    """The most popular training items a query may get: what SASRec offers no history."""
    exclude = {str(i) for i in query.get("exclude", [])}
    picked: list[str] = []
    for item in popular:
        if item not in exclude and (allowed is None or item in allowed):
            picked.append(item)
            if len(picked) == k:
                break
    return picked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train SASRec on session JSONL")
    t.add_argument("--sessions", type=Path, required=True)
    t.add_argument("--workdir", type=Path, required=True)
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--heads", type=int, default=2)
    t.add_argument("--lr", type=float, default=0.001)
    t.add_argument("--max-len", type=int, default=50)
    # Full-softmax CE holds batch x catalogue logits: smaller than RecBole's 2048 default
    # so that Amazon-M2's catalogue fits.
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--seed", type=int, default=2020)
    t.add_argument("--patience", type=int, default=3)
    t.add_argument("--valid-metric", default="NDCG@10")
    r = commands.add_parser("rank", help="rank the full catalogue for query JSONL")
    r.add_argument("--workdir", type=Path, required=True)
    r.add_argument("--queries", type=Path, required=True)
    r.add_argument("--k", type=int, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--allowed", type=Path, default=None, help="item ids that may be returned")
    args = parser.parse_args(argv)
    if args.command == "train":
        report = train(args)
        print(json.dumps({k: v for k, v in report.items() if k != "valid_scores"}))
    else:
        scored = rank(args)
        print(json.dumps({"queries_scored_by_model": scored, "device": _device()}))


if __name__ == "__main__":
    main()
