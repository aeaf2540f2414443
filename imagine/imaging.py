"""Decoding untrusted image bytes with limits: bad objects become a reason, never a crash."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000


class BadImage(ValueError):
    """An object that is not a usable image; ``str(exc)`` is the reason shown to users."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    if not data:
        raise BadImage("empty object (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"image of {w}x{h} pixels exceeds the limit of {max_pixels}")
            img.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image (unrecognised format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"corrupt or truncated image: {exc}") from exc
    return img
