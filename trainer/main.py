"""The training job: ``python -m trainer`` or ``imagine train``.

Runs a Ray Train ``TorchTrainer`` (CPU by default, ``--use-gpu`` on GPU nodes) and writes a
versioned checkpoint: ``model.safetensors``, ``config.json`` and a ``manifest.json`` with the
data fingerprint, the command, the training summary and the measured metrics. Progress shows as
a bar; state is saved every ``--checkpoint-every`` steps and a re-run with the same ``--output``
resumes from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from imagine.config import load_train_settings
from imagine.runtime import quiet_environment, use_loopback_ray


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagine train", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="dual_encoder", choices=["dual_encoder"])
    p.add_argument(
        "--dataset", default="fashion-mnist", help="'fashion-mnist' or 'folder:/path' (JSONL)"
    )
    p.add_argument("--model-config", default="fmnist-dual", help="architecture config name")
    p.add_argument("--output", type=Path, help="checkpoint dir (default DATA_DIR/checkpoints/NAME)")
    p.add_argument("--name", default="fmnist-dual")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--eval-limit", type=int, default=None, help="held-out images to evaluate on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--no-resume", action="store_true", help="start over even if state exists")
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--num-workers", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_train_settings()
    quiet_environment()
    use_loopback_ray()
    output = (args.output or settings.data_dir / "checkpoints" / args.name).expanduser().resolve()
    work = output.parent / f".{output.name}.work"
    use_gpu = settings.use_gpu if args.use_gpu is None else args.use_gpu
    num_workers = args.num_workers or settings.num_workers

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from imagine.data import DatasetError
    from trainer.datasets import validate_dataset
    from trainer.stages import dual_encoder_stage

    try:
        print(f"dataset: {validate_dataset(args.dataset)}")
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.no_resume and work.exists():
        shutil.rmtree(work)
    cfg = {
        "dataset": args.dataset,
        "model_config": args.model_config,
        "work_dir": str(work),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "limit": args.limit,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "resume": not args.no_resume,
    }
    started = time.time()
    if not ray.is_initialized():
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    trainer = TorchTrainer(
        dual_encoder_stage,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"imagine-{args.name}", storage_path=str(work / "ray")),
    )
    result = trainer.fit()
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    summary = json.loads((work / "train_summary.json").read_text())
    metrics = evaluate(work / "last", args.dataset, args.eval_limit)
    manifest = {
        "name": args.name,
        "stage": args.stage,
        "dataset": args.dataset,
        "data_fingerprint": summary["data_fingerprint"],
        "command": "imagine train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": cfg | {"work_dir": None},
        "training": summary,
        "metrics": metrics,
        "wall_seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()} {platform.system()}, gpu={use_gpu}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    from imagine.models.dual_encoder import load_dual_encoder

    encoder = load_dual_encoder(f"local-dir:{work / 'last'}", device="cpu")
    version = encoder.save(output, manifest)
    print(f"checkpoint {version} written to {output}")
    if metrics:
        print(json.dumps(metrics["summary"], indent=2))
    return 0


def evaluate(ckpt: Path, dataset: str, limit: int | None) -> dict[str, object]:
    """Category mAP / P@10 on the held-out split, in-process (empty for folder datasets)."""
    from imagine.data import FASHION_MNIST_CLASSES, class_query
    from imagine.evaluation import evaluate_category
    from imagine.models.dual_encoder import load_dual_encoder
    from trainer.datasets import eval_split

    split = eval_split(dataset, limit)
    if split is None:
        return {}
    images, labels = split
    encoder = load_dual_encoder(f"local-dir:{ckpt}", device="cpu")
    queries = {c: class_query(i) for i, c in enumerate(FASHION_MNIST_CLASSES)}
    report = evaluate_category(encoder, images, labels, queries)
    print(report.table(f"held-out category retrieval ({len(images)} images, text queries)"))
    return {
        "summary": {"mAP": round(report.map, 4), "P@10": round(report.mean_p10, 4)},
        "eval_images": len(images),
        **report.as_dict(),
    }


if __name__ == "__main__":
    sys.exit(main())
