"""The caption decoder: images -> words (GXN's image-to-text path).

An image tower (an open_clip ``VisionTransformer`` of the dual encoder's shape, initialised from
the trained dual encoder's image tower by the trainer) yields its patch tokens; a small
transformer decoder attends to them and predicts a caption word by word over a word-level
vocabulary built from the training captions (saved in the checkpoint's ``config.json``).

Decoding is chosen per request: ``greedy``, ``beam`` (``beam_size``) or ``sample``
(``temperature``, ``seed``). Every caption comes with its log-probability under the model (the
sum of its words' and the end token's log-probabilities).

Specs: ``local-dir:/ckpt`` (trained by ``trainer/caption_stage.py``) or ``config:NAME`` (random
init, tests).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from imagine.decoding import check_decoding
from imagine.models.registry import (
    ModelLoadError,
    ModelSpec,
    get_model_config,
    locate_checkpoint,
    select_device,
    write_checkpoint,
)

FAMILY = "captioner"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_WORD = re.compile(r"[a-z0-9]+(?:[-'/][a-z0-9]+)*")


def words(text: str) -> list[str]:
    """The words of a caption: lower case, punctuation dropped, hyphenated words kept."""
    return _WORD.findall(text.lower())


def build_vocab(captions: Sequence[str], min_count: int = 1) -> list[str]:
    """Specials first, then every word seen at least ``min_count`` times (sorted)."""
    counts: dict[str, int] = {}
    for c in captions:
        for w in words(c):
            counts[w] = counts.get(w, 0) + 1
    return [*SPECIALS, *sorted(w for w, n in counts.items() if n >= min_count)]


class CaptionNet(torch.nn.Module):
    """Image tower (patch tokens) + transformer decoder over a word vocabulary."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        vc = config["vision_cfg"]
        self.visual = VisionTransformer(
            image_size=vc["image_size"],
            patch_size=vc["patch_size"],
            width=vc["width"],
            layers=vc["layers"],
            heads=vc["width"] // vc.get("head_width", 64),
            mlp_ratio=vc.get("mlp_ratio", 4.0),
            output_dim=config["embed_dim"],
            output_tokens=True,
        )
        d = int(config["d_model"])
        vocab = len(config["vocab"])
        self.max_len = int(config["max_len"])
        self.memory_proj = torch.nn.Linear(vc["width"], d)
        self.pooled_proj = torch.nn.Linear(config["embed_dim"], d)
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(self.max_len + 1, d))
        torch.nn.init.normal_(self.pos, std=0.02)
        layer = torch.nn.TransformerDecoderLayer(
            d,
            int(config["heads"]),
            dim_feedforward=int(config.get("ff_mult", 4)) * d,
            dropout=float(config.get("dropout", 0.1)),
            batch_first=True,
            norm_first=True,
        )
        self.decoder = torch.nn.TransformerDecoder(layer, int(config["layers"]))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def memory(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, 1 + patches, d): the pooled token and the patch tokens."""
        pooled, tokens = self.visual(pixels)
        return self.memory_from(pooled, tokens)

    def memory_from(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's memory from the image tower's outputs (precomputed when it is frozen)."""
        return torch.cat([self.pooled_proj(pooled)[:, None], self.memory_proj(tokens)], dim=1)

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-word logits (N, T, V) for input tokens (N, T) starting with BOS."""
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:t]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        return self.head(self.norm(self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True)))


@dataclass
class Caption:
    text: str
    log_prob: float


class Captioner:
    """A loaded caption decoder: images in, captions with their log-probability out."""

    def __init__(
        self,
        model: CaptionNet,
        config: dict[str, Any],
        model_version: str,
        device: str | None = None,
    ) -> None:
        self.config = config
        self.model_version = model_version
        self.device = device or select_device()
        self.model = model.to(self.device).eval()
        self.vocab: list[str] = list(config["vocab"])
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.image_size = int(config["vision_cfg"]["image_size"])
        self.max_len = int(config["max_len"])
        self._mean = torch.tensor(config.get("image_mean", [0.5] * 3)).view(1, 3, 1, 1)
        self._std = torch.tensor(config.get("image_std", [0.5] * 3)).view(1, 3, 1, 1)

    # -- text <-> ids -----------------------------------------------------------------------------
    def encode_caption(self, text: str) -> list[int]:
        """BOS, word ids (unknown words as UNK), EOS; cut to ``max_len`` words."""
        unk = self.index[UNK]
        ids = [self.index.get(w, unk) for w in words(text)][: self.max_len - 1]
        return [self.index[BOS], *ids, self.index[EOS]]

    def decode_ids(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            w = self.vocab[int(i)]
            if w == EOS:
                break
            if w not in SPECIALS:
                out.append(w)
        return " ".join(out)

    def image_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        arrays = [
            np.asarray(img.convert("RGB").resize(size, Image.Resampling.BILINEAR)) for img in images
        ]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return (batch - self._mean) / self._std

    # -- predict ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def caption(
        self,
        images: Sequence[Image.Image],
        strategy: str = "greedy",
        beam_size: int = 4,
        temperature: float = 1.0,
        seed: int = 0,
        max_len: int | None = None,
    ) -> list[Caption]:
        check_decoding(strategy, beam_size, temperature)
        if not images:
            return []
        n = min(max_len or self.max_len, self.max_len)
        memory = self.model.memory(self.image_tensor(images).to(self.device))
        if strategy == "beam":
            return [self._beam(memory[i : i + 1], beam_size, n) for i in range(len(images))]
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        ids, logp = self.decode(memory, n, sample=strategy == "sample", temperature=temperature,
                                generator=gen)  # fmt: skip
        return [
            Caption(self.decode_ids(row), float(lp))
            for row, lp in zip(ids.tolist(), logp.tolist(), strict=True)
        ]

    def _never(self, logits: torch.Tensor) -> torch.Tensor:
        """Words a caption never holds (padding, a second start, unknown) get no probability."""
        logits = logits.clone()
        logits[..., [self.index[PAD], self.index[BOS], self.index[UNK]]] = -torch.inf
        return logits

    def decode(
        self,
        memory: torch.Tensor,
        max_len: int,
        sample: bool,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy or sampled decoding of a batch: word ids (N, T) after BOS and each sequence's
        log-probability (N,), summed up to and including its EOS. Differentiable in ``memory``'s
        graph when called outside inference mode (the self-critical stage uses it)."""
        n = memory.shape[0]
        bos, eos = self.index[BOS], self.index[EOS]
        tokens = torch.full((n, 1), bos, dtype=torch.long, device=memory.device)
        done = torch.zeros(n, dtype=torch.bool, device=memory.device)
        total = torch.zeros(n, device=memory.device)
        for _ in range(max_len):
            logits = self._never(self.model.logits(memory, tokens)[:, -1])
            logp = F.log_softmax(logits.float(), dim=-1)
            if sample:
                probs = F.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(memory.device)[:, 0]
            else:
                nxt = logp.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            step = logp.gather(1, nxt[:, None])[:, 0]
            total = total + torch.where(done, torch.zeros_like(step), step)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = done | (nxt == eos)
            if bool(done.all()):
                break
        return tokens[:, 1:], total

    def _beam(self, memory: torch.Tensor, beam_size: int, max_len: int) -> Caption:
        """Beam search for one image; finished hypotheses compete by length-normalised
        log-probability, and the caption's log-probability is reported unnormalised."""
        bos, eos = self.index[BOS], self.index[EOS]
        beams: list[tuple[list[int], float]] = [([bos], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_len):
            tokens = torch.tensor([b[0] for b in beams], device=memory.device)
            logits = self._never(
                self.model.logits(memory.expand(len(beams), -1, -1), tokens)[:, -1]
            )
            logp = F.log_softmax(logits.float(), dim=-1)
            scores = torch.tensor([b[1] for b in beams], device=memory.device)[:, None] + logp
            top = torch.topk(scores.flatten(), min(beam_size, scores.numel()))
            vocab = logp.shape[1]
            nxt: list[tuple[list[int], float]] = []
            for s, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                b, w = divmod(flat, vocab)
                seq = [*beams[b][0], w]
                (finished if w == eos else nxt).append((seq, s))
            beams = nxt
            if not beams or len(finished) >= beam_size:
                break
        finished.extend(beams)  # unfinished at max_len: kept as they are
        best = max(finished, key=lambda b: b[1] / max(len(b[0]) - 1, 1))
        return Caption(self.decode_ids(best[0][1:]), float(best[1]))

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, path: str | Path, manifest: dict[str, Any]) -> str:
        return save_captioner(self.model, self.config, path, manifest)


def save_captioner(
    model: torch.nn.Module, config: dict[str, Any], path: str | Path, manifest: dict[str, Any]
) -> str:
    """Weights first (atomically replaced), then config (with the vocabulary), manifest last."""
    return write_checkpoint(model.state_dict(), config, path, manifest)


def captioner_config(name: str, vocab: Sequence[str] | None = None) -> dict[str, Any]:
    """A registered captioner architecture; ``vocab`` replaces its vocabulary (the trainer's
    words of the training captions). A config without one gets the Fashion-MNIST words."""
    config = get_model_config(name)
    if config.get("family") != FAMILY:
        raise ModelLoadError(f"model config {name!r} is not a caption decoder")
    if vocab is not None:
        config["vocab"] = list(vocab)
    elif "vocab" not in config:
        from imagine.data import CLASS_SYNONYMS

        phrases = [" ".join(s) for s in CLASS_SYNONYMS]
        extra = "a dark grey light narrow medium-width wide with visible pattern in plain colour"
        config["vocab"] = build_vocab([*phrases, extra])
    return config


def load_captioner(spec: str, device: str | None = None, seed: int = 0) -> Captioner:
    """locate -> load: a :class:`Captioner` from ``local-dir:`` or ``config:``."""
    parsed = ModelSpec.parse(spec)
    if parsed.scheme == "config":
        config = captioner_config(parsed.target)
        torch.manual_seed(seed)
        return Captioner(CaptionNet(config), config, f"{parsed.target}-random{seed}", device)
    ckpt = locate_checkpoint(parsed.target)
    if ckpt.config.get("family") != FAMILY:
        raise ModelLoadError(
            f"checkpoint {ckpt.path} is a {ckpt.config.get('family')!r} model, "
            "not a caption decoder"
        )
    try:
        model = CaptionNet(ckpt.config)
    except KeyError as exc:
        raise ModelLoadError(f"checkpoint {ckpt.path} has an incomplete config: {exc}") from exc
    try:
        state = load_file(str(ckpt.weights))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ModelLoadError(f"checkpoint {ckpt.weights} is corrupt: {exc}") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint {ckpt.path} does not fit its config: {exc}") from exc
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {ckpt.path} does not match its config: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return Captioner(model, ckpt.config, ckpt.model_version, device)
