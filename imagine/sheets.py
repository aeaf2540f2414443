"""Contact sheets: a grid of hit images per query, with captions, as one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL = 84
LABEL_W = 220
TEXT_H = 14


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[tuple[Image.Image, str]]]],
    out: Path,
    cell: int = CELL,
) -> Path:
    """``rows``: (row title, [(image, caption), ...]) -> a PNG at ``out``."""
    cols = max((len(r[1]) for r in rows), default=1)
    width = LABEL_W + cols * (cell + 4)
    height = max(1, len(rows)) * (cell + TEXT_H + 8)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, (title, hits) in enumerate(rows):
        y = r * (cell + TEXT_H + 8) + 4
        draw.text((6, y + cell // 2 - 6), _fit(title, 34), fill="black", font=font)
        for c, (img, caption) in enumerate(hits):
            x = LABEL_W + c * (cell + 4)
            thumb = img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(thumb, (x, y))
            draw.text((x, y + cell + 1), _fit(caption, 13), fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _fit(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
