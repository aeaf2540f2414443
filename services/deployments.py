"""Ray Serve deployments, one thin class per model. Each builds its model in ``__init__``.

Encode methods use ``@serve.batch``: concurrent requests (queries, ingestion chunks) are served
by one forward pass. A request may itself carry many inputs; the batch is flattened and split
back. Batch sizes come from the settings (Serve config / deploy overlays), not the decorator.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray import serve

from imagine.imaging import BadImage, decode_image
from imagine.models.dual_encoder import DualEncoder, load_dual_encoder

log = logging.getLogger("imagine.services")


def _flatten(batches: list[list[Any]]) -> tuple[list[Any], list[int]]:
    flat = [x for b in batches for x in b]
    return flat, [len(b) for b in batches]


def _split(values: list[Any], sizes: list[int]) -> list[list[Any]]:
    out, start = [], 0
    for n in sizes:
        out.append(values[start : start + n])
        start += n
    return out


class _EncoderBase:
    def __init__(
        self, model_spec: str, max_batch_size: int, batch_wait_s: float, torch_threads: int
    ) -> None:
        import os

        import torch

        from imagine.runtime import quiet_environment

        quiet_environment()
        torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        self.encoder: DualEncoder = load_dual_encoder(model_spec)
        self.max_batch_size = max_batch_size
        self.encode.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.encode.set_batch_wait_timeout_s(batch_wait_s)  # type: ignore[attr-defined]
        log.info("%s loaded %s", type(self).__name__, self.encoder.model_version)

    def info(self) -> dict[str, Any]:
        return {"model_version": self.encoder.model_version, "dim": self.encoder.dim}

    async def encode(self, items: list[Any]) -> list[Any]:  # replaced in subclasses
        raise NotImplementedError


@serve.deployment(name="TextEncoder")
class TextEncoder(_EncoderBase):
    """Texts -> joint-space vectors (L2-normalised)."""

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def encode(self, requests: list[list[str]]) -> list[list[np.ndarray]]:
        texts, sizes = _flatten(requests)
        vectors = list(self.encoder.encode_text(texts)) if texts else []
        return _split(vectors, sizes)


@serve.deployment(name="ImageEncoder")
class ImageEncoder(_EncoderBase):
    """Encoded images -> joint-space vectors; an undecodable image gives its reason instead."""

    def __init__(
        self,
        model_spec: str,
        max_batch_size: int,
        batch_wait_s: float,
        torch_threads: int,
        max_pixels: int,
    ) -> None:
        super().__init__(model_spec, max_batch_size, batch_wait_s, torch_threads)
        self.max_pixels = max_pixels

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def encode(self, requests: list[list[bytes]]) -> list[list[np.ndarray | str]]:
        blobs, sizes = _flatten(requests)
        results: list[np.ndarray | str] = []
        images, where = [], []
        for i, blob in enumerate(blobs):
            try:
                images.append(decode_image(blob, self.max_pixels))
                where.append(i)
            except BadImage as exc:
                results.append(str(exc))
                continue
            results.append("")
        for start in range(0, len(images), self.max_batch_size):
            vecs = self.encoder.encode_images(images[start : start + self.max_batch_size])
            for j, vec in enumerate(vecs):
                results[where[start + j]] = vec
        return _split(results, sizes)
