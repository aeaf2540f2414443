"""Datasets: Fashion-MNIST from its IDX files, and any folder of images plus a JSONL manifest.

Both yield :class:`Example` records (an image, a caption, a label). Fashion-MNIST ships in the
Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``); its captions are
sentences built from the class name and what the pixels show (brightness, size), so the text
tower sees more than the bare class name.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path(
    os.environ.get("IMAGINE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# How a person would name each class in a query.
CLASS_PHRASES = (
    "t-shirt",
    "pair of trousers",
    "pullover sweater",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
TEMPLATES = (
    "a photo of a {}",
    "a {}",
    "a product photo of a {}",
    "a {tone} {}",
    "a picture of a {tone} {}",
    "a {size} {} on a black background",
)


class DatasetError(RuntimeError):
    """A dataset that cannot be read (missing files, bad manifest lines)."""


@dataclass(frozen=True)
class Example:
    image: Image.Image
    caption: str
    label: str


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise DatasetError(
            f"{path} not found: install the Debian package dataset-fashion-mnist "
            "or set IMAGINE_FASHION_MNIST_DIR"
        ) from exc
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) for split 'train' or 't10k'/'test'."""
    root = root or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise DatasetError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels


def describe(pixels: np.ndarray) -> tuple[str, str]:
    """Words for what an image shows: its tone and its size on the canvas."""
    on = pixels > 30
    mean = float(pixels[on].mean()) if on.any() else 0.0
    tone = "dark" if mean < 90 else "light" if mean > 170 else "grey"
    area = float(on.mean())
    size = "small" if area < 0.3 else "large" if area > 0.6 else "medium"
    return tone, size


def fashion_caption(pixels: np.ndarray, label: int, rng: random.Random) -> str:
    tone, size = describe(pixels)
    template = rng.choice(TEMPLATES)
    return template.format(CLASS_PHRASES[label], tone=tone, size=size)


# Caption references for the caption decoder: richer than the bare class name. Every word is
# computed from the pixels (tone; width and visible pattern relative to the class, thresholds
# at the train split's per-class 33rd/67th width and 70th texture percentiles) or is one of the
# class's synonyms. ``fashion_references`` gives every synonym variant of one image's sentence.
CLASS_SYNONYMS = (
    ("t-shirt", "top", "tee"),
    ("pair of trousers", "pair of pants", "pair of slacks"),
    ("pullover", "sweater", "jumper"),
    ("dress", "gown", "frock"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "open shoe", "summer sandal"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "short boot"),
)
# per class: (narrow below, wide above) as a fraction of the canvas width; None: no width word
# (shoes and bags fill the canvas width)
_WIDTH_CUTS: tuple[tuple[float, float] | None, ...] = (
    (0.75, 0.82), (0.39, 0.43), (0.71, 0.79), (0.46, 0.57), (0.68, 0.75),
    None, (0.71, 0.79), None, None, None,
)  # fmt: skip
_PATTERN_CUT = (25.3, 48.7, 31.3, 38.0, 33.1, 40.7, 32.9, 28.0, 25.2, 26.0)


def attributes(pixels: np.ndarray, label: int) -> tuple[str, str, str]:
    """(tone, width, pattern) words of a 28x28 Fashion-MNIST image; width may be empty."""
    x = pixels.astype(np.float32)
    on = x > 30
    tone, _ = describe(pixels)
    width = ""
    cuts = _WIDTH_CUTS[label]
    if cuts is not None:
        cols = float(on.any(axis=0).sum()) / x.shape[1]
        width = "narrow" if cols < cuts[0] else "wide" if cols > cuts[1] else "medium-width"
    inner = on[:, 1:] & on[:, :-1]
    texture = float((np.abs(np.diff(x, axis=1)) * inner).sum() / max(int(inner.sum()), 1))
    pattern = "with a visible pattern" if texture > _PATTERN_CUT[label] else "in a plain colour"
    return tone, width, pattern


def fashion_references(pixels: np.ndarray, label: int) -> list[str]:
    """Every synonym variant of the image's reference sentence (BLEU's references)."""
    tone, width, pattern = attributes(pixels, label)
    return [
        " ".join(w for w in ("a", tone, width, noun, pattern) if w)
        for noun in CLASS_SYNONYMS[label]
    ]


def fashion_reference(pixels: np.ndarray, label: int, rng: random.Random) -> str:
    """One reference sentence with a random synonym (training captions of the decoder)."""
    return rng.choice(fashion_references(pixels, label))


def reference_key(pixels: np.ndarray, label: int) -> str:
    """What a reference says, synonyms aside: texts with one key describe the same things."""
    return fashion_references(pixels, label)[0]


def class_query(label: int) -> str:
    """The one text query per class used by category mAP (as in CLE-TIR)."""
    return f"a photo of a {CLASS_PHRASES[label]}"


def fashion_examples(split: str, limit: int | None = None, seed: int = 0) -> Iterator[Example]:
    images, labels = load_fashion_mnist(split)
    rng = random.Random(seed)
    n = len(images) if limit is None else min(limit, len(images))
    for i in range(n):
        label = int(labels[i])
        yield Example(
            Image.fromarray(images[i], mode="L"),
            fashion_caption(images[i], label, rng),
            FASHION_MNIST_CLASSES[label],
        )


def read_manifest(root: Path, manifest: Path | None = None) -> list[dict[str, str]]:
    """Records of a folder dataset: one JSON object a line with image, caption and label."""
    path = manifest or root / "manifest.jsonl"
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not JSON: {exc}") from exc
        if not isinstance(rec, dict) or not rec.get("image") or not rec.get("caption"):
            raise DatasetError(f"{path}:{lineno}: needs 'image' and 'caption'")
        if not all(isinstance(rec.get(k, ""), str) for k in ("image", "caption", "label")):
            raise DatasetError(f"{path}:{lineno}: 'image', 'caption' and 'label' must be strings")
        if "\0" in rec["image"]:
            raise DatasetError(f"{path}:{lineno}: image path contains a NUL byte")
        image = (root / rec["image"]).resolve()
        if not image.is_relative_to(root.resolve()):
            raise DatasetError(f"{path}:{lineno}: image path leaves the dataset folder")
        if not image.is_file():
            raise DatasetError(f"{path}:{lineno}: image {rec['image']} not found")
        records.append(
            {
                "image": str(image),
                "caption": str(rec["caption"]),
                "label": str(rec.get("label", "")),
            }
        )
    if not records:
        raise DatasetError(f"manifest {path} has no records")
    return records


def manifest_examples(root: Path, manifest: Path | None = None) -> Iterator[Example]:
    for rec in read_manifest(root, manifest):
        with Image.open(rec["image"]) as img:
            img.load()
            yield Example(img.copy(), rec["caption"], rec["label"])


def fingerprint(parts: Sequence[bytes | str]) -> str:
    """A short content hash of a dataset: the manifest records what a model was trained on."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:16]


def export_gallery(
    out: Path, split: str = "test", limit: int | None = None
) -> list[tuple[str, str]]:
    """Write Fashion-MNIST images as PNG files ``<index>.png`` plus ``manifest.jsonl`` (labels).

    Returns (file name, label) pairs. Existing files are kept, so a second export is cheap and
    does not change etags.
    """
    images, labels = load_fashion_mnist(split)
    n = len(images) if limit is None else min(limit, len(images))
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    lines = []
    for i in range(n):
        name = f"{i:05d}.png"
        label = FASHION_MNIST_CLASSES[int(labels[i])]
        path = out / name
        if not path.exists():
            Image.fromarray(images[i], mode="L").save(path)
        pairs.append((name, label))
        lines.append(json.dumps({"image": name, "label": label}))
    manifest = out / "manifest.jsonl"
    text = "\n".join(lines) + "\n"
    if not manifest.is_file() or manifest.read_text() != text:
        manifest.write_text(text)
    return pairs
