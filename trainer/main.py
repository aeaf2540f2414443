"""The training job: ``python -m trainer`` or ``imagine train``.

Runs a Ray Train ``TorchTrainer`` (CPU by default, ``--use-gpu`` on GPU nodes) for one stage and
writes a versioned checkpoint: weights (safetensors), ``config.json`` and a ``manifest.json``
with the data fingerprint, the command, the training summary and the measured metrics. Progress
shows as a bar; state is saved every ``--checkpoint-every`` steps and a re-run with the same
``--output`` resumes from it.

Stages, in the order the default models are made (each writes checkpoints/NAME):
  dual_encoder  the joint text-image space (MiniLM text tower, ViT image tower)   fmnist-dual
  vision        the vision-only encoder (the gallery's `visual` vectors)           fmnist-vision
  generator     the text-conditioned diffusion generator                          fmnist-generator
  distill       the generator's guidance distilled into one pass (needs generator)
                                                                   fmnist-generator-distilled
  aggregator    the CLE-TIR aggregator and fusion weight (needs the three above)  fmnist-aggregator
  captioner     the caption decoder: cross-entropy, then self-critical (GXN)      fmnist-captioner
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagine.config import CHECKPOINTS, load_train_settings
from imagine.runtime import quiet_environment, use_loopback_ray


@dataclass(frozen=True)
class Stage:
    loop: str  # "module:function", the Ray Train per-worker loop
    model_config: str
    name: str
    epochs: float
    batch_size: int
    lr: float
    loader: str  # "module:function" loading the result from a local-dir: spec
    extra: dict[str, Any] = field(default_factory=dict)
    distributed: bool = True  # trains with several Ray Train workers (DDP over their shards)


STAGES = {
    "dual_encoder": Stage(
        "trainer.stages:dual_encoder_stage",
        "fmnist-dual",
        "fmnist-dual",
        5,
        256,
        1e-3,
        "imagine.models.dual_encoder:load_dual_encoder",
    ),
    "vision": Stage(
        "trainer.vision_stage:vision_stage",
        "fmnist-vision",
        "fmnist-vision",
        3,
        256,
        1e-3,
        "imagine.models.vision:load_vision_encoder",
        {"objective": "auto", "temperature": 0.1, "min_crop_scale": 0.75},
    ),
    "generator": Stage(
        "trainer.generator_stage:generator_stage",
        "fmnist-generator",
        "fmnist-generator",
        3,
        128,
        1e-3,
        "imagine.models.generator:load_generator",
    ),
    "distill": Stage(
        "trainer.generator_stage:generator_stage",
        "",
        "fmnist-generator-distilled",
        0.8,
        32,
        3e-4,
        "imagine.models.generator:load_generator",
        {
            "teacher_model": "local-dir:" + str(CHECKPOINTS / "fmnist-generator"),
            "guidance_width": 32,
            # the scales a query may ask for and the teacher serves well (README, "Numbers")
            "min_guidance": 1.0,
            "max_guidance": 3.5,
            "ema_decay": 0.995,
        },
    ),
    "aggregator": Stage(
        "trainer.aggregator_stage:aggregator_stage",
        "",
        "fmnist-aggregator",
        100,
        64,
        3e-3,
        "imagine.models.aggregator:load_aggregator",
        {
            "dual_model": "local-dir:" + str(CHECKPOINTS / "fmnist-dual"),
            "vision_model": "local-dir:" + str(CHECKPOINTS / "fmnist-vision"),
            "generator_model": "local-dir:" + str(CHECKPOINTS / "fmnist-generator"),
            "prompts_per_group": 24,
            "num_generated": 4,
            "generate_batch": 16,
            "steps": 20,
            "guidance": 2.0,
            "gallery": 4000,
            # mean pooling + learned l: the attention aggregator, trained on the 118 distinct
            # Fashion-MNIST training prompts, fused below text alone on the test gallery
            # (0.918-0.926 vs 0.929; the mean's 0.930: README, "Numbers")
            "mode": "mean",
        },
        distributed=False,
    ),
    "captioner": Stage(
        "trainer.caption_stage:caption_stage",
        "fmnist-captioner",
        "fmnist-captioner",
        1,
        128,
        1e-3,
        "imagine.models.captioner:load_captioner",
        {
            "dual_model": "local-dir:" + str(CHECKPOINTS / "fmnist-dual"),
            "visual_lr_scale": 0.0,  # frozen: its outputs are computed once
            "scst_steps": 120,
            "scst_batch_size": 64,
            "scst_lr": 5e-5,
            "caption_weight": 0.5,
            "eval_texts_seed": 1,
        },
        distributed=False,
    ),
}


def _symbol(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagine train",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage", default="dual_encoder", choices=sorted(STAGES))
    p.add_argument(
        "--dataset", default="fashion-mnist", help="'fashion-mnist' or 'folder:/path' (JSONL)"
    )
    p.add_argument("--model-config", help="architecture config name (default: the stage's)")
    p.add_argument("--output", type=Path, help="checkpoint dir (default DATA_DIR/checkpoints/NAME)")
    p.add_argument("--name", help="checkpoint name (default: the stage's)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--eval-limit", type=int, default=None, help="held-out images to evaluate on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--no-resume", action="store_true", help="start over even if state exists")
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument(
        "--address",
        help="Ray cluster to join (default: RAY_ADDRESS if set, as in a RayJob, else a local Ray "
        "of its own; 'auto': Ray's own lookup, RAY_ADDRESS else the last `ray start` here)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a stage option (JSON)"
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="only evaluate the checkpoint at --output (held-out metrics, no training)",
    )
    p.add_argument("--eval-out", type=Path, help="captioner: also write eval.json and recall.png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stage = STAGES[args.stage]
    settings = load_train_settings()
    quiet_environment()
    use_loopback_ray()
    name = args.name or stage.name
    output = (args.output or settings.data_dir / "checkpoints" / name).expanduser().resolve()
    work = output.parent / f".{output.name}.work"
    use_gpu = settings.use_gpu if args.use_gpu is None else args.use_gpu
    num_workers = args.num_workers or settings.num_workers

    from imagine.data import DatasetError
    from trainer.datasets import validate_dataset

    try:
        if num_workers > 1 and not stage.distributed:
            raise ValueError(f"stage {args.stage} trains on one worker, not {num_workers}")
        print(f"stage {args.stage}; dataset: {validate_dataset(args.dataset)}")
        extra = dict(stage.extra)
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or key not in extra:
                raise ValueError(f"unknown stage option {item!r}; known: {sorted(extra)}")
            extra[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.eval_only:
        if not (output / "config.json").is_file():
            print(f"error: no checkpoint at {output}", file=sys.stderr)
            return 2
        cfg = {"dataset": args.dataset, "seed": args.seed, "eval_out": args.eval_out, **extra}
        metrics = evaluate(args.stage, output, cfg, args.eval_limit)
        print(json.dumps(metrics.get("summary", {}), indent=2))
        return 0

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if args.no_resume and work.exists():
        shutil.rmtree(work)
    cfg = {
        "dataset": args.dataset,
        "model_config": args.model_config or stage.model_config,
        "work_dir": str(work),
        "epochs": args.epochs if args.epochs is not None else stage.epochs,
        "batch_size": args.batch_size or stage.batch_size,
        "lr": args.lr or stage.lr,
        "weight_decay": args.weight_decay,
        "limit": args.limit,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "resume": not args.no_resume,
        **extra,
    }
    started = time.time()
    if not ray.is_initialized():
        ray.init(
            # not Ray's default (None), which also joins the cluster named in the address file
            # of the last `ray start`, and hangs on it once that cluster is gone
            address=args.address or os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            configure_logging=False,
        )
    trainer = TorchTrainer(
        _symbol(stage.loop),
        train_loop_config=cfg,
        # Each worker gets its share of the cores: Ray sets a worker's torch/OMP threads from it.
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": max(1, (os.cpu_count() or 1) // num_workers)},
        ),
        run_config=RunConfig(name=f"imagine-{name}", storage_path=str(work / "ray")),
    )
    result = trainer.fit()
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    summary = json.loads((work / "train_summary.json").read_text())
    metrics = evaluate(args.stage, work / "last", cfg, args.eval_limit)
    manifest = {
        "name": name,
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
    model = _symbol(stage.loader)(f"local-dir:{work / 'last'}")
    version = model.save(output, manifest)
    print(f"checkpoint {version} written to {output}")
    if metrics:
        print(json.dumps(metrics.get("summary", {}), indent=2))
    return 0


def evaluate(stage: str, ckpt: Path, cfg: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """Held-out metrics for the manifest, in-process (empty for folder datasets)."""
    from imagine.data import FASHION_MNIST_CLASSES, class_query
    from trainer.datasets import eval_split

    split = eval_split(cfg["dataset"], limit)
    if split is None:
        return {}
    images, labels = split
    queries = {c: class_query(i) for i, c in enumerate(FASHION_MNIST_CLASSES)}
    if stage == "dual_encoder":
        from imagine.evaluation import evaluate_category
        from imagine.models.dual_encoder import load_dual_encoder

        encoder = load_dual_encoder(f"local-dir:{ckpt}", device="cpu")
        report = evaluate_category(encoder, images, labels, queries)
        print(report.table(f"held-out category retrieval ({len(images)} images, text queries)"))
        return {
            "summary": {"mAP": round(report.map, 4), "P@10": round(report.mean_p10, 4)},
            "eval_images": len(images),
            **report.as_dict(),
        }
    if stage == "aggregator":
        from imagine.evaluation import evaluate_paths_in_process
        from imagine.models.aggregator import load_aggregator
        from imagine.models.dual_encoder import load_dual_encoder
        from imagine.models.generator import load_generator
        from imagine.models.vision import load_vision_encoder
        from imagine.reports import comparison_table

        reports = evaluate_paths_in_process(
            load_dual_encoder(cfg["dual_model"], device="cpu"),
            load_vision_encoder(cfg["vision_model"], device="cpu"),
            load_generator(cfg["generator_model"], device="cpu"),
            load_aggregator(f"local-dir:{ckpt}"),
            images,
            labels,
            queries,
            num_generated=cfg["num_generated"],
            steps=cfg["steps"],
            guidance=cfg["guidance"],
        )
        print(comparison_table(reports))
        return {
            "summary": {name: round(r.map, 4) for name, r in reports.items()},
            "eval_images": len(images),
            "paths": {name: r.as_dict() for name, r in reports.items()},
        }
    if stage == "captioner":
        from trainer.caption_stage import evaluate_caption_stage

        return evaluate_caption_stage(ckpt, cfg, limit)
    module = "trainer.vision_stage" if stage == "vision" else "trainer.generator_stage"
    fn = "evaluate_vision" if stage == "vision" else "evaluate_generator"
    return dict(_symbol(f"{module}:{fn}")(ckpt))


if __name__ == "__main__":
    sys.exit(main())
