"""Caption decoding settings and their checks (no torch: the gRPC ingress validates with it)."""

from __future__ import annotations

import math

STRATEGIES = ("greedy", "beam", "sample")
MAX_BEAM = 16
MAX_TEMPERATURE = 10.0


class DecodeError(ValueError):
    """Bad decoding settings (unknown strategy, beam size or temperature out of range)."""


def check_decoding(strategy: str, beam_size: int, temperature: float) -> None:
    if strategy not in STRATEGIES:
        raise DecodeError(f"unknown decoding strategy {strategy!r}; use {', '.join(STRATEGIES)}")
    if strategy == "beam" and not 1 <= beam_size <= MAX_BEAM:
        raise DecodeError(f"beam_size {beam_size} is outside 1..{MAX_BEAM}")
    if strategy == "sample" and not (math.isfinite(temperature) and 0 < temperature <= 10):
        raise DecodeError(f"temperature {temperature} is outside (0, {MAX_TEMPERATURE:g}]")
