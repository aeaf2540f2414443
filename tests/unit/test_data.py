"""Datasets: Fashion-MNIST from the Debian package, JSONL folder datasets, gallery export."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagine.data import (
    CLASS_PHRASES,
    FASHION_MNIST_CLASSES,
    DatasetError,
    class_query,
    export_gallery,
    fashion_caption,
    fashion_examples,
    load_fashion_mnist,
    manifest_examples,
    read_manifest,
)


# -- Fashion-MNIST -----------------------------------------------------------------------------
def test_load_fashion_mnist_test_split() -> None:
    images, labels = load_fashion_mnist("test")

    assert images.shape == (10_000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (10_000,)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(range(10))
    assert np.bincount(labels).tolist() == [1000] * 10
    assert images.max() > 200  # real pixels, not zeros


def test_load_fashion_mnist_from_a_missing_folder_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


def test_captions_contain_the_class_phrase() -> None:
    images, labels = load_fashion_mnist("test")
    rng = random.Random(0)
    for i in range(50):
        caption = fashion_caption(images[i], int(labels[i]), rng)
        assert CLASS_PHRASES[int(labels[i])] in caption


def test_fashion_examples_yield_images_captions_and_class_names() -> None:
    examples = list(fashion_examples("test", limit=5, seed=1))
    _, labels = load_fashion_mnist("test")

    assert len(examples) == 5
    for ex, label in zip(examples, labels[:5], strict=True):
        assert ex.image.size == (28, 28)
        assert ex.label == FASHION_MNIST_CLASSES[int(label)]
        assert CLASS_PHRASES[int(label)] in ex.caption
    # Captions are reproducible for a seed.
    assert [e.caption for e in fashion_examples("test", limit=5, seed=1)] == [
        e.caption for e in examples
    ]


def test_class_query_names_the_class() -> None:
    assert class_query(7) == "a photo of a sneaker"
    assert len({class_query(i) for i in range(10)}) == 10


# -- folder datasets ---------------------------------------------------------------------------
def _folder(root: Path, lines: list[str], images: tuple[str, ...] = ("a.png", "sub/b.png")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 128).save(path)
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


GOOD = [
    json.dumps({"image": "a.png", "caption": "a grey square", "label": "square"}),
    "",
    json.dumps({"image": "sub/b.png", "caption": "another square"}),
]


def test_read_manifest_of_a_good_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", GOOD)

    records = read_manifest(root)

    assert records == [
        {"image": str((root / "a.png").resolve()), "caption": "a grey square", "label": "square"},
        {"image": str((root / "sub/b.png").resolve()), "caption": "another square", "label": ""},
    ]
    examples = list(manifest_examples(root))
    assert [e.caption for e in examples] == ["a grey square", "another square"]
    assert examples[0].image.size == (8, 8)


def test_read_manifest_at_another_path(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", GOOD)
    other = root / "train.jsonl"
    other.write_text(GOOD[0] + "\n")

    assert len(read_manifest(root, other)) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        (json.dumps(["a.png", "caption"]), "needs 'image' and 'caption'"),
        (json.dumps({"image": "a.png"}), "needs 'image' and 'caption'"),
        (json.dumps({"caption": "no image"}), "needs 'image' and 'caption'"),
        (json.dumps({"image": "a.png", "caption": ""}), "needs 'image' and 'caption'"),
        (json.dumps({"image": "gone.png", "caption": "x"}), "image gone.png not found"),
        (json.dumps({"image": "../outside.png", "caption": "x"}), "leaves the dataset folder"),
        (json.dumps({"image": "/etc/hostname", "caption": "x"}), "leaves the dataset folder"),
    ],
)
def test_read_manifest_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "outside.png")
    root = _folder(tmp_path / "ds", [*GOOD, line])
    manifest = root / "manifest.jsonl"

    with pytest.raises(DatasetError, match=message) as exc:
        read_manifest(root)
    # The bad line is the 4th (a blank line counts).
    assert f"{manifest}:4:" in str(exc.value)


def test_read_manifest_refuses_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "secret.png")
    root = _folder(tmp_path / "ds", [json.dumps({"image": "link.png", "caption": "x"})])
    (root / "link.png").symlink_to(tmp_path / "secret.png")

    with pytest.raises(DatasetError, match=r":1: image path leaves the dataset folder"):
        read_manifest(root)


def test_read_manifest_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="has no records"):
        read_manifest(tmp_path)


# -- gallery export ----------------------------------------------------------------------------
def test_export_gallery_writes_pngs_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "gallery"
    images, labels = load_fashion_mnist("test")

    pairs = export_gallery(out, limit=20)

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{i:05d}.png" for i in range(20)]
    assert pairs == [(f"{i:05d}.png", FASHION_MNIST_CLASSES[int(labels[i])]) for i in range(20)]
    with Image.open(out / "00003.png") as img:
        np.testing.assert_array_equal(np.asarray(img), images[3])
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert lines == [{"image": name, "label": label} for name, label in pairs]


def test_second_export_does_not_rewrite_files(tmp_path: Path) -> None:
    out = tmp_path / "gallery"
    export_gallery(out, limit=20)
    files = sorted(out.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in files}
    # Push the recorded times into the past, so a rewrite would show even on coarse clocks.
    for p in files:
        old = before[p.name] - 10_000_000_000
        os.utime(p, ns=(old, old))
    before = {p.name: p.stat().st_mtime_ns for p in files}

    pairs = export_gallery(out, limit=20)

    assert len(pairs) == 20
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())} == before
