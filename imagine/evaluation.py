"""Evaluation of a dual encoder in-process: category mAP and precision@10 per class.

The query service's numbers are computed over gRPC by the CLI; this module is the same
computation with no services around it (used by the trainer, tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from imagine.metrics import category_map, precision_at_k


@dataclass
class CategoryReport:
    """Per-class AP and precision@10, and their means."""

    ap: dict[str, float] = field(default_factory=dict)
    p10: dict[str, float] = field(default_factory=dict)

    @property
    def map(self) -> float:
        return float(np.mean(list(self.ap.values()))) if self.ap else 0.0

    @property
    def mean_p10(self) -> float:
        return float(np.mean(list(self.p10.values()))) if self.p10 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"mAP": self.map, "P@10": self.mean_p10, "AP": self.ap, "P@10_per_class": self.p10}

    def table(self, title: str = "category retrieval") -> str:
        width = max([len(c) for c in self.ap] + [8])
        lines = [title, f"{'class':<{width}}  {'AP':>6}  {'P@10':>6}"]
        for cls in self.ap:
            lines.append(f"{cls:<{width}}  {self.ap[cls]:6.3f}  {self.p10[cls]:6.3f}")
        lines.append(f"{'mean':<{width}}  {self.map:6.3f}  {self.mean_p10:6.3f}")
        return "\n".join(lines)


def report_from_scores(
    scores: np.ndarray, gallery_labels: Sequence[str], query_labels: Sequence[str]
) -> CategoryReport:
    labels = np.asarray(gallery_labels)
    report = CategoryReport(ap=category_map(scores, gallery_labels, query_labels))
    for qi, ql in enumerate(query_labels):
        top = np.argsort(-scores[qi], kind="stable")[:10]
        report.p10[ql] = precision_at_k(labels[top] == ql, 10)
    return report


def report_from_rankings(
    rankings: dict[str, list[str]], gallery_labels: dict[str, str]
) -> CategoryReport:
    """From ranked id lists over the whole gallery (as a search service returns them)."""
    from imagine.metrics import average_precision

    report = CategoryReport()
    for ql, ids in rankings.items():
        rel = np.array([gallery_labels.get(i) == ql for i in ids], dtype=bool)
        num = sum(1 for v in gallery_labels.values() if v == ql)
        report.ap[ql] = average_precision(rel, num)
        report.p10[ql] = precision_at_k(rel, 10)
    return report


def evaluate_category(
    encoder: object,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    queries: dict[str, str],
    batch_size: int = 512,
) -> CategoryReport:
    """``queries`` maps each class label to its one text query."""
    enc = encoder  # a DualEncoder; typed loosely to keep this module free of torch imports
    feats = np.concatenate(
        [
            enc.encode_images(images[i : i + batch_size])  # type: ignore[attr-defined]
            for i in range(0, len(images), batch_size)
        ]
    )
    qlabels = list(queries)
    text = enc.encode_text([queries[q] for q in qlabels])  # type: ignore[attr-defined]
    return report_from_scores(text @ feats.T, labels, qlabels)


def evaluate_paths_in_process(
    dual: object,
    vision: object,
    generator: object,
    aggregator: object,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    queries: dict[str, str],
    num_generated: int = 4,
    steps: int = 20,
    guidance: float = 2.0,
    seed: int = 0,
    batch_size: int = 512,
) -> dict[str, CategoryReport]:
    """Category reports of every path with no services around the models: text, generated
    (mean, and the attention aggregator when ``aggregator`` is one) and fused with the
    aggregator's learned weight."""
    from imagine.fusion import fuse
    from imagine.models.aggregator import mean_pool

    m: dict[str, object] = {"dual": dual, "vision": vision, "gen": generator, "agg": aggregator}
    ql = list(queries)

    def encode(model: object, imgs: Sequence[Image.Image]) -> np.ndarray:
        return np.concatenate(
            [
                model.encode_images(imgs[i : i + batch_size])  # type: ignore[attr-defined]
                for i in range(0, len(imgs), batch_size)
            ]
        )

    joint = encode(m["dual"], images)
    visual = encode(m["vision"], images)
    text = m["dual"].encode_text([queries[q] for q in ql]) @ joint.T  # type: ignore[attr-defined]
    generated = m["gen"].generate(  # type: ignore[attr-defined]
        [queries[q] for q in ql],
        num_images=num_generated,
        steps=steps,
        guidance=guidance,
        seed=seed,
    )
    emb = np.stack([encode(m["vision"], imgs) for imgs in generated])  # (Q, K, D)
    mean = mean_pool(emb)
    lam = float(m["agg"].fusion_weight)  # type: ignore[attr-defined]
    scores = {"text": text, "generated (mean)": mean @ visual.T}
    if m["agg"].mode == "attention":  # type: ignore[attr-defined]
        attention = m["agg"].aggregate(emb)  # type: ignore[attr-defined]
        scores["generated (attention)"] = attention @ visual.T
    # fused with the aggregator's own path, as the service fuses by default
    own = scores.get("generated (attention)", scores["generated (mean)"])
    scores["fused"] = fuse({"text": text, "generated": own}, {"text": 1 - lam, "generated": lam})
    return {name: report_from_scores(s, labels, ql) for name, s in scores.items()}


@dataclass
class CrossModalReport:
    """R@1/5/10 both directions per path and fused, and the captions' BLEU-4."""

    recall: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    bleu4: float = 0.0
    caption_weight: float = 0.5

    def as_dict(self) -> dict[str, object]:
        return {
            "BLEU-4": self.bleu4,
            "caption_weight": self.caption_weight,
            "recall": {
                d: {p: {f"R@{k}": v for k, v in r.items()} for p, r in paths.items()}
                for d, paths in self.recall.items()
            },
        }

    def table(self, title: str = "cross-modal retrieval") -> str:
        lines = [title, f"{'direction':<14}  {'paths':<28}  {'R@1':>6}  {'R@5':>6}  {'R@10':>6}"]
        for direction, paths in self.recall.items():
            for path, r in paths.items():
                lines.append(f"{direction:<14}  {path:<28}  {r[1]:6.3f}  {r[5]:6.3f}  {r[10]:6.3f}")
        lines.append(f"caption BLEU-4 (greedy, against every synonym reference): {self.bleu4:.4f}")
        return "\n".join(lines)


def cross_modal_report(
    image_vecs: np.ndarray,
    caption_vecs: np.ndarray,
    text_vecs: np.ndarray,
    image_keys: Sequence[str],
    text_keys: Sequence[str],
    caption_weight: float,
) -> CrossModalReport:
    """R@K of image -> text and text -> image, with and without the caption path.

    ``image_vecs`` and ``caption_vecs`` (the text vectors of the images' generated captions) are
    per gallery image, ``text_vecs`` per text; an image and a text are relevant to each other
    when their keys match (texts that say the same thing about the image).
    """
    from imagine.fusion import fuse
    from imagine.metrics import recall_at_k_relevant

    ks = (1, 5, 10)
    relevant = np.asarray(image_keys)[:, None] == np.asarray(text_keys)[None, :]
    w = {"image": 1 - caption_weight, "caption": caption_weight}
    i2t = {"image": image_vecs @ text_vecs.T, "caption": caption_vecs @ text_vecs.T}
    t2i = {"image": text_vecs @ image_vecs.T, "caption": text_vecs @ caption_vecs.T}
    report = CrossModalReport(caption_weight=caption_weight)
    report.recall["image -> text"] = {
        "image-text only": recall_at_k_relevant(i2t["image"], relevant, ks),
        "caption-text only": recall_at_k_relevant(i2t["caption"], relevant, ks),
        f"fused (caption w={caption_weight:g})": recall_at_k_relevant(fuse(i2t, w), relevant, ks),
    }
    report.recall["text -> image"] = {
        "text-image only": recall_at_k_relevant(t2i["image"], relevant.T, ks),
        "text-caption only": recall_at_k_relevant(t2i["caption"], relevant.T, ks),
        f"fused (caption w={caption_weight:g})": recall_at_k_relevant(fuse(t2i, w), relevant.T, ks),
    }
    return report


def evaluate_captioner(
    dual: object,
    captioner: object,
    images: Sequence[Image.Image],
    references: Sequence[Sequence[str]],
    keys: Sequence[str],
    texts: Sequence[str],
    caption_weight: float = 0.5,
    batch_size: int = 256,
) -> tuple[CrossModalReport, list[str]]:
    """Caption ``images`` (greedy), BLEU-4 against ``references``, and cross-modal R@K with
    ``texts`` (one per image, ``keys`` saying what each image and text describe) as the text
    gallery. Returns the report and the captions."""
    from imagine.metrics import corpus_bleu

    caps: list[str] = []
    joint = []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        caps.extend(c.text for c in captioner.caption(batch, "greedy"))  # type: ignore[attr-defined]
        joint.append(dual.encode_images(batch))  # type: ignore[attr-defined]
    image_vecs = np.concatenate(joint)
    caption_vecs = dual.encode_text([c or "." for c in caps])  # type: ignore[attr-defined]
    text_vecs = dual.encode_text(list(texts))  # type: ignore[attr-defined]
    report = cross_modal_report(image_vecs, caption_vecs, text_vecs, keys, keys, caption_weight)
    report.bleu4 = corpus_bleu(caps, references)
    return report, caps
