"""Preprocessing against transformers' CLIPImageProcessor, and every kind of picture a user may pass."""
import io

import numpy as np
import pytest
from PIL import Image

from helpers import FLICKR, load_npz, synthetic_photo, to_levels, vision_inputs
from tinyllava.errors import TinyLlavaError
from tinyllava.image import MEAN_RGB, open_image, pad_to_square, preprocess



def test_matches_saved_reference_within_one_level():
    ref = load_npz("vision.npz")
    ours = np.stack([preprocess(im) for im in vision_inputs()])
    assert ours.shape == ref["levels"].shape and ours.dtype == np.float32
    assert np.abs(to_levels(ours).astype(int) - ref["levels"]).max() <= 1


def odd_sized_photos():
    """Real photos cut to odd sizes (Flickr8k where present, else the demo photos), plus made ones."""
    from tinyllava import weights
    sources = sorted(FLICKR.glob("*.jpg"))[:3] if FLICKR.is_dir() else list(weights.demo_photos().values())[:3]
    out = []
    for i, p in enumerate(sources):
        im = open_image(p)
        out += [im.crop((0, 0, im.width - 7 * i - 1, im.height // 2 + 13)), im.resize((97 + 31 * i, 301))]
    return out + [synthetic_photo(1, (640, 33)), synthetic_photo(2, (31, 400))]


def test_matches_live_reference_on_odd_sizes(reference):
    proc = reference.image_processor()
    for im in odd_sized_photos():
        want = proc(images=im, return_tensors="np")["pixel_values"][0]
        assert np.abs(to_levels(preprocess(im)).astype(int) - to_levels(want)).max() <= 1, im.size


def test_pad_to_square_centres_on_the_mean_colour():
    im = Image.new("RGB", (80, 20), (255, 0, 0))
    sq = pad_to_square(im)
    assert sq.size == (80, 80) and sq.getpixel((0, 0)) == MEAN_RGB and sq.getpixel((40, 40)) == (255, 0, 0)
    x = preprocess(im, pad=True)
    assert np.allclose(x[:, 0, :], 0, atol=0.02)  # the padding normalizes to ~0
    assert x.shape == (3, 224, 224)


def saved(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "1"])
def test_every_mode_becomes_rgb(mode, tmp_path):
    base = synthetic_photo(3, (50, 40))
    im = base.convert(mode) if mode not in ("I;16", "I") else \
        Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16 if mode == "I;16" else np.int32))
    path = tmp_path / {"CMYK": "x.jpg", "I": "x.tif"}.get(mode, "x.png")
    im.save(path)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (50, 40)
    if mode in ("I;16", "I"):  # 16-bit values are scaled, not clipped to white
        assert abs(np.asarray(out, float).mean() - np.asarray(base.convert("L"), float).mean()) < 2


def test_transparency_is_composited_on_the_mean_colour():
    im = Image.new("RGBA", (20, 20), (255, 255, 255, 0))
    assert open_image(im).getpixel((3, 3)) == MEAN_RGB


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (60, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif)
    up = open_image(path)
    assert up.size == (20, 60) and np.asarray(up)[:10].mean() > 200  # the strip is now on top


def test_first_frame_of_an_animated_gif(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert open_image(path).getpixel((5, 5))[0] > 200


@pytest.mark.parametrize("content,msg", [(b"", "not a readable image"), (b"not an image at all", "not a readable"),
                                          (None, "no such file")])
def test_bad_files_raise_one_clear_error(tmp_path, content, msg):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TinyLlavaError, match=msg) as e:
        open_image(path)
    assert str(path) in str(e.value)


def test_truncated_and_bomb_and_directory(tmp_path):
    data = saved(synthetic_photo(4, (300, 300)), "PNG")
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(TinyLlavaError, match="not a readable image"):
        open_image(tmp_path / "t.png")
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    with pytest.raises(TinyLlavaError, match="too large|decompression bomb"):
        open_image(tmp_path / "bomb.png")
    with pytest.raises(TinyLlavaError, match="directory"):
        open_image(tmp_path)


def test_tiny_images_are_refused_and_small_ones_work():
    with pytest.raises(TinyLlavaError, match="1x1 pixels is too small"):
        preprocess(Image.new("RGB", (1, 1), (10, 20, 30)))
    assert preprocess(Image.new("RGB", (16, 300), (10, 20, 30))).shape == (3, 224, 224)
