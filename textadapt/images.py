"""Decoding images: the one function every image goes through (test sets, ``datasets check``, ``predict``).

``open_rgb`` decodes a file completely (a truncated file fails here, naming it, not halfway through
a run) and returns RGB. Transparent pixels are composited onto a background colour (white unless the
dataset spec says otherwise): a cut-out on a transparent background keeps its shape instead of
turning into whatever colour the invisible pixels happen to hold (often black).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, UnidentifiedImageError

from textadapt import TextadaptError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WHITE = (255, 255, 255)
Colour = tuple[int, int, int]


def parse_colour(value: str) -> Colour:
    """A colour name or code Pillow knows ("white", "#808080", "rgb(0, 0, 0)") as an RGB triple."""
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise ValueError(f'{value!r} is not a colour (use a name such as "white" or a code such as "#808080")') from None


def has_alpha(im: Image.Image) -> bool:
    """Whether an image (opened, not necessarily decoded) can hold transparent pixels."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def to_rgb(im: Image.Image, background: Colour = WHITE) -> Image.Image:
    """RGB, with any transparency composited onto ``background``."""
    if has_alpha(im):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def open_rgb(item: str | Path | np.ndarray, background: Colour = WHITE) -> Image.Image:
    """Decode an image file (or wrap a uint8 array) completely, as RGB on ``background``.

    A file that is not an image, or is cut short, raises a TextadaptError that names it.
    """
    if not isinstance(item, (str, Path)):
        return to_rgb(Image.fromarray(item), background)
    try:
        with Image.open(item) as im:
            im.load()  # decodes every pixel: a truncated file fails now
            return to_rgb(im, background)
    except UnidentifiedImageError:
        raise TextadaptError(f"{item}: not an image Pillow can read (unknown or damaged format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise TextadaptError(f"{item}: cannot be decoded: {e}") from None


def image_key(item: str | Path | np.ndarray, background: Colour = WHITE) -> str:
    """The content hash of an image: the image-embedding cache key (with the backbone's).

    Opaque images hash their bytes alone (keys made before backgrounds existed stay valid); an image
    with transparency also hashes the background it is composited onto, which changes its pixels.
    """
    if not isinstance(item, (str, Path)):
        return hashlib.sha256(np.ascontiguousarray(item).tobytes() + str(item.shape).encode()).hexdigest()
    data = Path(item).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only
            transparent = has_alpha(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        transparent = False  # decoding it will fail and say so; the key only has to be stable
    suffix = ("\0background=#%02x%02x%02x" % tuple(background)).encode() if transparent else b""  # noqa: UP031 - part of the cache key: kept byte for byte
    return hashlib.sha256(data + suffix).hexdigest()
