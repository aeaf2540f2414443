"""Stage ``vision``: the vision-only encoder, trained on images alone (runs in a Ray Train worker).

The objective is contrastive. When the dataset's groups repeat (labels: Fashion-MNIST classes, a
folder's ``label`` field) it is supervised contrastive learning: every other image of the same
group in the batch is a positive. When every example is its own group it is SimCLR: two augmented
views of each image, the other view the only positive. Both are one multi-positive InfoNCE over
the batch's views (:func:`contrastive_loss`). Augmentations (:func:`augment`): random crop/shift,
horizontal flip and brightness for SimCLR; horizontal flip only for supervised training.

:func:`evaluate_vision` measures image -> image category mAP on Fashion-MNIST's test split.
"""

from __future__ import annotations

import json
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imagine.models.registry import get_model_config
from imagine.models.vision import (
    VisionEncoder,
    build_vision_model,
    image_size_of,
    load_vision_encoder,
    save_vision_checkpoint,
)
from trainer.checkpoints import checkpoint, resume_state
from trainer.datasets import load_train_data
from trainer.schedule import running_loss, warmup_cosine
from trainer.stages import _progress

DEFAULTS: dict[str, Any] = {
    "model_config": "fmnist-vision",
    "epochs": 3,
    "batch_size": 256,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "temperature": 0.1,
    "objective": "auto",  # "auto" | "supcon" | "simclr"
    "views": None,  # views per image; default 1 for supcon, 2 for simclr
    "augment": "auto",  # "full" | "flip" | "none"; auto: flip for supcon, full for simclr
    "min_crop_scale": 0.75,
    "limit": None,
    "seed": 0,
    "checkpoint_every": 200,
    "resume": True,
}


# Label supervision needs no heavy augmentation (crops and shifts slowed it down in short runs
# on Fashion-MNIST, whose images are centred); instance discrimination cannot work without it.
AUTO_AUGMENT = {"supcon": "flip", "simclr": "full"}


def choose_objective(groups: list[int], requested: str = "auto") -> str:
    """Supervised contrastive when groups repeat (the data has labels), else SimCLR."""
    if requested in ("supcon", "simclr"):
        return requested
    if requested != "auto":
        raise ValueError(f"unknown objective {requested!r}: use 'auto', 'supcon' or 'simclr'")
    return "supcon" if len(set(groups)) < len(groups) else "simclr"


def contrastive_loss(feats: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive InfoNCE over a batch of L2-normalised views (SupCon; SimCLR as a case).

    Every other view with the same group id is a positive; a view is never its own candidate.
    Views without any positive in the batch do not contribute.
    """
    n = len(feats)
    eye = torch.eye(n, dtype=torch.bool, device=feats.device)
    logits = (feats @ feats.T / temperature).masked_fill(eye, float("-inf"))
    pos = (groups[:, None] == groups[None, :]) & ~eye
    log_prob = F.log_softmax(logits, dim=1).masked_fill(~pos, 0.0)
    count = pos.sum(dim=1)
    has = count > 0
    if not bool(has.any()):
        return feats.sum() * 0.0
    return -(log_prob.sum(dim=1)[has] / count[has]).mean()


def augment(
    x: torch.Tensor, gen: torch.Generator, mode: str = "full", min_scale: float = 0.75
) -> torch.Tensor:
    """Random views of (N, C, S, S) pixels in [0, 1].

    ``full``: crop (zoom in), shift, horizontal flip and brightness (SimCLR needs all of them);
    ``flip``: horizontal flip only; ``none``: the pixels as they are.
    """
    n = len(x)
    if mode == "none":
        return x
    if mode == "flip":
        flip = torch.rand(n, generator=gen) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)
    if mode != "full":
        raise ValueError(f"unknown augmentation {mode!r}: use 'full', 'flip' or 'none'")

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    scale = uniform(min_scale, 1.0)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    shift = (1.0 - scale)[:, None] * (2 * torch.rand(n, 2, generator=gen) - 1) + uniform(
        -0.08, 0.08
    )[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (out * uniform(0.7, 1.3)[:, None, None, None]).clamp(0.0, 1.0)


def vision_stage(cfg: dict[str, Any]) -> None:
    """The Ray Train loop for the vision encoder (runs on each worker)."""
    import ray.train
    import ray.train.torch

    cfg = {**DEFAULTS, **cfg}
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    work = Path(cfg["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    model_cfg = get_model_config(cfg["model_config"])
    model = build_vision_model(model_cfg)
    encoder = VisionEncoder(model, model_cfg, "training", device="cpu")
    model.train()

    data = load_train_data(cfg["dataset"], cfg["limit"], image_size_of(model_cfg), cfg["seed"])
    objective = choose_objective(data.groups, cfg["objective"])
    views = int(cfg["views"] or (1 if objective == "supcon" else 2))
    if objective == "simclr" and views < 2:
        raise ValueError("SimCLR needs at least 2 views per image")
    augmentation = cfg["augment"] if cfg["augment"] != "auto" else AUTO_AUGMENT[objective]
    groups = torch.tensor(data.groups)

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    # Several workers: DDP averages the gradients (each worker takes its shard of every epoch).
    net = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n = len(data.pixels)
    bs = min(cfg["batch_size"], max(1, n // world))
    steps_per_epoch = max(1, (n // world) // bs)
    total = max(1, round(steps_per_epoch * cfg["epochs"]))
    warmup = min(100, total // 10)

    step = 0
    if state := resume_state(work, cfg["resume"], total):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])

    bar = _progress(total, f"train vision encoder ({objective})") if rank == 0 else None
    if bar is not None:
        bar.update(step)
    order_gen = torch.Generator()
    aug_gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + step + rank)
    loss_avg = float("nan")
    started = time.time()
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=order_gen.manual_seed(cfg["seed"] + epoch))
        shard = perm[rank::world]
        for b in range(pos, min(steps_per_epoch, len(shard) // bs)):
            idx = shard[b * bs : (b + 1) * bs]
            x = data.pixels[idx].float() / 255.0
            batch = torch.cat(
                [augment(x, aug_gen, augmentation, cfg["min_crop_scale"]) for _ in range(views)]
            )
            ids = groups[idx] if objective == "supcon" else torch.arange(len(idx))
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(cfg["lr"], step, warmup, total)
            feats = F.normalize(net(encoder.normalise_pixels(batch)), dim=-1)
            loss = contrastive_loss(feats, ids.repeat(views), cfg["temperature"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_avg = running_loss(loss_avg, loss.item())
            if bar is not None:
                bar.update(1)
            if step % cfg["checkpoint_every"] == 0 or step == total:
                checkpoint(
                    work,
                    rank,
                    {"step": step, "loss": loss_avg},
                    {"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                    partial(save_vision_checkpoint, model, model_cfg, manifest={"step": step}),
                )
            if step >= total:
                break
    if bar is not None:
        bar.close()
    if rank == 0:
        summary = {
            "steps": step,
            "objective": objective,
            "views": views,
            "augment": augmentation,
            "final_loss": loss_avg,
            "seconds": time.time() - started,
            "examples": n,
            "groups": len(set(data.groups)),
            "data_fingerprint": data.fingerprint,
        }
        (work / "train_summary.json").write_text(json.dumps(summary))


def evaluate_vision(
    path: str | Path,
    dataset: str = "fashion-mnist",
    num_queries: int = 200,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """Image -> image category mAP on the held-out split (empty for folder datasets).

    Each of ``num_queries`` random test images queries the other test images; relevant means
    the same label. In-process: one pass of the encoder over the split.
    """
    from imagine.metrics import average_precision, precision_at_k
    from trainer.datasets import eval_split

    split = eval_split(dataset, limit)
    if split is None:
        return {}
    images, labels = split
    encoder = load_vision_encoder(f"local-dir:{path}", device="cpu")
    feats = encoder.encode_images(images)
    lab = np.asarray(labels)
    rng = np.random.default_rng(seed)
    queries = rng.choice(len(images), size=min(num_queries, len(images)), replace=False)
    per_class: dict[str, list[float]] = {}
    aps, p10s = [], []
    for q in queries:
        scores = feats @ feats[q]
        scores[q] = -np.inf
        order = np.argsort(-scores, kind="stable")[:-1]  # the query itself ranks last: drop it
        rel = lab[order] == lab[q]
        ap = average_precision(rel, int((lab == lab[q]).sum()) - 1)
        aps.append(ap)
        p10s.append(precision_at_k(rel, 10))
        per_class.setdefault(str(lab[q]), []).append(ap)
    result: dict[str, Any] = {
        "mAP": float(np.mean(aps)),
        "P@10": float(np.mean(p10s)),
        "queries": len(queries),
        "eval_images": len(images),
        "AP_per_class": {c: float(np.mean(v)) for c, v in sorted(per_class.items())},
    }
    result["summary"] = {"mAP": round(result["mAP"], 4), "P@10": round(result["P@10"], 4)}
    return result
