"""Image preprocessing for the understanding path (numpy + PIL, no torch).

Mirrors upstream ``VARGPTQwen2VLImageProcessor``, a copy of the Qwen2-VL *slow* image processor of
transformers 4.46.1 (``vargpt_qwen_v1_1/image_processing_qwen2_vl.py``):

1. ``smart_resize`` picks a size that is a multiple of ``patch_size * merge_size`` (28) with a pixel
   count inside ``[min_pixels, max_pixels]``; the image is resized with PIL bicubic only when the
   size changes.
2. Rescale ``float32(float64(u8) * rescale_factor)``, then normalise ``(x - mean) / std`` with
   float32 mean/std (CLIP constants).
3. Patchify: tile the single frame ``temporal_patch_size`` times, then order rows by 2x2 merge
   windows and columns by (channel, temporal, py, px).

The result feeds :class:`vargpt_mlx.models.vision.VisionTransformer`; each image becomes
``t*h*w / merge_size**2`` ``<|image_pad|>`` tokens in the prompt.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps
from .errors import InputError, first_line

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, Path, Image.Image, np.ndarray]


class ImageError(InputError):
    """An input image that cannot be used (missing, unreadable, truncated or of a bad size)."""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136,
                 max_pixels: int = 1003520) -> tuple[int, int]:
    """Qwen2-VL ``smart_resize``: the (h, w) an image of ``height x width`` is resized to.

    Both sides become multiples of ``factor`` (Python ``round``, half to even) and the area is
    brought into ``[min_pixels, max_pixels]`` keeping the aspect ratio as far as possible.
    """
    if height < factor or width < factor:
        raise ImageError(f"image of {height}x{width} pixels is too small: both sides must be >= {factor}")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"image of {height}x{width} pixels has an aspect ratio above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to 8-bit ``L``.

    PIL's own ``convert("RGB")`` clips such images at 255 (nearly all white); 16-bit integers are
    scaled by 255/65535 instead and floats are taken as [0, 1].
    """
    a = np.asarray(image)
    if image.mode == "F":
        a = np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0
    else:
        a = np.clip(a.astype(np.float64), 0.0, 65535.0) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(a).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, LA, P, CMYK, L, I;16, ...) to ``RGB``.

    Like upstream's ``convert_to_rgb`` this is ``image.convert("RGB")`` (alpha is dropped, not
    composited), except for high-bit-depth greyscale, which is scaled to 8 bits first.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_bit_depth_to_l(image)
    return image.convert("RGB")


def _open(path: Union[str, Path]) -> Image.Image:
    """Open and fully decode an image file, applying its EXIF orientation (mode unchanged)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    size = None
    try:
        with warnings.catch_warnings():
            # PIL warns (and above twice the limit refuses) on huge images: one clear error instead
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
                im.load()
                return ImageOps.exif_transpose(im)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        limit = Image.MAX_IMAGE_PIXELS or 0
        found = re.search(r"\((\d+) pixels\)", str(e))
        what = (f"{size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.1f} M pixels" if size else
                f"{int(found.group(1)) / 1e6:.1f} M pixels" if found else "decompression bomb guard")
        raise ImageError(f"image {path} is too large ({what}; at most {limit / 1e6:.1f} M pixels are read)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot read image {path}: {first_line(e)}") from None


def load_image(image: Union[str, Path, Image.Image]) -> Image.Image:
    """Open a path (or take a PIL image), apply its EXIF orientation and return it as ``RGB``.

    Raises :class:`ImageError` with a one-line message for missing, unreadable or truncated files.
    """
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    return to_rgb(_open(image))


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """A uint8 ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array as a PIL image."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(
            f"image arrays must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); got {array.dtype} {array.shape}"
        )
    return Image.fromarray(np.ascontiguousarray(array))


@dataclass
class ImageProcessor:
    """Qwen2-VL slow image processor (upstream ``VARGPTQwen2VLImageProcessor``, class defaults).

    Fields mirror ``preprocessor_config.json``.
    """

    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "ImageProcessor":
        """Read ``preprocessor_config.json`` in ``path`` if present, else use the class defaults."""
        cfg_file = Path(path) / "preprocessor_config.json"
        if not cfg_file.is_file():
            return cls()
        cfg = json.loads(cfg_file.read_text())
        size = cfg.get("size") or {}
        for k in ("min_pixels", "max_pixels"):
            if k not in cfg and k in size:
                cfg[k] = size[k]
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        for k in ("image_mean", "image_std"):
            if k in kwargs:
                kwargs[k] = tuple(float(x) for x in kwargs[k])
        return cls(**kwargs)

    @property
    def factor(self) -> int:
        """Side granularity in pixels: one 2x2 merge window of patches."""
        return self.patch_size * self.merge_size

    def __call__(self, images: list[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """Preprocess ``images`` (paths, PIL images or uint8 HxWxC arrays).

        Returns ``pixel_values`` float32 ``(sum of patches, C * T * p * p)`` (every image's rows
        concatenated) and ``image_grid_thw`` int64 ``(n_images, 3)`` in patch units.
        """
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        rows, grids = [], []
        for image in images:
            patches, grid = self._preprocess_one(self._as_pil(image))
            rows.append(patches)
            grids.append(grid)
        return np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64).reshape(-1, 3)

    def num_image_tokens(self, grid_thw) -> list[int]:
        """LLM tokens per image: ``t * h * w / merge_size**2``."""
        grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        return [int(t * h * w) // self.merge_size**2 for t, h, w in grid]

    # ------------------------------------------------------------------ steps
    def _as_pil(self, image: ImageInput) -> Image.Image:
        """Any supported input as an RGB PIL image.

        Paths go through :func:`_open` (EXIF orientation applied); PIL images and arrays are taken
        as they are, as upstream does. Non-RGB modes are converted when ``do_convert_rgb``.
        """
        if isinstance(image, np.ndarray):
            image = _array_to_pil(image)
        elif isinstance(image, (str, Path)):
            image = _open(image)
        elif not isinstance(image, Image.Image):
            raise ImageError(f"unsupported image input of type {type(image).__name__}")
        if image.mode == "RGB":
            return image
        if not self.do_convert_rgb:
            raise ImageError(f"image mode {image.mode!r} is not RGB and do_convert_rgb is False")
        return to_rgb(image)

    def _resize(self, image: Image.Image) -> Image.Image:
        """``smart_resize`` + PIL resize (skipped when the size is already right)."""
        height, width = image.height, image.width
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        if (h, w) == (height, width):
            return image
        return image.resize((w, h), resample=Image.Resampling(self.resample), reducing_gap=None)

    def _normalize(self, pixels: np.ndarray) -> np.ndarray:
        """Rescale then normalise an ``(H, W, C)`` uint8 array, as transformers' float32 ops."""
        x = pixels
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32)
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x.astype(np.float32)

    def _preprocess_one(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image to its patch rows and ``(grid_t, grid_h, grid_w)`` (upstream ``_preprocess``)."""
        if self.do_resize:
            image = self._resize(image)
        pixels = np.asarray(image)
        height, width, _ = pixels.shape
        if height % self.factor or width % self.factor:
            raise ImageError(f"image of {height}x{width} pixels is not a multiple of {self.factor} (do_resize=False)")
        chw = self._normalize(pixels).transpose(2, 0, 1)
        return self.patchify(chw)

    def patchify(self, chw: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """``(C, H, W)`` float32 frame to rows ``(gt*gh*gw, C*T*p*p)`` in merge-window order."""
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        frames = np.tile(chw[None], (tp, 1, 1, 1))
        channel, height, width = chw.shape
        gt, gh, gw = frames.shape[0] // tp, height // p, width // p
        x = frames.reshape(gt, tp, channel, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, channel * tp * p * p), (gt, gh, gw)
