"""The caption decoder with the tiny config, BLEU-4 and R@K, the Fashion-MNIST references, and
the trained default checkpoint (when present)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.config import CHECKPOINTS
from imagine.data import (
    CLASS_SYNONYMS,
    attributes,
    fashion_reference,
    fashion_references,
    load_fashion_mnist,
    reference_key,
)
from imagine.decoding import DecodeError
from imagine.evaluation import cross_modal_report
from imagine.metrics import corpus_bleu, recall_at_k_relevant
from imagine.models.captioner import (
    BOS,
    EOS,
    SPECIALS,
    Captioner,
    build_vocab,
    load_captioner,
    words,
)
from imagine.models.registry import ModelLoadError


def _images() -> list[Image.Image]:
    x, _ = load_fashion_mnist("test")
    return [Image.fromarray(x[i], mode="L") for i in range(4)]


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return load_captioner("config:tiny-captioner", device="cpu")


def test_words_and_vocabulary() -> None:
    assert words("A light, medium-width T-shirt!") == ["a", "light", "medium-width", "t-shirt"]
    vocab = build_vocab(["a dark coat", "a light coat", "a bag"], min_count=2)
    assert vocab == [*SPECIALS, "a", "coat"]


def test_encode_caption_maps_unknown_words_and_round_trips(captioner: Captioner) -> None:
    ids = captioner.encode_caption("a dark zebra coat")
    assert ids[0] == captioner.index[BOS] and ids[-1] == captioner.index[EOS]
    assert captioner.vocab[ids[3]] == "<unk>"
    assert captioner.decode_ids(captioner.encode_caption("a dark coat")[1:]) == "a dark coat"


def test_greedy_log_prob_is_the_models_probability_of_the_caption(captioner: Captioner) -> None:
    """The reported log-probability equals the teacher-forced log-probability of the words."""
    caps = captioner.caption(_images(), "greedy")
    with torch.no_grad():
        memory = captioner.model.memory(captioner.image_tensor(_images()))
        for i, cap in enumerate(caps):
            ids = [captioner.index[BOS], *(captioner.index[w] for w in cap.text.split())]
            if len(ids) <= captioner.max_len:  # ended by EOS, not cut at max_len
                ids.append(captioner.index[EOS])
            seq = torch.tensor([ids])
            # PAD, BOS and UNK are never emitted: the decoder renormalises without them
            logits = captioner.model.logits(memory[i : i + 1], seq[:, :-1])
            logits[..., [captioner.index[w] for w in ("<pad>", BOS, "<unk>")]] = -torch.inf
            logp = torch.log_softmax(logits, -1)
            total = logp[0, torch.arange(seq.shape[1] - 1), seq[0, 1:]].sum().item()
            assert cap.log_prob == pytest.approx(total, abs=1e-3)


def test_strategies_are_deterministic_and_differ(captioner: Captioner) -> None:
    imgs = _images()
    greedy = captioner.caption(imgs, "greedy")
    assert [c.text for c in greedy] == [c.text for c in captioner.caption(imgs, "greedy")]
    beam1 = captioner.caption(imgs, "beam", beam_size=1)
    assert [(c.text, round(c.log_prob, 3)) for c in beam1] == [
        (c.text, round(c.log_prob, 3)) for c in greedy
    ]
    s1 = captioner.caption(imgs, "sample", temperature=2.0, seed=3)
    s2 = captioner.caption(imgs, "sample", temperature=2.0, seed=3)
    s3 = captioner.caption(imgs, "sample", temperature=2.0, seed=4)
    assert [c.text for c in s1] == [c.text for c in s2]
    assert [c.text for c in s1] != [c.text for c in s3]
    assert captioner.caption([], "beam") == []


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"strategy": "nucleus"}, "unknown decoding strategy"),
        ({"strategy": "beam", "beam_size": 0}, "beam_size"),
        ({"strategy": "sample", "temperature": 0.0}, "temperature"),
        ({"strategy": "sample", "temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_decoding_settings_are_refused(
    captioner: Captioner, kwargs: dict[str, object], word: str
) -> None:
    with pytest.raises(DecodeError, match=word):
        captioner.caption(_images(), **kwargs)  # type: ignore[arg-type]


def test_save_and_load_round_trip(captioner: Captioner, tmp_path: Path) -> None:
    version = captioner.save(tmp_path / "cap", {"stage": "test"})
    loaded = load_captioner(f"local-dir:{tmp_path / 'cap'}", device="cpu")
    assert loaded.model_version == version and version.startswith("cap-")
    assert loaded.vocab == captioner.vocab
    a = captioner.caption(_images(), "beam", beam_size=2)
    assert loaded.caption(_images(), "beam", beam_size=2) == a


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a caption decoder"):
        load_captioner("config:tiny-dual")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_captioner(f"local-dir:{tmp_path / 'missing'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"family": "captioner"}))
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="incomplete config"):
        load_captioner(f"local-dir:{tmp_path / 'bad'}")


# -- references, BLEU, R@K ----------------------------------------------------------------------
def test_fashion_references_describe_the_pixels() -> None:
    dark = np.zeros((28, 28), dtype=np.uint8)
    dark[2:26, 1:27] = 60  # a plain dark block, wide for a coat (26 of 28 columns)
    assert attributes(dark, 4) == ("dark", "wide", "in a plain colour")
    striped = dark.copy()
    striped[:, ::2] = 250
    _, _, pattern = attributes(striped, 4)
    assert pattern == "with a visible pattern"
    refs = fashion_references(dark, 4)
    assert refs == [f"a dark wide {n} in a plain colour" for n in CLASS_SYNONYMS[4]]
    assert fashion_reference(dark, 4, random.Random(0)) in refs
    assert reference_key(dark, 4) == refs[0]
    assert attributes(dark, 7)[1] == ""  # sneakers fill the canvas: no width word


def test_corpus_bleu() -> None:
    refs = [["a dark wide coat in a plain colour", "a dark wide jacket in a plain colour"]]
    assert corpus_bleu(["a dark wide jacket in a plain colour"], refs) == pytest.approx(1.0)
    assert corpus_bleu(["a light bag"], refs) == 0.0
    # the last of eight words wrong: p1 7/8, p2 6/7, p3 5/6, p4 4/5 (matched / all n-grams)
    got = corpus_bleu(["a dark wide coat in a plain shade"], refs)
    expected = (7 / 8 * 6 / 7 * 5 / 6 * 4 / 5) ** 0.25
    assert got == pytest.approx(expected)
    # shorter than every reference: the brevity penalty applies
    short = corpus_bleu(["a dark wide coat in a"], refs)
    assert short == pytest.approx(np.exp(1 - 8 / 6))
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


def test_recall_at_k_counts_any_relevant_item() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    relevant = np.array([[False, True, False], [True, False, False]])
    assert recall_at_k_relevant(scores, relevant, (1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_cross_modal_report_with_and_without_the_caption_path() -> None:
    """A caption path that knows the answer lifts R@1 of the fused ranking."""
    rng = np.random.default_rng(0)
    keys = ["a", "b", "c", "d"]
    texts = np.eye(4)
    images = rng.normal(size=(4, 4))  # useless image vectors
    captions = np.eye(4)  # perfect captions
    report = cross_modal_report(images, captions, texts, keys, keys, caption_weight=0.9)
    i2t = report.recall["image -> text"]
    assert i2t["caption-text only"][1] == 1.0
    assert i2t["fused (caption w=0.9)"][1] >= i2t["image-text only"][1]
    assert report.recall["text -> image"]["text-caption only"][1] == 1.0
    assert "R@10" in report.table()


# -- the trained default ----------------------------------------------------------------------
TRAINED = CHECKPOINTS / "fmnist-captioner"


@pytest.mark.skipif(not (TRAINED / "model.safetensors").is_file(), reason="not trained yet")
def test_trained_default_names_what_it_sees() -> None:
    """The committed decoder captions held-out images with their class (any synonym) for most
    of them, and its manifest records BLEU-4 and R@K."""
    captioner = load_captioner(f"local-dir:{TRAINED}", device="cpu")
    x, y = load_fashion_mnist("test")
    idx = list(range(9000, 9200))  # not in the evaluation split of the manifest (the first 1000)
    caps = captioner.caption([Image.fromarray(x[i], mode="L") for i in idx], "greedy")
    named = sum(
        any(syn in cap.text for syn in CLASS_SYNONYMS[int(y[i])])
        for i, cap in zip(idx, caps, strict=True)
    )
    assert named / len(idx) > 0.6
    manifest = json.loads((TRAINED / "manifest.json").read_text())
    assert manifest["metrics"]["BLEU-4"] > 0.2
    assert "image -> text" in manifest["metrics"]["recall"]
