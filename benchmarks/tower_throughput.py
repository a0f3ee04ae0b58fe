"""Tower throughput: training sequences/s by batch size, and catalogue text encoding items/s.

    python benchmarks/tower_throughput.py [--examples 20000] [--texts 2000]

Writes reports/benchmarks/tower_throughput.json and .md. The peers in the same run: batch 64
vs 256 for training, and a cold vs a warm embedding cache for text (what the cache saves
on the nightly job's second run). Timings are measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from benchmarks.report import write_report
from railtower.datasets import load_dataset
from railtower.settings import load_settings
from towers.item_features import item_text
from towers.item_tower import ItemTowerConfig
from towers.text_encoder import TextEncoder
from towers.user_tower import UserTowerConfig
from training.examples import session_examples, target_log_q
from training.fit_towers import TensorBatches, catalogue_features
from training.two_tower import TwoTowerModule


def training_throughput(n_examples: int, batch_sizes: list[int]) -> dict[str, float]:
    settings = load_settings(training={"accelerator": "cpu"})
    data = load_dataset("amazon_m2", settings)
    items = data.items
    row = {item: i for i, item in enumerate(items["item_id"])}
    examples = session_examples(
        data.events, row, settings.towers.max_history, False, False, settings.seed, n_examples
    )
    _, features = catalogue_features(items, set(items["item_id"]), settings)
    out = {}
    for batch in batch_sizes:
        pl.seed_everything(0)
        module = TwoTowerModule(
            ItemTowerConfig.from_settings(settings.towers),
            UserTowerConfig.from_settings(settings.towers),
            settings.training.model_copy(update={"batch_size": batch}),
            settings.towers.id_dropout,
            features,
            target_log_q(examples.targets, len(items)),
        )
        loader = torch.utils.data.DataLoader(
            TensorBatches({**examples.inputs, "target": examples.targets}),
            batch_size=batch,
            shuffle=True,
        )
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        started = time.perf_counter()
        trainer.fit(module, loader)
        out[f"batch_{batch}"] = len(examples) / (time.perf_counter() - started)
    return out


def text_throughput(n_texts: int) -> dict[str, float]:
    settings = load_settings()
    texts = item_text(load_dataset("uci_online_retail", settings).items)[:n_texts]
    cache = Path(tempfile.mkdtemp())
    try:
        started = time.perf_counter()
        TextEncoder(settings.text.model_path, cache).encode(texts)
        cold = len(texts) / (time.perf_counter() - started)
        started = time.perf_counter()
        TextEncoder(settings.text.model_path, cache).encode(texts)
        warm = len(texts) / (time.perf_counter() - started)
    finally:
        shutil.rmtree(cache)
    return {"cold_cache": cold, "warm_cache": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--texts", type=int, default=2000)
    args = parser.parse_args()
    train = training_throughput(args.examples, [64, 256])
    text = text_throughput(args.texts)
    result = {
        "threads": torch.get_num_threads(),
        "training_sequences_per_s": train,
        "text_items_per_s": text,
        "examples": args.examples,
        "texts": args.texts,
    }
    md = [
        "# Tower throughput (CPU)",
        "",
        f"{torch.get_num_threads()} threads; Amazon-M2 examples ({args.examples:,}), "
        f"UCI titles ({args.texts:,}).",
        "",
        "| measure | value | peer | ratio |",
        "|---|---:|---:|---:|",
        f"| training sequences/s, batch 256 | {train['batch_256']:,.0f} | batch 64: "
        f"{train['batch_64']:,.0f} | {train['batch_256'] / train['batch_64']:.2f}x |",
        f"| MiniLM text items/s, cold cache | {text['cold_cache']:,.0f} | warm cache: "
        f"{text['warm_cache']:,.0f} | {text['warm_cache'] / text['cold_cache']:.0f}x |",
    ]
    write_report("tower_throughput", result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
