"""Stage ``aggregator``: the CLE-TIR attention aggregator and the fusion weight ``l``.

Needs the trained dual encoder, vision encoder and generator. For Q training prompts (captions
of the training set, spread over its groups) the generator imagines K images each; the vision
encoder embeds them; a sample of real training images is the gallery (its vision vectors for the
generated path, its joint vectors against the prompts for the text path). The aggregator and
``l`` are trained jointly with a retrieval loss of the fused score against the real gallery
(``imagine.models.aggregator.train_aggregator``).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trainer.datasets import load_train_data


def pick_prompts(captions: list[str], groups: list[int], per_group: int, seed: int) -> list[int]:
    """Indices of examples whose captions become prompts: ``per_group`` distinct ones a group."""
    rng = random.Random(seed)
    order = list(range(len(captions)))
    rng.shuffle(order)
    chosen: dict[int, list[int]] = {}
    seen: set[str] = set()
    for i in order:
        g = groups[i]
        if len(chosen.setdefault(g, [])) < per_group and captions[i] not in seen:
            chosen[g].append(i)
            seen.add(captions[i])
    return sorted(i for idx in chosen.values() for i in idx)


def aggregator_stage(cfg: dict[str, Any]) -> None:
    """The Ray Train loop (one worker: the data here is small, the cost is generation)."""
    from imagine.models.aggregator import train_aggregator
    from imagine.models.dual_encoder import load_dual_encoder
    from imagine.models.generator import load_generator
    from imagine.models.vision import load_vision_encoder
    from trainer.stages import _progress

    started = time.time()
    work = Path(cfg["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    dual = load_dual_encoder(cfg["dual_model"], device="cpu")
    vision = load_vision_encoder(cfg["vision_model"], device="cpu")
    generator = load_generator(cfg["generator_model"], device="cpu")
    data = load_train_data(cfg["dataset"], cfg.get("limit"), dual.image_size, cfg["seed"])

    prompts_idx = pick_prompts(data.captions, data.groups, cfg["prompts_per_group"], cfg["seed"])
    prompts = [data.captions[i] for i in prompts_idx]
    q_groups = [data.groups[i] for i in prompts_idx]
    k, batch = cfg["num_generated"], cfg["generate_batch"]
    # generation is the slow part: a re-run with the same sampling settings reuses it
    cache = work / f"generated-k{k}-s{cfg['steps']}-g{cfg['guidance']}-seed{cfg['seed']}.npy"
    if cfg["resume"] and cache.is_file() and np.load(cache).shape[0] == len(prompts):
        generated = np.load(cache)
    else:
        bar = _progress(len(prompts), "generate training queries")
        chunks = []
        for start in range(0, len(prompts), batch):
            images = generator.generate(
                prompts[start : start + batch],
                num_images=k,
                steps=cfg["steps"],
                guidance=cfg["guidance"],
                seed=cfg["seed"] + start,
            )
            flat = [img for per_prompt in images for img in per_prompt]
            vecs = vision.encode_images(flat).reshape(len(images), k, -1)
            chunks.append(vecs)
            bar.update(len(images))
        bar.close()
        generated = np.concatenate(chunks)
        np.save(cache, generated)

    rng = np.random.default_rng(cfg["seed"])
    gallery_idx = rng.choice(
        len(data.pixels), size=min(cfg["gallery"], len(data.pixels)), replace=False
    )
    gallery_images = [Image.fromarray(data.pixels[i].permute(1, 2, 0).numpy()) for i in gallery_idx]
    gallery_visual = np.concatenate(
        [
            vision.encode_images(gallery_images[i : i + 512])
            for i in range(0, len(gallery_images), 512)
        ]
    )
    gallery_joint = np.concatenate(
        [
            dual.encode_images(gallery_images[i : i + 512])
            for i in range(0, len(gallery_images), 512)
        ]
    )
    text_scores = dual.encode_text(prompts) @ gallery_joint.T
    g_groups = [data.groups[i] for i in gallery_idx]
    aggregator, metrics = train_aggregator(
        generated,
        q_groups,
        gallery_visual,
        g_groups,
        text_scores,
        mode=cfg.get("mode", "attention"),
        epochs=int(cfg["epochs"]),
        lr=cfg["lr"],
        batch_size=int(cfg["batch_size"]),
        weight_decay=float(cfg["weight_decay"]),
        seed=cfg["seed"],
    )
    aggregator.save(work / "last", {"stage": "aggregator"})
    (work / "train_summary.json").write_text(
        json.dumps(
            {
                "prompts": len(prompts),
                "num_generated": k,
                "gallery": len(gallery_idx),
                "fit_metrics": metrics,
                "fusion_weight": aggregator.fusion_weight,
                "seconds": time.time() - started,
                "data_fingerprint": data.fingerprint,
                "models": {
                    "dual": dual.model_version,
                    "vision": vision.model_version,
                    "generator": generator.model_version,
                },
            },
            default=float,
        )
    )
