"""The vision-only encoder: the ``visual`` vector of every gallery image (CLE-TIR's second path).

Separate from the dual encoder's joint-space image tower, it is trained on images alone, so its
space groups images by what they look like. Generated query images are embedded with it too.

Two backbones, one :class:`VisionEncoder`:

- ``open_clip`` (the embedded default): an open_clip ``VisionTransformer`` sized for CPU, built
  from a JSON config (``configs/fmnist-vision.json``) and trained by ``trainer/vision_stage.py``;
- ``timm`` (the pretrained profile): any timm model, e.g. a DINOv2 ViT, built with
  ``pretrained=False`` and filled from a local safetensors file, so nothing is downloaded.

Specs: ``local-dir:/ckpt`` (our checkpoint, either backbone), ``config:NAME`` (random init) and
``timm:MODEL_NAME@/dir`` or ``timm:/dir`` where ``/dir`` holds ``model.safetensors`` and,
optionally, timm's own ``config.json`` (as ``timm.models.push_to_hf_hub``/``save_for_hf`` write
it: ``architecture``, ``model_args``, ``pretrained_cfg``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from imagine.models.registry import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelLoadError,
    ModelSpec,
    file_digest,
    get_model_config,
    locate_checkpoint,
    select_device,
    write_checkpoint,
)

FAMILY = "vision"
TIMM_SCHEME = "timm:"
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def build_vision_model(config: dict[str, Any]) -> torch.nn.Module:
    """The backbone named by a vision config: pixels (N, 3, S, S) -> features (N, embed_dim)."""
    backbone = config.get("backbone", "open_clip")
    if backbone == "open_clip":
        from open_clip.transformer import VisionTransformer

        vc = config["vision_cfg"]
        return VisionTransformer(
            image_size=vc["image_size"],
            patch_size=vc["patch_size"],
            width=vc["width"],
            layers=vc["layers"],
            heads=vc["width"] // vc.get("head_width", 64),
            mlp_ratio=vc.get("mlp_ratio", 4.0),
            output_dim=config["embed_dim"],
        )
    if backbone == "timm":
        import timm

        args = {**config.get("timm_args", {}), "num_classes": 0}
        try:
            return timm.create_model(config["timm_model"], pretrained=False, **args)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"timm cannot build {config['timm_model']!r}: {exc}") from exc
    raise ModelLoadError(f"unknown vision backbone {backbone!r}: use 'open_clip' or 'timm'")


def image_size_of(config: dict[str, Any]) -> int:
    if "vision_cfg" in config:
        return int(config["vision_cfg"]["image_size"])
    return int(config["image_size"])


class VisionEncoder:
    """A loaded vision-only encoder: images in, L2-normalised float32 vectors out."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: dict[str, Any],
        model_version: str,
        device: str | None = None,
    ) -> None:
        self.config = config
        self.model_version = model_version
        self.device = device or select_device()
        self.model = model.to(self.device).eval()
        self.image_size = image_size_of(config)
        self._resample = _RESAMPLE[config.get("interpolation", "bilinear")]
        self._mean = torch.tensor(config.get("image_mean", [0.5] * 3)).view(1, 3, 1, 1)
        self._std = torch.tensor(config.get("image_std", [0.5] * 3)).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return int(self.config["embed_dim"])

    # -- preprocessing ------------------------------------------------------------------------
    def image_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB, resized to the model's size, scaled to [0, 1], normalised: (N, 3, S, S)."""
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(img.convert("RGB").resize(size, self._resample)) for img in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return self.normalise_pixels(batch)

    def normalise_pixels(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [0, 1] -> the model's input."""
        return (batch - self._mean.to(batch.device)) / self._std.to(batch.device)

    # -- predict ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self.image_tensor(images[i : i + batch_size]).to(self.device)
            out.append(F.normalize(self.model(pixels).float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path: str | Path, manifest: dict[str, Any]) -> str:
        """Write weights, config and manifest; returns the new ``model_version``."""
        return save_vision_checkpoint(self.model, self.config, path, manifest)


def save_vision_checkpoint(
    model: torch.nn.Module, config: dict[str, Any], path: str | Path, manifest: dict[str, Any]
) -> str:
    """Weights first (atomically replaced), then config, manifest last (it names the version)."""
    return write_checkpoint(model.state_dict(), config, path, manifest)


def _load_weights(model: torch.nn.Module, weights: Path, ignore_prefix: str = "\0") -> None:
    if not weights.is_file():
        raise ModelLoadError(f"{weights.parent} has no {weights.name} (safetensors weights)")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ModelLoadError(f"weights {weights} are corrupt: {exc}") from exc
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefix)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"weights {weights} do not fit the model: {exc}") from exc
    if missing or unexpected:
        raise ModelLoadError(
            f"weights {weights} do not match the model: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )


def _timm_config(
    name: str, model: torch.nn.Module, args: dict[str, Any], data: dict[str, Any]
) -> dict[str, Any]:
    """Our vision config for a timm model (its preprocessing from timm's data config)."""
    from timm.data import resolve_input_data_config

    resolved = resolve_input_data_config(model)
    data = {**resolved, **{k: v for k, v in data.items() if v is not None}}
    interpolation = str(data.get("interpolation", "bicubic"))
    return {
        "family": FAMILY,
        "backbone": "timm",
        "timm_model": name,
        "timm_args": {k: v for k, v in args.items() if k != "num_classes"},
        "embed_dim": int(getattr(model, "num_features", 0)),
        "image_size": int(data["input_size"][-1]),
        "interpolation": interpolation if interpolation in _RESAMPLE else "bicubic",
        "image_mean": [float(x) for x in data["mean"]],
        "image_std": [float(x) for x in data["std"]],
    }


def load_timm_dir(
    directory: str | Path, name: str | None = None, device: str | None = None
) -> VisionEncoder:
    """A timm model (``pretrained=False``) filled from ``directory/model.safetensors``.

    ``directory/config.json`` in timm's hub format is optional; it supplies the architecture
    (when ``name`` is not given), the constructor arguments and the preprocessing.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"timm weights directory {root} does not exist")
    hub: dict[str, Any] = {}
    if (root / CONFIG_FILE).is_file():
        try:
            hub = json.loads((root / CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{root / CONFIG_FILE} is corrupt: {exc}") from exc
    name = name or hub.get("architecture")
    if not name:
        raise ModelLoadError(f"{root} names no timm architecture: use 'timm:MODEL_NAME@{root}'")
    args = dict(hub.get("model_args", {}))
    config = {"family": FAMILY, "backbone": "timm", "timm_model": name, "timm_args": args}
    model = build_vision_model(config)
    _load_weights(model, root / WEIGHTS_FILE, ignore_prefix="head.")
    pre = hub.get("pretrained_cfg", {})
    data = {k: pre.get(k) for k in ("input_size", "mean", "std", "interpolation")}
    config = _timm_config(name, model, args, data)
    version = f"{root.name}-{file_digest(root / WEIGHTS_FILE)}"
    return VisionEncoder(model, config, version, device)


def load_vision_encoder(spec: str, device: str | None = None, seed: int = 0) -> VisionEncoder:
    """locate -> load: a :class:`VisionEncoder` from ``local-dir:``, ``config:`` or ``timm:``."""
    if spec.startswith(TIMM_SCHEME):
        target = spec.removeprefix(TIMM_SCHEME)
        name, sep, directory = target.rpartition("@")
        if not target or (sep and not (name and directory)):
            raise ModelLoadError(f"bad timm spec {spec!r}: expected 'timm:MODEL_NAME@/dir'")
        return load_timm_dir(directory, name or None, device)
    try:
        parsed = ModelSpec.parse(spec)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc}, or 'timm:MODEL_NAME@/dir'") from None
    if parsed.scheme == "config":
        config = get_model_config(parsed.target)
        if config.get("family") != FAMILY:
            raise ModelLoadError(f"model config {parsed.target!r} is not a vision encoder")
        torch.manual_seed(seed)
        model = build_vision_model(config)
        return VisionEncoder(model, config, f"{parsed.target}-random{seed}", device)
    ckpt = locate_checkpoint(parsed.target)
    if "family" not in ckpt.config and "architecture" in ckpt.config:
        return load_timm_dir(ckpt.path, None, device)  # a directory in timm's own hub format
    if ckpt.config.get("family") != FAMILY:
        raise ModelLoadError(
            f"checkpoint {ckpt.path} is a {ckpt.config.get('family')!r} model, not a vision encoder"
        )
    try:
        model = build_vision_model(ckpt.config)
    except KeyError as exc:
        raise ModelLoadError(f"checkpoint {ckpt.path} has an incomplete config: {exc}") from exc
    _load_weights(model, ckpt.weights)
    return VisionEncoder(model, ckpt.config, ckpt.model_version, device)
