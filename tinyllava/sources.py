"""Public sources pinned by commit: downloaded with resume and checked by sha256, or read from a local copy.

A data set here is built from files in public GitHub repositories, each at one commit. They are read from:
  - the internet: a single file as GitHub serves it raw (https://raw.githubusercontent.com/OWNER/NAME/COMMIT/PATH),
    a folder from the commit's snapshot tarball (https://codeload.github.com/OWNER/NAME/tar.gz/COMMIT);
  - or a local copy of the repository: a clone, a bare git directory (both read at the pinned commit, whatever
    is checked out), or an unpacked snapshot tarball (the folder NAME-COMMIT/, or the folder that holds it).

A download goes to NAME.part first and resumes from there when it is cut off (HTTP Range), then is checked
against its pinned sha256: a file that does not match is deleted and refused, never used. What is read from a
local copy is checked against the same pins.
"""
import http.client
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import TinyLlavaError
from .files import sha256_file
from .progress import bar

GITHUB_RAW, GITHUB_ARCHIVE = "https://raw.githubusercontent.com", "https://codeload.github.com"


@dataclass(frozen=True)
class Snapshot:
    """A public GitHub repository at one commit. `mirror`, if set, serves the same paths as GitHub's two hosts
    (raw: /OWNER/NAME/COMMIT/PATH, archive: /OWNER/NAME/tar.gz/COMMIT): a test's local server, or a proxy."""
    repo: str       # "owner/name"
    commit: str     # 40 hex digits
    mirror: str = None

    def __str__(self):
        return f"{self.repo}@{self.commit[:7]}"

    def raw_url(self, path):
        return f"{self.mirror or GITHUB_RAW}/{self.repo}/{self.commit}/{path}"

    @property
    def archive_url(self):
        return f"{self.mirror or GITHUB_ARCHIVE}/{self.repo}/tar.gz/{self.commit}"

    @property
    def archive_name(self):  # the snapshot's file name, and the folder its members sit in
        return f"{self.repo.split('/')[1]}-{self.commit}"


# -- downloads -----------------------------------------------------------------------------------------------
def download(url, dest, sha256=None, attempts=4, timeout=60):
    """url -> dest, resuming from dest.part when the transfer is cut off (a few attempts here, and again on the
    next run), then checked against `sha256`: a file that does not match is deleted and refused. A dest that is
    already there is trusted only if it matches. -> dest"""
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256_file(dest) == sha256:
            return dest
        dest.unlink()  # a damaged or changed earlier download: fetched again, below
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(attempts):
        try:
            if _transfer(url, part, timeout):
                break
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code < 500 and e.code != 429:
                raise TinyLlavaError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
            if attempt == attempts - 1:
                reason = getattr(e, "reason", None) or e
                raise TinyLlavaError(f"cannot download {url} ({reason}); {part.stat().st_size if part.exists() else 0}"
                                     f" bytes kept in {part}: run the same command again to resume") from None
        time.sleep(min(2 ** attempt, 10) if attempt else 0)
    else:
        raise TinyLlavaError(f"cannot download {url}: cut off {attempts} times; run the same command again to "
                             f"resume from {part}")
    if sha256 is not None and (got := sha256_file(part)) != sha256:
        part.unlink()
        raise TinyLlavaError(f"{url}: sha256 {got} is not the pinned {sha256}: the download was deleted, not used "
                             f"(the server sent other bytes than the pinned commit's)")
    os.replace(part, dest)
    return dest


def _transfer(url, part, timeout):
    """One HTTP request for the bytes of `url` that `part` does not hold yet, appended to it. -> True once the
    whole file is there (the length the server announced), False if the connection ended early."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-", "User-Agent": "tinyllava"} if have
                                     else {"User-Agent": "tinyllava"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after byte `have`: the earlier run had it all
            return True
        raise
    with response:
        if have and response.status != 206:  # the server ignores Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, \
                bar(total, Path(url).name[:40], "B", unit_scale=True, initial=have) as shown:
            while True:
                try:
                    chunk = response.read(1 << 16)
                except http.client.IncompleteRead as e:
                    f.write(e.partial)
                    return False
                if not chunk:
                    break
                f.write(chunk)
                shown.update(len(chunk))
    return total is None or part.stat().st_size == total


# -- reading a snapshot --------------------------------------------------------------------------------------
def local_kind(path):
    """What a local copy is: 'tarball' (a file), 'git' (a clone or a bare git dir) or 'folder' (unpacked)."""
    path = Path(path)
    if not path.exists():
        raise TinyLlavaError(f"{path}: no such file or folder")
    if path.is_file():
        return "tarball"
    if (path / ".git").exists() or ((path / "HEAD").is_file() and (path / "objects").is_dir()):
        return "git"
    return "folder"


def read_tree(location, snapshot, prefix, size=None):
    """Iterate (path in the repository, bytes) over the files under `prefix` ("data/images/", or one file's
    path) at the snapshot's commit, from a local copy or a downloaded snapshot tarball; `size` (bytes, for the
    progress bar) where known. A copy that lacks the commit or the path is refused, naming both."""
    location, kind = Path(location), local_kind(location)
    if kind == "folder":
        root = location / snapshot.archive_name if (location / snapshot.archive_name).is_dir() else location
        top = root / prefix
        if not top.exists():
            raise TinyLlavaError(f"{location}: no {prefix} in this copy of {snapshot} (a clone, a bare git "
                                 f"directory or an unpacked snapshot of that commit)")
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for p in files:
            yield p.relative_to(root).as_posix(), p.read_bytes()
        return
    if kind == "git":
        if subprocess.run(["git", "-C", str(location), "cat-file", "-e", f"{snapshot.commit}^{{commit}}"],
                          capture_output=True).returncode != 0:
            raise TinyLlavaError(f"{location}: this git copy does not hold commit {snapshot.commit} of "
                                 f"{snapshot.repo} (fetch it, or give another copy)")
        proc = subprocess.Popen(["git", "-C", str(location), "archive", "--format=tar", snapshot.commit, "--",
                                 prefix], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        strip, stream = "", proc.stdout
    else:
        proc, strip, stream = None, snapshot.archive_name + "/", open(location, "rb")
        size = location.stat().st_size
    found = False
    try:
        with stream, bar(size, prefix.rstrip("/").split("/")[-1] or str(snapshot), "B", unit_scale=True) as shown:
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for member in tar:
                        shown.n = stream.tell() if proc is None else shown.n + member.size
                        shown.refresh()
                        if not member.isfile() or not member.name.startswith(strip):
                            continue
                        name = member.name[len(strip):]
                        if name == prefix or (prefix.endswith("/") and name.startswith(prefix)):
                            found = True
                            yield name, tar.extractfile(member).read()
            except (tarfile.TarError, EOFError, OSError) as e:
                if proc is None:
                    raise TinyLlavaError(f"{location}: not a readable snapshot tarball ({e})") from None
                raise
    finally:
        if proc is not None:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0 and not found:
                raise TinyLlavaError(f"{location}: no {prefix} at {snapshot} ({err.splitlines()[-1] if err else 'git failed'})")
    if not found:
        raise TinyLlavaError(f"{location}: no {prefix} in this snapshot of {snapshot}")


def read_file(location, snapshot, path):
    """The bytes of one file of the snapshot, from a local copy or a downloaded tarball."""
    return next(data for _, data in read_tree(location, snapshot, path))


def say(message):
    print(message, file=sys.stderr, flush=True)
