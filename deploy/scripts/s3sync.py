"""Copy checkpoints and galleries between a folder and MinIO, through Imagine's object-store port.

Used inside the cluster images (the script is copied to ``/app/deploy/scripts``):

- ``copy SRC DST [--create-bucket]``: every object under SRC to DST; each of them is a folder or
  ``s3://bucket/prefix``. The RayJob uses it to upload a trained checkpoint; an operator uses it
  to upload a gallery.
- ``fetch-model --from s3://imagine-checkpoints --models-dir /models``: the init container of the
  Ray pods. For each model spec the services load (``IMAGINE_MODEL``, ``IMAGINE_VISION_MODEL``,
  ``IMAGINE_GENERATOR_MODEL``, ``IMAGINE_AGGREGATOR_MODEL``, ``IMAGINE_CAPTION_MODEL``) that is
  ``local-dir:/models/NAME`` and whose folder holds no checkpoint yet, copy ``<from>/NAME``
  there. A model baked into the image (any other path) or switched off (empty) needs nothing.

S3 credentials come from the same settings the services read (``IMAGINE_STORAGE__*``).
Objects are read whole into memory: fine for the checkpoints and images used today.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imagine.config import StorageSettings, load_service_settings
from imagine.storage import ObjectNotFound, minio_client, open_store, parse_source

CHECKPOINT_FILE = "config.json"


def _ensure_target(dst: str, storage: StorageSettings, create_bucket: bool) -> None:
    scheme, where, _ = parse_source(dst)
    if scheme == "file":
        Path(where).mkdir(parents=True, exist_ok=True)
    elif create_bucket:
        client = minio_client(storage)
        if not client.bucket_exists(where):
            client.make_bucket(where)


def copy_tree(src: str, dst: str, storage: StorageSettings, create_bucket: bool = False) -> int:
    """Copy every object under ``src`` to the same key under ``dst``; returns the count."""
    source = open_store(src, storage)
    _ensure_target(dst, storage, create_bucket)
    target = open_store(dst, storage)
    count = 0
    for obj in source.list():
        target.put(obj.key, source.read(obj.key), obj.content_type)
        count += 1
    if count == 0:
        raise ObjectNotFound(f"nothing to copy under {src}")
    return count


def model_to_fetch(model_spec: str, models_dir: Path) -> Path | None:
    """The folder to fill for ``local-dir:<models_dir>/NAME`` specs; None for anything else."""
    scheme, _, target = model_spec.partition(":")
    if scheme != "local-dir":
        return None
    path = Path(target)
    try:
        relative = path.relative_to(models_dir)
    except ValueError:
        return None  # baked into the image, or mounted by other means
    if len(relative.parts) != 1:
        raise ValueError(f"{model_spec!r}: expected local-dir:{models_dir}/NAME")
    return path


def fetch_model(model_spec: str, models_dir: Path, source: str, storage: StorageSettings) -> str:
    path = model_to_fetch(model_spec, models_dir)
    if path is None:
        return f"{model_spec}: not under {models_dir}; nothing to fetch"
    if (path / CHECKPOINT_FILE).is_file():
        return f"{path} already holds a checkpoint"
    src = f"{source.rstrip('/')}/{path.name}"
    n = copy_tree(src, str(path), storage)
    return f"fetched {n} files from {src} to {path}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s3sync", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cp = sub.add_parser("copy", help="copy every object from SRC to DST (folders or s3://)")
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.add_argument("--create-bucket", action="store_true", help="create DST's bucket if missing")
    fm = sub.add_parser("fetch-model", help="fill local-dir:/models/NAME from the checkpoint store")
    fm.add_argument("--from", dest="source", required=True, help="e.g. s3://imagine-checkpoints")
    fm.add_argument("--models-dir", type=Path, default=Path("/models"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_service_settings()
    if args.command == "copy":
        n = copy_tree(args.src, args.dst, settings.storage, args.create_bucket)
        print(f"copied {n} objects from {args.src} to {args.dst}")
    else:
        specs = [
            settings.model,
            settings.vision_model,
            settings.generator_model,
            settings.aggregator_model,
            settings.caption_model,
        ]
        for spec in filter(None, specs):
            print(fetch_model(spec, args.models_dir, args.source, settings.storage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
