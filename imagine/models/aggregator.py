"""The CLE-TIR aggregator and fusion weight: K generated-image embeddings -> one visual query.

A CLS token starts as the mean of the K embeddings; two single-head attention layers update only
the CLS token (it attends over ``[CLS; x_1..x_K]``; the K embeddings are never changed), and the
output is L2-normalised. Each layer's new CLS is the attention-weighted average of
``[CLS; x_1..x_K]`` plus a learned correction (a value/output projection) and a small MLP on a
residual. Keys and both corrections start at zero, so an untrained aggregator is exactly mean
pooling and training can only move away from it where that helps (e.g. by down-weighting failed
generations).

The fusion weight is one scalar ``p`` with ``l = sigmoid(p)``:
``score = (1 - l) * text_score + l * generated_score``. ``imagine.fusion`` applies it at query time
(weights ``{"text": 1 - l, "generated": l}``).

:func:`train_aggregator` trains both jointly from fixed arrays (no data access here): a
multi-positive InfoNCE of the fused score over real gallery images, positives = same group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from imagine.models.registry import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ModelLoadError,
    ModelSpec,
    file_digest,
    get_model_config,
    locate_checkpoint,
)

FAMILY = "aggregator"
MODES = ("attention", "mean")


def mean_aggregate(x: torch.Tensor) -> torch.Tensor:
    """(B, K, D) -> the L2-normalised mean over K: (B, D)."""
    return F.normalize(x.mean(dim=1), dim=-1)


def mean_pool(embeddings: np.ndarray) -> np.ndarray:
    """:func:`mean_aggregate` on NumPy embeddings: (B, K, D) -> (B, D), float32."""
    x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    return mean_aggregate(x).numpy()


class CLSAttentionLayer(nn.Module):
    """One single-head attention layer that updates only the CLS token."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # Uniform attention and no corrections at init: the layer returns its CLS (the mean).
        for layer in (self.key, self.out, self.mlp[2]):
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls (B, 1, D), tokens (B, K, D) -> new cls (B, 1, D), attention (B, 1, K + 1)."""
        seq = torch.cat([cls, tokens], dim=1)
        h = self.norm(seq)
        q = self.query(h[:, :1])
        k = self.key(h)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        new = attn @ seq + self.out(attn @ self.value(h))
        new = new + self.mlp(self.norm_mlp(new))
        return new, attn


class AttentionAggregator(nn.Module):
    """CLS = mean of the K embeddings, refined by ``layers`` CLS-only attention layers."""

    def __init__(self, dim: int, layers: int = 2, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLSAttentionLayer(dim, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = x.mean(dim=1, keepdim=True)
        for layer in self.layers:
            cls, _ = layer(cls, x)
        return F.normalize(cls[:, 0], dim=-1)


class FusionWeight(nn.Module):
    """The learned scalar of CLE-TIR's fusion: ``l = sigmoid(p)``."""

    def __init__(self, initial: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < initial < 1.0:
            raise ValueError(f"initial fusion weight must be in (0, 1), got {initial}")
        self.p = nn.Parameter(torch.tensor(math.log(initial / (1.0 - initial))))

    @property
    def weight(self) -> torch.Tensor:
        return torch.sigmoid(self.p)

    def fuse(self, text_scores: torch.Tensor, generated_scores: torch.Tensor) -> torch.Tensor:
        lam = self.weight
        return (1 - lam) * text_scores + lam * generated_scores


class AggregatorModule(nn.Module):
    """The trainable whole: an aggregator (attention or mean) and the fusion weight."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        mode = config.get("mode", "attention")
        if mode not in MODES:
            raise ModelLoadError(f"unknown aggregator mode {mode!r}: use one of {MODES}")
        self.mode = mode
        self.attention = (
            AttentionAggregator(
                int(config["dim"]), int(config.get("layers", 2)), config.get("mlp_ratio", 2.0)
            )
            if mode == "attention"
            else None
        )
        self.fusion = FusionWeight(float(config.get("initial_fusion_weight", 0.5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_aggregate(x) if self.attention is None else self.attention(x)


class Aggregator:
    """A loaded aggregator: (B, K, D) generated embeddings -> (B, D) queries, plus ``l``."""

    def __init__(
        self, module: AggregatorModule, config: dict[str, Any], model_version: str
    ) -> None:
        self.module = module.eval()
        self.config = config
        self.model_version = model_version

    @property
    def mode(self) -> str:
        return self.module.mode

    @property
    def fusion_weight(self) -> float:
        return float(self.module.fusion.weight.detach())

    @torch.inference_mode()
    def aggregate(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 3 or x.shape[1] == 0:
            raise ValueError(f"expected (B, K, D) embeddings with K >= 1, got shape {x.shape}")
        dim = self.config.get("dim")
        if self.mode == "attention" and x.shape[2] != dim:
            raise ValueError(f"aggregator expects dimension {dim}, got {x.shape[2]}")
        if len(x) == 0:
            return np.zeros((0, x.shape[2]), dtype=np.float32)
        return self.module(torch.from_numpy(x)).numpy().astype(np.float32, copy=False)

    def fuse(self, text_scores: np.ndarray, generated_scores: np.ndarray) -> np.ndarray:
        lam = self.fusion_weight
        return ((1 - lam) * text_scores + lam * generated_scores).astype(np.float32)

    def save(self, path: str | Path, manifest: dict[str, Any]) -> str:
        """Weights first, then config, manifest last; returns the new ``model_version``."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        tmp = root / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(root / WEIGHTS_FILE)
        (root / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
        version = f"{root.name}-{file_digest(root / WEIGHTS_FILE)}"
        full = {**manifest, "model_version": version, "fusion_weight": self.fusion_weight}
        (root / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        self.model_version = version
        return version


def new_aggregator(
    mode: str = "attention",
    dim: int | None = None,
    layers: int = 2,
    mlp_ratio: float = 2.0,
    initial_fusion_weight: float = 0.5,
) -> Aggregator:
    """A fresh aggregator (the attention one equals mean pooling until trained)."""
    if mode == "attention" and not dim:
        raise ValueError("an attention aggregator needs its embedding dimension")
    config: dict[str, Any] = {
        "family": FAMILY,
        "mode": mode,
        "dim": dim,
        "layers": layers,
        "mlp_ratio": mlp_ratio,
        "initial_fusion_weight": initial_fusion_weight,
    }
    return Aggregator(AggregatorModule(config), config, f"{mode}-untrained")


def load_aggregator(spec: str, seed: int = 0) -> Aggregator:
    """locate -> load: an :class:`Aggregator` from ``local-dir:/ckpt`` or ``config:NAME``."""
    parsed = ModelSpec.parse(spec)
    if parsed.scheme == "config":
        config = get_model_config(parsed.target)
        if config.get("family") != FAMILY:
            raise ModelLoadError(f"model config {parsed.target!r} is not an aggregator")
        torch.manual_seed(seed)
        return Aggregator(AggregatorModule(config), config, f"{parsed.target}-random{seed}")
    ckpt = locate_checkpoint(parsed.target)
    if ckpt.config.get("family") != FAMILY:
        raise ModelLoadError(
            f"checkpoint {ckpt.path} is a {ckpt.config.get('family')!r} model, not an aggregator"
        )
    try:
        module = AggregatorModule(ckpt.config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"checkpoint {ckpt.path} has a bad config: {exc}") from exc
    try:
        state = load_file(str(ckpt.weights))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ModelLoadError(f"checkpoint {ckpt.weights} is corrupt: {exc}") from exc
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint {ckpt.path} does not match its config: {exc}") from exc
    return Aggregator(module, ckpt.config, ckpt.model_version)


# -- training ----------------------------------------------------------------------------------
def retrieval_map(
    scores: np.ndarray, query_groups: Sequence[int], gallery_groups: Sequence[int]
) -> float:
    """Mean over queries of AP over the whole gallery (relevant = same group)."""
    from imagine.metrics import average_precision

    gal = np.asarray(gallery_groups)
    aps = []
    for qi, group in enumerate(query_groups):
        order = np.argsort(-scores[qi], kind="stable")
        aps.append(average_precision(gal[order] == group, int((gal == group).sum())))
    return float(np.mean(aps)) if aps else 0.0


def fused_retrieval_loss(
    fused: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """Multi-positive InfoNCE of fused scores (Q, N) over the gallery; rows need a positive.

    ``scale`` is the inverse temperature.
    """
    target = positives / positives.sum(dim=1, keepdim=True)
    return -(target * F.log_softmax(fused * scale, dim=1)).sum(dim=1).mean()


def _check_inputs(
    generated: np.ndarray,
    query_groups: Sequence[int],
    gallery: np.ndarray,
    gallery_groups: Sequence[int],
    text_scores: np.ndarray,
) -> None:
    if generated.ndim != 3 or gallery.ndim != 2 or text_scores.ndim != 2:
        raise ValueError(
            "expected generated (Q, K, D), gallery (N, D) and text_scores (Q, N); got "
            f"{generated.shape}, {gallery.shape}, {text_scores.shape}"
        )
    q, _, d = generated.shape
    n = len(gallery)
    if gallery.shape[1] != d:
        raise ValueError(f"generated vectors have dimension {d}, gallery {gallery.shape[1]}")
    if len(query_groups) != q or len(gallery_groups) != n or text_scores.shape != (q, n):
        raise ValueError(
            f"{q} queries and {n} gallery items need {q} query groups (got {len(query_groups)}), "
            f"{n} gallery groups (got {len(gallery_groups)}) and text_scores of shape ({q}, {n}) "
            f"(got {text_scores.shape})"
        )


def train_aggregator(
    generated: np.ndarray,
    query_groups: Sequence[int],
    gallery: np.ndarray,
    gallery_groups: Sequence[int],
    text_scores: np.ndarray,
    *,
    mode: str = "attention",
    epochs: int = 100,
    lr: float = 3e-3,
    fusion_lr: float | None = None,
    batch_size: int = 64,
    temperature: float = 0.05,
    weight_decay: float = 1e-4,
    layers: int = 2,
    mlp_ratio: float = 2.0,
    initial_fusion_weight: float = 0.5,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Aggregator, dict[str, Any]]:
    """Train the aggregator and the fusion weight jointly against real gallery images.

    ``generated`` (Q, K, D): the vision encoder's vectors of K generated images per query;
    ``gallery`` (N, D): the gallery's vision vectors; ``text_scores`` (Q, N): the dual encoder's
    fixed text -> image similarities. Loss: multi-positive InfoNCE of the fused score over the
    gallery, positives = gallery items of the query's group. ``mode="mean"`` learns only ``l``.
    ``temperature`` is where the loss's learned temperature starts. ``fusion_lr`` (default
    ``10 * lr``) is the learning rate of the scalars: the fusion ``p`` and the log inverse
    temperature.
    ``progress(epoch, loss)`` is called after each epoch. Returns the aggregator and metrics
    (loss, ``l`` and mAP of each path on these queries, before and after training).
    """
    gen_np = np.asarray(generated, dtype=np.float32)
    gal_np = np.asarray(gallery, dtype=np.float32)
    txt_np = np.asarray(text_scores, dtype=np.float32)
    _check_inputs(gen_np, query_groups, gal_np, gallery_groups, txt_np)
    torch.manual_seed(seed)
    agg = new_aggregator(mode, gen_np.shape[2], layers, mlp_ratio, initial_fusion_weight)
    module = agg.module
    gen = F.normalize(torch.from_numpy(gen_np), dim=-1)
    gal = F.normalize(torch.from_numpy(gal_np), dim=-1)
    txt = torch.from_numpy(txt_np)
    qg = torch.as_tensor(list(query_groups))
    gg = torch.as_tensor(list(gallery_groups))
    positives = (qg[:, None] == gg[None, :]).float()
    usable = torch.nonzero(positives.sum(dim=1) > 0).flatten()
    if len(usable) == 0:
        raise ValueError("no query has a gallery item of its group: nothing to learn from")

    # The loss's inverse temperature is learned too (as CLIP's logit scale): with it fixed, moving
    # l also rescales the fused scores, which the loss would trade against the mix itself.
    log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def scale() -> torch.Tensor:
        return log_scale.exp().clamp(max=100.0)

    def evaluate() -> tuple[float, dict[str, float]]:
        module.eval()
        with torch.no_grad():
            queries = module(gen)
            gen_scores = queries @ gal.T
            fused = module.fusion.fuse(txt, gen_scores)
            loss = float(fused_retrieval_loss(fused[usable], positives[usable], scale()))
            mean_scores = mean_aggregate(gen) @ gal.T
        qgl = list(query_groups)
        maps = {
            "mAP_text": retrieval_map(txt_np, qgl, gallery_groups),
            "mAP_generated_mean": retrieval_map(mean_scores.numpy(), qgl, gallery_groups),
            "mAP_generated": retrieval_map(gen_scores.numpy(), qgl, gallery_groups),
            "mAP_fused": retrieval_map(fused.numpy(), qgl, gallery_groups),
        }
        return loss, maps

    loss_before, before = evaluate()
    # The fusion scalar is not decayed (that would pull l toward 0.5) and, being one number fed
    # by every query, can move faster than the attention weights.
    groups: list[dict[str, Any]] = [
        {"params": [module.fusion.p, log_scale], "weight_decay": 0.0, "lr": fusion_lr or 10 * lr}
    ]
    decayed = [p for name, p in module.named_parameters() if name != "fusion.p"]
    if decayed:
        groups.append({"params": decayed})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    order_gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        module.train()
        perm = usable[torch.randperm(len(usable), generator=order_gen)]
        total, batches = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            fused = module.fusion.fuse(txt[idx], module(gen[idx]) @ gal.T)
            loss = fused_retrieval_loss(fused, positives[idx], scale())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
        if progress is not None:
            progress(epoch + 1, total / max(1, batches))
    module.eval()
    loss_after, after = evaluate()
    agg.model_version = f"{mode}-trained"
    metrics: dict[str, Any] = {
        "mode": mode,
        "queries": int(gen.shape[0]),
        "k": int(gen.shape[1]),
        "gallery": int(gal.shape[0]),
        "epochs": epochs,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "fusion_weight_before": initial_fusion_weight,
        "fusion_weight": agg.fusion_weight,
        "temperature": float(1.0 / scale().detach()),
        "before": before,
        "after": after,
    }
    return agg, metrics
