"""Benchmark the image branch on the H&M photos: distil, then measure speed and agreement.

Distils the ViT into the MiniLM text space, measures training and encoding throughput, and
checks on the held-out items whether image-only neighbours share the product type more often
than a random-init ViT's neighbours and than chance. Writes
`<reports_dir>/benchmarks/image_encoder.{json,md}`.

Usage:
    python benchmarks/image_encoder.py [--max-images N] [--epochs E]
        [--image-size S] [--patch-size P] [--threads T]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import torch

from railtower.datasets import load_dataset
from railtower.logs import configure_logging
from railtower.manifest import Manifest, now_iso
from railtower.settings import Settings, load_settings
from towers.image_encoder import ImageEncoder
from training.image_distill import distill_image_encoder, split_items
from training.image_eval import image_neighbour_agreement, product_types, untrained_embeddings

DATASET = "hm_catalogue"
K = 10
# Photos and epochs distilled by default. At the configured 64 px / patch 8 one CPU thread
# trains ~20-35 photos/s, so all 11,800 photos for the configured 4 epochs would take 25-40
# minutes; 5,000 photos for 2 epochs fit in about 10 minutes, text encoding included.
DEFAULT_MAX_IMAGES = 5000
DEFAULT_EPOCHS = 2


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    settings = load_settings(
        image={
            key: value
            for key, value in {
                "max_images": args.max_images,
                "epochs": args.epochs,
                "image_size": args.image_size,
                "patch_size": args.patch_size,
            }.items()
            if value is not None
        }
    )
    configure_logging(settings.log_level)
    items = load_dataset(DATASET, settings).items
    result = run_benchmark(settings, items)
    result["threads"] = args.threads
    paths = write_outputs(result, settings.reports_dir / "benchmarks")
    print(paths["markdown"].read_text())


def run_benchmark(settings: Settings, items: Any) -> dict[str, Any]:
    """Distil, encode the held-out photos, and score neighbour agreement; a JSON-able dict."""
    started = time.perf_counter()
    weights = distill_image_encoder(settings, items)
    distil_seconds = time.perf_counter() - started
    train, validation = split_items(items, settings)

    # Encode the held-out photos on a cold cache, so the model really runs.
    paths = validation["image_path"].astype(str).tolist()
    with tempfile.TemporaryDirectory() as cache:
        encoder = ImageEncoder(
            settings.image.model_copy(update={"weights_path": weights}), Path(cache)
        )
        started = time.perf_counter()
        trained, has_image = encoder.encode(paths)
        encode_seconds = time.perf_counter() - started
    control, control_ok = untrained_embeddings(paths, settings.image, settings.seed)

    # Image-only neighbours, own product group left out, agreeing on the product type.
    keep = has_image & control_ok
    labels = product_types(validation["category_path"])[keep]
    groups = validation["product_group"].astype(str).to_numpy()[keep]
    trained_score = image_neighbour_agreement(trained[keep], labels, K, groups)
    control_score = image_neighbour_agreement(control[keep], labels, K, groups)
    return {
        "created_at": now_iso(),
        "dataset": DATASET,
        "photos_used": len(train) + len(validation),
        "photos_available": len(items),
        "capped": settings.image.max_images != 0 and settings.image.max_images < len(items),
        "image_settings": settings.image.model_dump(mode="json"),
        "weights": str(weights),
        "distillation": {
            "wall_seconds": round(distil_seconds, 1),
            **Manifest.load(weights.parent).metrics,
        },
        "encoding": {
            "images": len(paths),
            "seconds": round(encode_seconds, 2),
            "images_per_s": round(len(paths) / encode_seconds, 1),
        },
        "neighbour_agreement": {
            "k": K,
            "held_out_items": int(keep.sum()),
            "product_types": len(set(labels)),
            "trained": trained_score,
            "untrained_control": control_score,
            "chance": trained_score["chance"],
        },
    }


def write_outputs(result: dict[str, Any], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "image_encoder.json"
    json_path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NAIVE_UTC))
    md_path = folder / "image_encoder.md"
    md_path.write_text(markdown(result))
    return {"json": json_path, "markdown": md_path}


def markdown(result: dict[str, Any]) -> str:
    agree, distil = result["neighbour_agreement"], result["distillation"]
    encode = result["encoding"]
    image = result["image_settings"]
    k = agree["k"]
    lines = [
        f"# Image encoder benchmark ({result['dataset']}, {result['created_at']})",
        "",
        f"Distilled on {result['photos_used']:,} of {result['photos_available']:,} photos"
        + (" (capped to fit ~10 min of CPU)" if result["capped"] else "")
        + f"; {distil['train_items']:,} train / {distil['validation_items']:,} held out "
        "(whole product groups).",
        f"Settings: {image['architecture']}, {image['image_size']} px, patch "
        f"{image['patch_size']}, {image['epochs']} epochs, batch {image['batch_size']}, "
        f"lr {image['learning_rate']}, temperature {image['temperature']}, "
        f"{result.get('threads', 1)} CPU thread(s).",
        "",
        f"Neighbour agreement on {agree['held_out_items']:,} held-out items "
        f"({agree['product_types']} product types): share of the {k} nearest image-only "
        "neighbours (own product group left out) with the same product type.",
        "",
        f"| encoder | precision@{k} | lift over chance |",
        "|---|---|---|",
    ]
    for name, key in (("distilled ViT", "trained"), ("random-init ViT", "untrained_control")):
        score = agree[key]
        lines.append(f"| {name} | {score['precision']:.4f} | {score['lift']:.2f}x |")
    lines += [
        f"| chance (sum p_type²) | {agree['chance']:.4f} | 1.00x |",
        "",
        "| throughput | images/s |",
        "|---|---|",
        f"| distillation (train steps, augmentation included) | {distil['train_images_per_s']} |",
        f"| encoding (read + decode + forward, cold cache) | {encode['images_per_s']} |",
        "",
        f"Held-out photo→text recall@1 / @10: {distil.get('val_text_recall@1', 'n/a')} / "
        f"{distil.get('val_text_recall@10', 'n/a')}; distillation wall time "
        f"{distil['wall_seconds']} s (text encoding and validation included).",
        "",
    ]
    return "\n".join(lines)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="photos used (0 = all)"
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--image-size", type=int, default=None, help="default: config")
    parser.add_argument("--patch-size", type=int, default=None, help="default: config")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


if __name__ == "__main__":
    main()
