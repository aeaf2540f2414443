"""Stage ``captioner``: the caption decoder, cross-entropy first, then self-critical training.

1. Cross-entropy (teacher forcing) on (image, reference caption) pairs. Fashion-MNIST
   references are sentences of words computed from the pixels plus class synonyms
   (``imagine.data.fashion_reference``); a folder dataset's captions are used as given.
2. Self-critical sequence training (Rennie et al. 2017) with GXN's reward: a sampled caption is
   rewarded by its similarity to the reference caption in the joint embedding space (the dual
   encoder's text tower), minus the reward of the greedy caption (the baseline). Text vectors
   are cached per distinct caption: the vocabulary is small, so most repeat.

The image tower starts as a copy of the trained dual encoder's image tower (``dual_model``) and
is fine-tuned at ``visual_lr_scale`` times the learning rate; the copy is saved with the decoder.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imagine.models.captioner import (
    PAD,
    Captioner,
    CaptionNet,
    build_vocab,
    captioner_config,
    save_captioner,
)
from trainer.checkpoints import resume_state, save_state
from trainer.schedule import running_loss, warmup_cosine


def caption_data(
    spec: str, limit: int | None, seed: int, image_size: int = 28
) -> tuple[torch.Tensor, list[str], str]:
    """(uint8 pixels (N, 3, 28|S, S), captions, data fingerprint) of the training split."""
    from imagine.data import fashion_reference, fingerprint, load_fashion_mnist
    from trainer.datasets import load_train_data, parse_dataset

    kind, _ = parse_dataset(spec)
    if kind != "fashion-mnist":
        data = load_train_data(spec, limit, image_size, seed)
        return data.pixels, data.captions, data.fingerprint
    images, labels = load_fashion_mnist("train")
    if limit:
        images, labels = images[:limit], labels[:limit]
    rng = random.Random(seed)
    captions = [fashion_reference(images[i], int(labels[i]), rng) for i in range(len(images))]
    pixels = torch.from_numpy(np.ascontiguousarray(images))[:, None].repeat(1, 3, 1, 1)
    fp = fingerprint([images.tobytes(), labels.tobytes(), "references-v1"])
    return pixels, captions, fp


def init_visual_from_dual(net: CaptionNet, dual_spec: str) -> str:
    """Copy the dual encoder's image tower into the decoder's; returns the dual's version."""
    from imagine.models.dual_encoder import load_dual_encoder

    dual = load_dual_encoder(dual_spec, device="cpu")
    state = {
        k.removeprefix("visual."): v
        for k, v in dual.model.state_dict().items()
        if k.startswith("visual.")
    }
    missing, unexpected = net.visual.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the dual encoder's image tower does not fit the captioner config: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return dual.model_version


def caption_stage(cfg: dict[str, Any]) -> None:
    """The Ray Train loop (one worker: the model is small)."""
    from imagine.models.dual_encoder import load_dual_encoder
    from trainer.stages import _progress

    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    work = Path(cfg["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pixels, captions, fp = caption_data(cfg["dataset"], cfg.get("limit"), cfg["seed"])
    config = captioner_config(cfg["model_config"], build_vocab(captions))
    net = CaptionNet(config)
    dual_version = init_visual_from_dual(net, cfg["dual_model"]) if cfg["dual_model"] else ""
    cap = Captioner(net, config, "training", device="cpu")
    targets = [cap.encode_caption(c) for c in captions]
    width = max(len(t) for t in targets)
    pad = cap.index[PAD]
    tokens = torch.full((len(targets), width), pad, dtype=torch.long)
    for i, t in enumerate(targets):
        tokens[i, : len(t)] = torch.tensor(t)

    visual = list(net.visual.parameters())
    ids = {id(p) for p in visual}
    rest = [p for p in net.parameters() if id(p) not in ids]
    groups: list[dict[str, Any]] = [{"params": rest, "scale": 1.0}]
    frozen = float(cfg["visual_lr_scale"]) <= 0
    if frozen:  # the tower's outputs are computed once for the whole training set
        for p in visual:
            p.requires_grad_(False)
    else:
        groups.append({"params": visual, "scale": float(cfg["visual_lr_scale"])})
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n, bs = len(tokens), cfg["batch_size"]
    steps_per_epoch = max(1, n // bs)
    xe_total = max(1, round(steps_per_epoch * cfg["epochs"]))
    scst_total = int(cfg["scst_steps"])
    warmup = min(100, xe_total // 10)

    def batch_pixels(idx: torch.Tensor) -> torch.Tensor:
        x = pixels[idx].float() / 255.0
        return (x - cap._mean) / cap._std

    tower: tuple[torch.Tensor, torch.Tensor] | None = None
    if frozen:
        net.visual.eval()
        with torch.no_grad():
            outs = [net.visual(batch_pixels(torch.arange(i, min(i + 512, len(pixels)))))
                    for i in range(0, len(pixels), 512)]  # fmt: skip
        tower = (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))

    def memory_of(idx: torch.Tensor) -> torch.Tensor:
        if tower is not None:
            return net.memory_from(tower[0][idx], tower[1][idx])
        return net.memory(batch_pixels(idx))

    step = 0
    if state := resume_state(work, cfg["resume"], xe_total + scst_total):
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])

    def checkpoint() -> None:
        save_state(work, {"model": net.state_dict(), "opt": opt.state_dict(), "step": step})

    gen = torch.Generator().manual_seed(cfg["seed"])
    bar = _progress(xe_total + scst_total, "train caption decoder")
    bar.update(step)
    xe_loss = scst_reward = float("nan")
    net.train()
    if frozen:
        net.visual.eval()
    # 1. cross-entropy
    while step < xe_total:
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=gen.manual_seed(cfg["seed"] + epoch))
        for b in range(pos, steps_per_epoch):
            idx = perm[b * bs : (b + 1) * bs]
            lr = warmup_cosine(cfg["lr"], step, warmup, xe_total, floor=0.05)
            for group in opt.param_groups:
                group["lr"] = lr * group["scale"]
            seq = tokens[idx]
            logits = net.logits(memory_of(idx), seq[:, :-1])
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                seq[:, 1:].reshape(-1),
                ignore_index=pad,
                label_smoothing=0.05,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            xe_loss = running_loss(xe_loss, loss.item())
            bar.update(1)
            if step % cfg["checkpoint_every"] == 0:
                checkpoint()
            if step >= xe_total:
                break
    # 2. self-critical: reward = <text(sample), text(reference)> in the joint space
    if scst_total and cfg["dual_model"]:
        dual = load_dual_encoder(cfg["dual_model"], device="cpu")
        cache: dict[str, np.ndarray] = {}

        def text_vectors(texts: list[str]) -> np.ndarray:
            todo = sorted({t for t in texts if t not in cache})
            if todo:
                for t, v in zip(todo, dual.encode_text(todo), strict=True):
                    cache[t] = v
            return np.stack([cache[t] for t in texts])

        for group in opt.param_groups:
            group["lr"] = cfg["scst_lr"] * group["scale"]
        sbs = int(cfg["scst_batch_size"])
        rewards: list[float] = []
        while step < xe_total + scst_total:
            idx = torch.randint(0, n, (sbs,), generator=gen)
            refs = [captions[int(i)] for i in idx]
            net.eval()  # no dropout while decoding: the baseline is the deployed greedy caption
            with torch.no_grad():
                memory = memory_of(idx)
                greedy, _ = cap.decode(memory, cap.max_len, sample=False)
            net.train()
            if frozen:
                net.visual.eval()
            memory = memory_of(idx)
            sampled, logp = cap.decode(memory, cap.max_len, sample=True, generator=gen)
            texts_s = [cap.decode_ids(r) for r in sampled.tolist()]
            texts_g = [cap.decode_ids(r) for r in greedy.tolist()]
            ref_v = text_vectors(refs)
            r_s = (text_vectors([t or "." for t in texts_s]) * ref_v).sum(axis=1)
            r_g = (text_vectors([t or "." for t in texts_g]) * ref_v).sum(axis=1)
            advantage = torch.from_numpy(r_s - r_g).float()
            length = (sampled != cap.index["<eos>"]).sum(dim=1).clamp(min=1).float()
            loss = -(advantage * logp / length).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            rewards.append(float(r_g.mean()))
            scst_reward = float(np.mean(rewards[-20:]))
            bar.update(1)
            if step % cfg["checkpoint_every"] == 0:
                checkpoint()
    bar.close()
    checkpoint()
    net.eval()
    save_captioner(net, config, work / "last", {"stage": "captioner"})
    (work / "train_summary.json").write_text(
        json.dumps(
            {
                "steps": step,
                "xe_steps": xe_total,
                "scst_steps": scst_total,
                "final_xe_loss": xe_loss,
                "final_greedy_reward": scst_reward,
                "seconds": time.time() - started,
                "examples": n,
                "vocab_size": len(config["vocab"]),
                "data_fingerprint": fp,
                "models": {"dual": dual_version},
            }
        )
    )


def evaluate_caption_stage(ckpt: Path, cfg: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """Held-out metrics for the manifest: BLEU-4, R@1/5/10 both directions with and without the
    caption path, and category mAP of the text and caption paths (Fashion-MNIST only).

    The held-out split is the first ``limit`` (default 1,000) test images; each image's text in
    the text gallery is its reference with a synonym drawn from ``eval_texts_seed``.
    """
    from PIL import Image

    from imagine.data import (
        FASHION_MNIST_CLASSES,
        class_query,
        fashion_reference,
        fashion_references,
        load_fashion_mnist,
        reference_key,
    )
    from imagine.evaluation import evaluate_captioner, report_from_scores
    from imagine.models.captioner import load_captioner
    from imagine.models.dual_encoder import load_dual_encoder
    from imagine.reports import comparison_table
    from trainer.datasets import parse_dataset

    if parse_dataset(cfg["dataset"])[0] != "fashion-mnist" or not cfg["dual_model"]:
        return {}
    raw, labels = load_fashion_mnist("test")
    n = min(limit or 1000, len(raw))
    rng = random.Random(cfg["eval_texts_seed"])
    images = [Image.fromarray(raw[i], mode="L") for i in range(n)]
    refs = [fashion_references(raw[i], int(labels[i])) for i in range(n)]
    keys = [reference_key(raw[i], int(labels[i])) for i in range(n)]
    texts = [fashion_reference(raw[i], int(labels[i]), rng) for i in range(n)]
    dual = load_dual_encoder(cfg["dual_model"], device="cpu")
    captioner = load_captioner(f"local-dir:{ckpt}", device="cpu")
    report, caps = evaluate_captioner(
        dual, captioner, images, refs, keys, texts, float(cfg["caption_weight"])
    )
    class_names = [FASHION_MNIST_CLASSES[int(labels[i])] for i in range(n)]
    queries = dual.encode_text([class_query(i) for i in range(len(FASHION_MNIST_CLASSES))])
    joint = dual.encode_images(images)
    caption_vecs = dual.encode_text([c or "." for c in caps])
    w = float(cfg["caption_weight"])
    ql = list(FASHION_MNIST_CLASSES)
    category = {
        "text": report_from_scores(queries @ joint.T, class_names, ql),
        "caption": report_from_scores(queries @ caption_vecs.T, class_names, ql),
        f"fused (caption w={w:g})": report_from_scores(
            (1 - w) * queries @ joint.T + w * queries @ caption_vecs.T, class_names, ql
        ),
    }
    title = f"held-out cross-modal retrieval ({n} images, {n} texts)"
    print(comparison_table(category))
    print(report.table(title))
    if cfg.get("eval_out"):
        from imagine.reports import recall_chart

        out = Path(cfg["eval_out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        recall_chart(report.recall, out / "recall.png", f"{title}, BLEU-4 {report.bleu4:.3f}")
        print(f"wrote {out / 'eval.json'} and {out / 'recall.png'}")
    for i in range(5):
        print(f"  {caps[i]!r}  (reference {refs[i][0]!r})")
    return {
        "summary": {
            "BLEU-4": round(report.bleu4, 4),
            **{
                f"{d} {p} R@{k}": round(v, 4)
                for d, paths in report.recall.items()
                for p, r in paths.items()
                for k, v in r.items()
            },
            **{f"category mAP {p}": round(r.map, 4) for p, r in category.items()},
        },
        "eval_images": n,
        **report.as_dict(),
        "category": {p: r.as_dict() for p, r in category.items()},
        "examples": [{"caption": caps[i], "reference": refs[i][0]} for i in range(10)],
    }
