"""Images in and out of the task API: decode PNG/JPEG with a pixel limit checked first, encode PNG."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from nnserve_server.core.errors import InvalidInput

_OBJECT = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _why(error: Exception) -> str:
    """Pillow's reason, for a caller of any language: no exception class, no Python object."""
    if isinstance(error, UnidentifiedImageError):
        return "the bytes are not in an image format the server reads"
    return _OBJECT.sub("the data", str(error)).strip() or "the data is not a valid image"


def within_budget(encoded: list[bytes], max_pixels: int, max_request_pixels: int) -> list[tuple[int, int]]:
    """Refuse, from the headers alone, images that together hold more than `max_request_pixels` (or one that
    holds more than `max_pixels`): nothing is decoded for a request that could not be served. Returns each
    image's (width, height)."""
    total, sizes = 0, []
    for index, data in enumerate(encoded):
        try:
            width, height = Image.open(io.BytesIO(data)).size  # the header only
        except Exception as error:  # Pillow raises many types for bad data
            which = f" {index}" if len(encoded) > 1 else ""
            raise InvalidInput(f"cannot decode the image{which}: {_why(error)}; send PNG or JPEG bytes") from None
        if width * height > max_pixels:
            raise InvalidInput(f"image {index} is {width}x{height} pixels; at most {max_pixels} pixels are decoded")
        total += width * height
        if total > max_request_pixels:
            raise InvalidInput(
                f"the images hold more than {max_request_pixels} pixels together (--max-request-pixels), "
                f"{total} by image {index} of {len(encoded)}; send them in several requests"
            )
        sizes.append((width, height))
    return sizes


def decode(data: bytes, *, channels: int, size: tuple[int, ...], max_pixels: int, top: float) -> np.ndarray:
    """An encoded image as float32 [channels, height, width], 0..255 mapped onto 0..`top`.

    The pixel count comes from the header and is checked before any pixel is decoded. `size`
    (height, width) resizes; empty keeps the image's own size.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))  # reads the header only
            width, height = opened.size
            if width * height > max_pixels:
                raise InvalidInput(f"image is {width}x{height} pixels; at most {max_pixels} pixels are decoded")
            image = opened.convert("L" if channels == 1 else "RGB")
    except InvalidInput:
        raise
    except Exception as error:  # Pillow raises many types for bad data
        raise InvalidInput(f"cannot decode the image: {_why(error)}; send PNG or JPEG bytes") from None
    if size and (height, width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels[np.newaxis] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return pixels * np.float32(top / 255.0)


def to_uint8(values: np.ndarray, top: float) -> np.ndarray:
    """Values on 0..`top` as 0..255 pixels."""
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """A uint8 [height, width] (grey) or [height, width, 3] array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
