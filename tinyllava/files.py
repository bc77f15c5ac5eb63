"""Files written whole or not at all, and the sha256 digests that say a file or a folder is the pinned one.

Every file tinyllava writes (a GGUF, a checkpoint, a data set's pairs.jsonl, a feature) is written aside and
renamed into place: a reader, or a run killed at any moment, sees the old file or the whole new one, never half.
"""
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic(path, mode="wb"):
    """open(path, mode) for writing, but the bytes go to a file beside it (.NAME.PID.tmp) that replaces `path`
    only when the block ends without an error; on an error it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path, data):
    """Write text or bytes to `path`, whole or not at all. -> path"""
    with atomic(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def sha256_file(path, progress=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress:
                progress.update(len(chunk))
    return h.hexdigest()


def listing_sha256(files):
    """{relative path: sha256} -> the sha256 of `sha256sum`'s lines ("HASH  path\\n") sorted by path: one digest
    for a whole folder, the same number as `find ... | LC_ALL=C sort | xargs sha256sum | sha256sum`."""
    lines = "".join(f"{files[name]}  {name}\n" for name in sorted(files, key=lambda s: s.encode()))
    return hashlib.sha256(lines.encode()).hexdigest()


def folder_sha256(folder, suffixes):
    """listing_sha256 of every file under `folder` whose name ends in one of `suffixes`."""
    folder = Path(folder)
    return listing_sha256({p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*")
                           if p.is_file() and p.name.endswith(tuple(suffixes))})


@contextmanager
def atomic_folder(out):
    """Build a folder whole or not at all: the block fills a fresh hidden folder beside `out` (yielded), which
    takes out's place only when the block ends without an error (a killed build leaves `out` as it was, and a
    hidden folder the next build clears). -> yields the folder to fill"""
    import shutil
    out = Path(out)
    tmp, old = out.with_name(f".{out.name}.building"), out.with_name(f".{out.name}.old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale, ignore_errors=True)
