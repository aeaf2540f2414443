"""Model specs, configs, devices and checkpoints: how every model is located and loaded.

A model is named by a spec string with a scheme, as open_clip names its models:

- ``local-dir:/path/to/checkpoint``: a checkpoint written by our trainer (``config.json``,
  ``model.safetensors``, ``manifest.json``);
- ``config:NAME``: a fresh, randomly initialised model from a registered JSON architecture
  config (``imagine/models/configs/NAME.json`` or one added with :func:`add_model_config`).

The pretrained profile names models in external formats instead of our trained defaults; they
are read from local files only (nothing is downloaded at run time):

- ``open_clip:ARCH@/path/weights.safetensors`` (or ``.bin``, ``.pt``, ``.pth``), a dual encoder
  (``IMAGINE_MODEL``): the open_clip architecture ``ARCH`` (e.g. ``ViT-B-32``) filled from a
  local file, with open_clip's own tokenizer and image transforms. ``open_clip:ARCH`` alone is a
  random init (tests). Architectures whose tokenizer or text tower is a Hugging Face model need
  it as a local directory;
- ``timm:MODEL_NAME@/dir`` or ``timm:/dir``, a vision-only encoder (``IMAGINE_VISION_MODEL``):
  ``/dir`` holds ``model.safetensors`` and optionally timm's ``config.json`` (see ``vision.py``);
- ``diffusers:/path/to/pipeline``, a generator (``IMAGINE_GENERATOR_MODEL``): a Stable-Diffusion
  format pipeline directory (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``) as ``save_pretrained`` writes it, e.g. sd-turbo.

Every loaded model carries a ``model_version`` (for external weights: the name and a digest of
the weights); a collection records the version that filled it, so vectors from two models never
mix.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_EXTRA_CONFIGS: dict[str, dict[str, Any]] = {}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class ModelLoadError(RuntimeError):
    """A model spec that cannot be located or loaded (missing or corrupt files)."""


def select_device(prefer_gpu: bool = True) -> str:
    """The one place that picks a device: CUDA when present and wanted, else CPU (fp32)."""
    import torch

    if prefer_gpu and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def add_model_config(name: str, config: dict[str, Any]) -> None:
    """Register an architecture config in memory (tests register tiny ones)."""
    _EXTRA_CONFIGS[name] = dict(config)


def list_model_configs() -> list[str]:
    return sorted({p.stem for p in CONFIG_DIR.glob("*.json")} | set(_EXTRA_CONFIGS))


def get_model_config(name: str) -> dict[str, Any]:
    if name in _EXTRA_CONFIGS:
        return dict(_EXTRA_CONFIGS[name])
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(list_model_configs())
        raise ModelLoadError(f"unknown model config {name!r}; known: {known}")
    return json.loads(path.read_text())


SPEC_FORMS = {
    "local-dir": "local-dir:/path",
    "config": "config:NAME",
    "open_clip": "open_clip:ARCH@/path/weights.safetensors",
    "timm": "timm:MODEL_NAME@/dir",
    "diffusers": "diffusers:/path/to/pipeline",
}
DEFAULT_SCHEMES = ("local-dir", "config")


@dataclass
class ModelSpec:
    scheme: str
    target: str

    @classmethod
    def parse(cls, spec: str, schemes: Sequence[str] = DEFAULT_SCHEMES) -> ModelSpec:
        """``scheme:target``; ``schemes`` are the ones the calling loader accepts."""
        scheme, sep, target = spec.partition(":")
        if not sep or not target or scheme not in schemes:
            expected = " or ".join(repr(SPEC_FORMS.get(s, f"{s}:...")) for s in schemes)
            raise ModelLoadError(f"bad model spec {spec!r}: expected {expected}")
        return cls(scheme, target)


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, located and checked before any weight is read."""

    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def model_version(self) -> str:
        return str(self.manifest.get("model_version") or self.path.name)


def locate_checkpoint(path: str | Path) -> Checkpoint:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(
            f"checkpoint directory {root} does not exist; train one with `imagine train`"
        )
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (root / n).is_file()]
    if missing:
        raise ModelLoadError(f"checkpoint {root} is missing {', '.join(missing)}")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
        manifest_path = root / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"checkpoint {root} has a corrupt JSON file: {exc}") from exc
    return Checkpoint(root, config, manifest)


def resolve_hf_path(name: str) -> str:
    """Resolve the text-tower locations a config may name to local directories."""
    if name.startswith("package:"):
        import importlib

        module = importlib.import_module(name.removeprefix("package:"))
        model_dir = Path(module.__file__ or "").parent / "model"
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"package {name} has no model directory at {model_dir}")
        return str(model_dir)
    if name == "tiny-bert":
        return _tiny_bert_dir()
    return name


def _tiny_bert_dir() -> str:
    """A 1-layer, 32-wide BERT config (randomly initialised) for tests: built in milliseconds."""
    root = Path(tempfile.gettempdir()) / "imagine-tiny-bert-v1"
    if not (root / "config.json").is_file():
        from transformers import BertConfig

        root.mkdir(parents=True, exist_ok=True)
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=30522,
            max_position_embeddings=64,
        ).save_pretrained(root)
    return str(root)


def write_checkpoint(
    state: dict[str, Any], config: dict[str, Any], path: str | Path, manifest: dict[str, Any]
) -> str:
    """A checkpoint directory: weights first (atomically replaced), then ``config.json``, the
    manifest last (it names the version: the folder name and a digest of the weights)."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(root / WEIGHTS_FILE)
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    version = f"{root.name}-{file_digest(root / WEIGHTS_FILE)}"
    full = {**manifest, "model_version": version}
    (root / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return version


def file_digest(path: Path, length: int = 12) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def version_tag(*parts: str) -> str:
    """A ``model_version`` from parts, in the characters collection names allow."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p for p in parts if p))
