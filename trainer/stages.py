"""Training stages, one per model family. Each runs inside a Ray Train worker.

Stage ``dual_encoder``: contrastive training of the image tower (and the text projection) against
the locked all-MiniLM-L6-v2 text tower. Captions that share a label are positives of each other
(a multi-positive InfoNCE), so a batch holding two sneakers does not push them apart.
The locked text transformer's pooled features are computed once per distinct caption.
"""

from __future__ import annotations

import json
import os
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imagine.models.dual_encoder import DualEncoder, build_clip, save_checkpoint
from imagine.models.registry import get_model_config
from trainer.checkpoints import checkpoint, resume_state
from trainer.datasets import TrainData, load_train_data
from trainer.schedule import running_loss, warmup_cosine


def multi_positive_loss(
    img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE where every pair in the same group is a positive."""
    logits = scale * img @ txt.T
    pos = (groups[:, None] == groups[None, :]).float()
    target = pos / pos.sum(dim=1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


@torch.no_grad()
def pooled_text_features(
    model: torch.nn.Module, encoder: DualEncoder, captions: list[str], batch: int = 256
) -> torch.Tensor:
    """The locked text transformer's pooled output per caption (before the projection)."""
    text: Any = model.text
    out = []
    for i in range(0, len(captions), batch):
        tokens = encoder.tokenize(captions[i : i + batch])
        mask = (tokens != text.config.pad_token_id).long()
        hidden = text.transformer(input_ids=tokens, attention_mask=mask)
        out.append(text.pooler(hidden, mask))
    return torch.cat(out)


class ContrastivePair(torch.nn.Module):
    """A training step's forward as one module, which DDP can wrap: the normalised image
    features, the projected caption features and the logit scale."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(
        self, pixels: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = self.model.encode_image(pixels, normalize=True)
        txt = F.normalize(self.model.text.proj(pooled), dim=-1)
        return img, txt, self.model.logit_scale.exp().clamp(max=100)


def _progress(total: int, desc: str) -> Any:
    if os.environ.get("IMAGINE_PLAIN_PROGRESS"):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, mininterval=2.0)
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    return ray_tqdm(total=total, desc=desc)


def dual_encoder_stage(cfg: dict[str, Any]) -> None:
    """The Ray Train loop for the dual encoder (runs on each worker)."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    work = Path(cfg["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    model_cfg = get_model_config(cfg["model_config"])
    model = build_clip(model_cfg)
    encoder = DualEncoder(model, model_cfg, "training", device="cpu")
    model.train()

    data: TrainData = load_train_data(cfg["dataset"], cfg.get("limit"), encoder.image_size)
    uniq = sorted(set(data.captions))
    index = {c: i for i, c in enumerate(uniq)}
    pooled = pooled_text_features(model, encoder, uniq)
    caption_ids = torch.tensor([index[c] for c in data.captions])
    groups = torch.tensor(data.groups)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    # Several workers: DDP averages the gradients (each worker takes its shard of every epoch).
    pair = ContrastivePair(model)
    net = ray.train.torch.prepare_model(pair, move_to_device=False) if world > 1 else pair
    n = len(data.pixels)
    bs = cfg["batch_size"]
    steps_per_epoch = max(1, n // (bs * world))
    total = max(1, round(steps_per_epoch * cfg["epochs"]))
    warmup = min(100, total // 10)

    step = 0
    if state := resume_state(work, cfg["resume"], total):
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        step = int(state["step"])

    bar = _progress(total, "train dual encoder") if rank == 0 else None
    if bar is not None:
        bar.update(step)
    gen = torch.Generator().manual_seed(cfg["seed"])
    mean, std = encoder._mean, encoder._std
    loss_avg = float("nan")
    started = time.time()
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=gen.manual_seed(cfg["seed"] + epoch))
        shard = perm[rank::world]
        for b in range(pos, steps_per_epoch):
            idx = shard[b * bs : (b + 1) * bs]
            x = data.pixels[idx].float() / 255.0
            flip = torch.rand(len(idx)) < 0.5
            x[flip] = x[flip].flip(-1)
            x = (x - mean) / std
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(cfg["lr"], step, warmup, total)
            img, txt, scale = net(x, pooled[caption_ids[idx]])
            loss = multi_positive_loss(img, txt, groups[idx], scale)
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
                    partial(save_checkpoint, model, model_cfg, manifest={"step": step}),
                )
            if step >= total:
                break
    if bar is not None:
        bar.close()
    if rank == 0:
        (work / "train_summary.json").write_text(
            json.dumps(
                {
                    "steps": step,
                    "final_loss": loss_avg,
                    "seconds": time.time() - started,
                    "examples": n,
                    "distinct_captions": len(uniq),
                    "data_fingerprint": data.fingerprint,
                }
            )
        )
