"""decode_image: untrusted bytes become an image or a BadImage with a reason."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from imagine.imaging import BadImage, decode_image


def _png(size: tuple[int, int] = (16, 12), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size)
    # Varied pixels so the compressed stream is long enough to cut in half.
    img.putdata([((x * 7) % 256, (x * 13) % 256, (x * 31) % 256) for x in range(size[0] * size[1])])
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_good_png_decodes_with_its_pixels() -> None:
    data = _png((16, 12))

    img = decode_image(data)

    assert img.size == (16, 12)
    assert img.format == "PNG"
    assert img.getpixel((1, 0)) == (7, 13, 31)


def test_image_exactly_at_the_limit_decodes() -> None:
    assert decode_image(_png((10, 10)), max_pixels=100).size == (10, 10)


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(BadImage, match=r"empty object \(0 bytes\)"):
        decode_image(b"")


def test_random_bytes_are_not_an_image() -> None:
    with pytest.raises(BadImage, match="not an image"):
        decode_image(random.Random(0).randbytes(4096))


def test_text_file_is_not_an_image() -> None:
    with pytest.raises(BadImage, match="not an image"):
        decode_image(b"hello, this is a text file\n")


def test_truncated_png_is_refused() -> None:
    data = _png((64, 64))

    with pytest.raises(BadImage, match="corrupt or truncated image"):
        decode_image(data[: len(data) // 2])


def test_image_over_max_pixels_is_refused_with_its_size() -> None:
    with pytest.raises(BadImage, match=r"image of 11x10 pixels exceeds the limit of 100"):
        decode_image(_png((11, 10)), max_pixels=100)


def test_bad_image_is_a_value_error() -> None:
    assert issubclass(BadImage, ValueError)
