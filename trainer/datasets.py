"""Training data as tensors: Fashion-MNIST or a folder of images with a JSONL manifest."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagine.data import (
    FASHION_MNIST_CLASSES,
    fashion_caption,
    fingerprint,
    load_fashion_mnist,
    read_manifest,
)


@dataclass
class TrainData:
    pixels: torch.Tensor  # uint8 (N, 3, S, S)
    captions: list[str]
    groups: list[int]  # examples in one group are positives of each other
    fingerprint: str
    description: str


def parse_dataset(spec: str) -> tuple[str, Path | None]:
    """'fashion-mnist' or 'folder:/path' (manifest.jsonl inside) or 'folder:/path/x.jsonl'."""
    if spec == "fashion-mnist":
        return "fashion-mnist", None
    if spec.startswith("folder:"):
        return "folder", Path(spec.removeprefix("folder:")).expanduser().resolve()
    raise ValueError(f"unknown dataset {spec!r}: use 'fashion-mnist' or 'folder:/path'")


def validate_dataset(spec: str) -> str:
    """Fail fast, before any Ray worker starts: a readable description of the dataset."""
    kind, path = parse_dataset(spec)
    if kind == "fashion-mnist":
        images, _ = load_fashion_mnist("train")
        return f"Fashion-MNIST train split ({len(images)} images)"
    assert path is not None
    root, manifest = (path.parent, path) if path.suffix == ".jsonl" else (path, None)
    return f"folder {root} ({len(read_manifest(root, manifest))} records)"


def load_train_data(spec: str, limit: int | None, image_size: int, seed: int = 0) -> TrainData:
    kind, path = parse_dataset(spec)
    if kind == "fashion-mnist":
        images, labels = load_fashion_mnist("train")
        if limit:
            images, labels = images[:limit], labels[:limit]
        rng = random.Random(seed)
        captions = [fashion_caption(images[i], int(labels[i]), rng) for i in range(len(images))]
        pixels = torch.from_numpy(np.ascontiguousarray(images))[:, None].repeat(1, 3, 1, 1)
        if image_size != pixels.shape[-1]:
            pixels = torch.nn.functional.interpolate(
                pixels.float(), size=image_size, mode="bilinear"
            ).to(torch.uint8)
        fp = fingerprint([images.tobytes(), labels.tobytes()])
        return TrainData(
            pixels, captions, [int(x) for x in labels], fp, f"fashion-mnist train ({len(images)})"
        )
    assert path is not None
    root, manifest = (path.parent, path) if path.suffix == ".jsonl" else (path, None)
    records = read_manifest(root, manifest)
    if limit:
        records = records[:limit]
    arrays = []
    for rec in records:
        with Image.open(rec["image"]) as img:
            arr = np.asarray(
                img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            )
        arrays.append(arr)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    keys = [rec["label"] or rec["caption"] for rec in records]
    group_ids = {k: i for i, k in enumerate(sorted(set(keys)))}
    fp = fingerprint([pixels.numpy().tobytes()] + [r["caption"] + r["label"] for r in records])
    return TrainData(
        pixels,
        [rec["caption"] for rec in records],
        [group_ids[k] for k in keys],
        fp,
        f"folder {root} ({len(records)})",
    )


def eval_split(spec: str, limit: int | None = None) -> tuple[list[Image.Image], list[str]] | None:
    """Held-out images and labels for category evaluation (Fashion-MNIST's test split)."""
    kind, _ = parse_dataset(spec)
    if kind != "fashion-mnist":
        return None
    images, labels = load_fashion_mnist("test")
    n = len(images) if limit is None else min(limit, len(images))
    return (
        [Image.fromarray(images[i], mode="L") for i in range(n)],
        [FASHION_MNIST_CLASSES[int(labels[i])] for i in range(n)],
    )
