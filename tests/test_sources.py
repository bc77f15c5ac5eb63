"""Pinned public sources: downloads that resume and refuse other bytes; snapshots read from every kind of copy."""
import subprocess

import pytest

from helpers import FakeGitHub, git_repo, sha256, snapshot_tarball
from tinyllava.errors import TinyLlavaError
from tinyllava.sources import Snapshot, download, local_kind, read_file, read_tree


@pytest.fixture
def server():
    s = FakeGitHub().start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr("tinyllava.sources.time.sleep", lambda s: None)


def test_a_download_resumes_where_it_was_cut_and_is_checked(server, tmp_path):
    data = bytes(range(256)) * 4000
    server.files["/f"] = data
    server.cut["/f"] = 1
    path = download(server.url + "/f", tmp_path / "f", sha256(data))
    assert path.read_bytes() == data and server.ranges == [("/f", f"bytes={len(data) // 2}-")]
    assert download(server.url + "/f", tmp_path / "f", sha256(data)) == path  # there and verified: not fetched
    assert len(server.ranges) == 1


def test_a_part_the_server_already_finished_and_a_server_that_ignores_range(server, tmp_path):
    data = b"0123456789" * 100
    server.files["/f"] = data
    (tmp_path / "f.part").write_bytes(data)                 # the earlier run had it all: 416, kept as it is
    assert download(server.url + "/f", tmp_path / "f", sha256(data)).read_bytes() == data
    (tmp_path / "g.part").write_bytes(b"garbage that is not the start of the file")
    server.files["/g"] = data

    class NoRange(server.RequestHandlerClass):              # answers 200 with the whole file to a Range request
        def do_GET(self):
            self.headers.replace_header("Range", "bytes=0-") if "Range" in self.headers else None
            super().do_GET()
    server.RequestHandlerClass = NoRange
    assert download(server.url + "/g", tmp_path / "g", sha256(data)).read_bytes() == data  # started over


def test_wrong_bytes_are_deleted_and_refused_a_missing_file_is_not_retried(server, tmp_path):
    server.files["/f"] = b"not what was pinned"
    with pytest.raises(TinyLlavaError, match=r"/f: sha256 [0-9a-f]{64} is not the pinned 0{64}.*deleted"):
        download(server.url + "/f", tmp_path / "f", "0" * 64)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "g").write_bytes(b"an earlier download, damaged")  # there but wrong: fetched again
    server.files["/g"] = b"good"
    assert download(server.url + "/g", tmp_path / "g", sha256(b"good")).read_bytes() == b"good"
    with pytest.raises(TinyLlavaError, match="HTTP 404"):
        download(server.url + "/missing", tmp_path / "m")
    assert server.ranges == []


def test_every_kind_of_local_copy_reads_the_pinned_commit(tmp_path):
    repo = tmp_path / "repo"
    commit = git_repo(repo, {"data/a.txt": b"a", "data/sub/b.txt": b"b", "other.txt": b"o"})
    snap = Snapshot("someone/repo", commit)
    (repo / "data" / "a.txt").write_bytes(b"changed after the commit")  # a clone is read at the commit
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    tarball = tmp_path / "snap.tar.gz"
    tarball.write_bytes(snapshot_tarball(repo, snap))
    unpacked = tmp_path / "unpacked"
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(tmp_path)], check=True)
    (tmp_path / snap.archive_name).rename(unpacked)
    for copy, kind in ((repo, "git"), (bare, "git"), (tarball, "tarball"), (unpacked, "folder"), (tmp_path, "folder")):
        assert local_kind(copy) == kind
        if copy != tmp_path:  # the folder that holds NAME-COMMIT/ is a copy too, once it is there
            assert dict(read_tree(copy, snap, "data/")) == {"data/a.txt": b"a", "data/sub/b.txt": b"b"}, copy
            assert read_file(copy, snap, "other.txt") == b"o"
            with pytest.raises(TinyLlavaError, match="no data/c.txt"):
                read_file(copy, snap, "data/c.txt")
    with pytest.raises(TinyLlavaError, match="does not hold commit"):
        list(read_tree(repo, Snapshot("someone/repo", "f" * 40), "data/"))
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(TinyLlavaError, match="not a readable snapshot tarball"):
        list(read_tree(tmp_path / "broken.tar.gz", snap, "data/"))
