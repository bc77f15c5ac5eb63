"""CLIP's image preprocessing: any picture in, float32 [3, 224, 224] out.

    open (EXIF orientation applied) -> RGB -> resize the shortest side to 224, bicubic -> centre crop 224x224
    -> scale to [0, 1] -> subtract CLIP's mean, divide by its std (per channel)

as transformers' CLIPImageProcessor does it. LLaVA v1.5 instead pads the picture to a square with the mean
colour first (`pad=True`), so nothing is cropped away.
"""
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import TinyLlavaError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # per channel, of the images CLIP was trained on
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN_RGB = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): LLaVA's padding colour
MAX_PIXELS = 64_000_000  # a decompression bomb is refused before it is decoded
MIN_SIDE = 16            # one ViT patch: anything smaller holds nothing to see


def open_image(src):
    """A path or PIL image -> RGB PIL image, upright (EXIF), transparency composited on CLIP's mean colour."""
    if isinstance(src, Image.Image):
        img, name = src, "image"
    else:
        name = str(src)
        if Path(src).is_dir():
            raise TinyLlavaError(f"{name}: is a directory, not an image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(src)
                if img.width * img.height > MAX_PIXELS:
                    raise TinyLlavaError(f"{name}: {img.width}x{img.height} pixels is too large "
                                         f"(limit {MAX_PIXELS // 1_000_000} megapixels)")
                img.seek(0)  # the first frame of an animation
                img.load()
        except FileNotFoundError:
            raise TinyLlavaError(f"{name}: no such file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise TinyLlavaError(f"{name}: too large, refused as a possible decompression bomb") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable or truncated files
            raise TinyLlavaError(f"{name}: not a readable image ({e})") from None
    if img.width < MIN_SIDE or img.height < MIN_SIDE:
        raise TinyLlavaError(f"{name}: {img.width}x{img.height} pixels is too small (at least {MIN_SIDE}x{MIN_SIDE}, "
                             f"one patch of the vision tower)")
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: scale to 8 bits, don't clip
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.round(a / 257 if a.max() > 255 else a).clip(0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGB", img.size, MEAN_RGB)
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        img = background
    return img.convert("RGB")


def pad_to_square(img):  # LLaVA's expand2square: centre the picture on a square of the mean colour
    side = max(img.size)
    square = Image.new("RGB", (side, side), MEAN_RGB)
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return square


def preprocess(src, size=224, pad=False):
    """Path or PIL image -> float32 [3, size, size], normalized with CLIP's mean and std."""
    img = open_image(src)
    if pad:
        img = pad_to_square(img)
    w, h = img.size
    long = int(size * max(w, h) / min(w, h))  # rounded down, exactly as transformers computes it
    new = (size, long) if w <= h else (long, size)
    img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    x = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255  # [size, size, 3]
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)               # [size, size, 3]
    return x.transpose(2, 0, 1).copy()                                                          # [3, size, size]
