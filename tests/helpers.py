"""Helpers several test files share: a small Flickr8k-shaped set of public sources, and an HTTP server standing in
for GitHub (raw files and snapshot tarballs, with Range requests, cut-off transfers and tampered bytes)."""
import gzip
import hashlib
import http.server
import io
import json
import subprocess
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tinyllava.data import Flickr8kSources, Pin
from tinyllava.sources import Snapshot


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout.strip()


def git_repo(folder, files):
    """A git repository at `folder` with `files` ({path: bytes}) in one commit. -> its commit id"""
    folder.mkdir(parents=True)
    git(folder, "init", "-q")
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    git(folder, "add", "-A")
    git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "data")
    return git(folder, "rev-parse", "HEAD")


def snapshot_tarball(repo, snapshot):
    """What GitHub serves for the commit: git archive under NAME-COMMIT/, gzipped. -> bytes"""
    tar = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", f"--prefix={snapshot.archive_name}/",
                          snapshot.commit], check=True, capture_output=True).stdout
    return gzip.compress(tar, mtime=0)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def jpeg(seed):
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 40 % 256, 90, 200 - seed * 10)).save(buf, "JPEG")
    return buf.getvalue()


@dataclass
class Flickr8kLike:
    """Six photos (2 train, 2 dev, 2 test) and one in no split, five captions each, in three git repositories
    laid out as the real sources are; `sources` pins them as data.FLICKR8K pins the real ones."""
    root: Path
    photos: dict = field(default_factory=dict)      # name -> jpeg bytes
    captions: dict = field(default_factory=dict)    # name -> [5 captions]
    splits: dict = field(default_factory=dict)      # split -> [names]
    repos: dict = field(default_factory=dict)       # "images" | "captions" | "splits" -> (folder, Snapshot)
    sources: Flickr8kSources = None

    def __post_init__(self):
        names = [f"{1000 + k}_{k:010x}.jpg" for k in range(7)]
        self.photos = {n: jpeg(k) for k, n in enumerate(names)}
        self.captions = {n: [f"A dog , number {k} , runs .", f'A "quoted" dog {k} .', f"dog {k} plays", f"Dog {k} .",
                             f"The dog {k} sits ."] for k, n in enumerate(names)}
        self.splits = {"train": names[:2], "dev": names[2:4], "test": names[4:6]}  # names[6] is in no split
        csv = "image,caption\n" + "".join(f'{n},"{c.replace(chr(34), 2 * chr(34))}"\n' if ("," in c or '"' in c)
                                          else f"{n},{c}\n" for n, cs in self.captions.items() for c in cs)
        self.files = {
            "images": {f"data/images/{n}": b for n, b in self.photos.items()} | {"README.md": b"images\n"},
            "captions": {"data/ignore_captions.txt": csv.encode(), "data/other.txt": b"x\n"},
            "splits": {f"Flickr8k_text/Flickr_8k.{s}Images.txt": ("\n".join(ns + ["e12_01.jpg"]) + "\n").encode()
                       for s, ns in self.splits.items()}}
        for kind, files in self.files.items():
            commit = git_repo(self.root / kind, files)
            self.repos[kind] = (self.root / kind, Snapshot(f"someone/{kind}-repo", commit))
        self.sources = self.pinned()

    def pinned(self, mirror=None):
        """The pins, computed here from the bytes written (not by the code under test)."""
        snap = {k: Snapshot(s.repo, s.commit, mirror) for k, (_, s) in self.repos.items()}
        listing = "".join(f"{sha256(self.photos[n])}  {n}\n" for n in sorted(self.photos))
        return Flickr8kSources(
            images=Pin(snap["images"], "data/images/", sha256(listing.encode())),
            captions=Pin(snap["captions"], "data/ignore_captions.txt",
                         sha256(self.files["captions"]["data/ignore_captions.txt"])),
            splits={s: Pin(snap["splits"], f"Flickr8k_text/Flickr_8k.{s}Images.txt",
                           sha256(self.files["splits"][f"Flickr8k_text/Flickr_8k.{s}Images.txt"]))
                    for s in self.splits},
            pairs_sha256=sha256(self.pairs_jsonl().encode()), built_sha256=None)

    def pairs_jsonl(self):  # what the build must write, line by line
        split_of = {n: s for s, ns in self.splits.items() for n in ns}
        return "".join(json.dumps({"image": f"images/{n}", "captions": self.captions[n], "split": split_of[n]}) + "\n"
                       for n in sorted(split_of))

    def zips(self, folder):
        """The two archives tutorials download, in their layout. -> (Flickr8k_Dataset.zip, Flickr8k_text.zip)"""
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(folder / "Flickr8k_Dataset.zip", "w") as z:
            for n, b in self.photos.items():
                z.writestr(f"Flicker8k_Dataset/{n}", b)
            z.writestr(f"__MACOSX/Flicker8k_Dataset/._{next(iter(self.photos))}", b"junk")
        with zipfile.ZipFile(folder / "Flickr8k_text.zip", "w") as z:
            z.writestr("Flickr8k.token.txt", "".join(f"{n}#{i}\t{c}\n" for n, cs in self.captions.items()
                                                     for i, c in enumerate(cs)))
            for s, ns in self.splits.items():
                z.writestr(f"Flickr_8k.{s}Images.txt", "\n".join(ns) + "\n")
        return folder / "Flickr8k_Dataset.zip", folder / "Flickr8k_text.zip"

    def serve(self):
        """A GitHub stand-in serving these repositories (raw files, snapshot tarballs). -> FakeGitHub"""
        server = FakeGitHub()
        for kind, (repo, snap) in self.repos.items():
            for path, data in self.files[kind].items():
                server.files[f"/{snap.repo}/{snap.commit}/{path}"] = data
            server.files[f"/{snap.repo}/tar.gz/{snap.commit}"] = snapshot_tarball(repo, snap)
        return server.start()


class FakeGitHub(http.server.ThreadingHTTPServer):
    """Serves `files` ({url path: bytes}) on 127.0.0.1, honouring Range; `cut` ({path: n}) ends the next n
    transfers of a path halfway, as a dropped connection does; `ranges` records the Range headers received."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.cut, self.ranges = {}, {}, []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            self.server.ranges.append((self.path, rng))
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut.get(self.path, 0) > 0:  # a dropped connection: half the bytes, then nothing
            self.server.cut[self.path] -= 1
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
