"""Training on several processes (MPI, parallel.py): the same weights as one process, resuming on another number
of processes, and an error on one rank ending the whole job instead of hanging it."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import steps_logged
from tinyllava.train import load_checkpoint

MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: pip install -e '.[mpi]' (CI installs it)")
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")  # one thread per rank on 2 cores
def train_cmd(ranks, data, cache, out, model, *extra, hosts=None):
    cmd = [sys.executable, "-m", "tinyllava.train", "--data", str(data), "--cache", str(cache), "--out", str(out),
           "--model", str(model), "--batch", "4", "--steps", "12", "--checkpoint-every", "1", "--eval-every", "4",
           "--dev-images", "3", "--captions", "1", "--seed", "2", "--lr", "1e-2", *map(str, extra)]
    return ([MPIEXEC, *(["-f", str(hosts)] if hosts else []), "-n", str(ranks)] if ranks > 1 else []) + cmd


def params(run):
    return load_checkpoint(run / "checkpoint.gguf")[1]


def assert_same(a, b):  # bit for bit: the gradients are summed in float64, exactly, whatever the order
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), (k, np.abs(a[k] - b[k]).max())


@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_train_the_weights_of_one_process(synthetic_data, tiny_decoder, tmp_path, stage):
    data, cache = synthetic_data
    extra = []
    if stage == 2:
        from helpers import instructions_in, stage2_projector
        data = instructions_in(synthetic_data, tmp_path) / "train.json"
        extra = ["--stage", "2", "--init", stage2_projector(tiny_decoder, tmp_path), "--lora-rank", "2"]
    for ranks in (1, 2):
        r = subprocess.run(train_cmd(ranks, data, cache, tmp_path / f"n{ranks}", tiny_decoder, *extra), env=ENV,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    assert_same(params(tmp_path / "n1"), params(tmp_path / "n2"))
    logs = [(tmp_path / f"n{n}" / "log.jsonl").read_text().splitlines() for n in (1, 2)]
    assert len(logs[0]) == len(logs[1]) == 12                       # rank 0 alone writes the log


def test_two_machines_through_a_host_file_as_the_readme_says(synthetic_data, tiny_decoder, tmp_path):
    """The README's several-machine command, the two "machines" being two addresses of this one: MPI treats
    them as two hosts (each rank alone on its node) and talks over TCP."""
    data, cache = synthetic_data
    (tmp_path / "hosts").write_text("localhost:1\n127.0.0.1:1\n")
    for ranks, hosts in ((1, None), (2, tmp_path / "hosts")):
        r = subprocess.run(train_cmd(ranks, data, cache, tmp_path / f"n{ranks}", tiny_decoder, hosts=hosts), env=ENV,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    assert_same(params(tmp_path / "n1"), params(tmp_path / "n2"))


def test_a_killed_job_resumes_on_another_number_of_processes(synthetic_data, tiny_decoder, tmp_path):
    data, cache = synthetic_data
    whole = subprocess.run(train_cmd(1, data, cache, tmp_path / "whole", tiny_decoder), env=ENV, capture_output=True,
                           timeout=600)
    assert whole.returncode == 0
    run = tmp_path / "run"
    for ranks in (2, 1):  # killed on 2 processes, then on 1; finished on 2
        p = subprocess.Popen(train_cmd(ranks, data, cache, run, tiny_decoder), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        before, deadline = steps_logged(run), time.time() + 300
        while p.poll() is None and steps_logged(run) < before + 3 and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)                               # mpiexec and every rank at once
        p.wait(timeout=60)
    r = subprocess.run(train_cmd(2, data, cache, run, tiny_decoder), env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same(params(tmp_path / "whole"), params(run))


def test_an_error_on_one_rank_stops_every_rank(synthetic_data, tiny_decoder, tmp_path):
    """A picture that cannot be read is met by the rank whose share of the feature cache holds it; the others
    wait at the barrier. The job ends at once, with the reason on one line."""
    data, _ = synthetic_data
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    next((bad / "images").iterdir()).write_bytes(b"not a picture")
    t = time.time()
    r = subprocess.run(train_cmd(2, bad, tmp_path / "cache", tmp_path / "run", tiny_decoder), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and time.time() - t < 120
    assert "not a readable image" in r.stderr and "stopping every rank" in r.stderr
    assert "Traceback" not in r.stderr
