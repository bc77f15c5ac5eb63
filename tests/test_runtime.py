"""runtime.py: one place decides the threads (explicit choices win, MPI ranks share, busy cores are left alone,
the decision follows the load), and numba's compiling is timed."""
import subprocess
import sys
import time

import numba
import pytest

from tinyllava import runtime


@pytest.fixture(autouse=True)
def restore():
    state = runtime.THREADS, runtime.DECIDED, runtime.EXPLICIT
    yield
    runtime._apply(state[0])
    runtime.DECIDED, runtime.EXPLICIT = state[1:]


def test_an_explicit_choice_wins_an_mpi_rank_takes_its_share(monkeypatch):
    monkeypatch.setattr(runtime, "cores", lambda: 8)
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda: 3)
    assert runtime.decide({})[0] == 5                                 # 8 cores, 3 busy elsewhere
    assert runtime.decide({"MPI_LOCALNRANKS": "3"})[0] == 2           # an MPI rank's share: 8 // 3
    env = {"MPI_LOCALNRANKS": "3", "OPENBLAS_NUM_THREADS": "1"}       # what the user set wins
    assert runtime.decide(env) == (1, "set in the environment")
    assert runtime.decide({**env, "TINYLLAVA_THREADS": "3"})[0] == 3
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda: 30)
    assert runtime.decide({})[0] == 1                                 # at least one


def test_a_cgroup_quota_caps_the_cores(monkeypatch):
    files = {"/sys/fs/cgroup/cpu.max": "150000 100000\n"}
    monkeypatch.setattr(runtime, "_read", files.get)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert runtime.cores() == 1
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert runtime.cores() == 4
    files.clear()
    files.update({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "300000", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"})
    assert runtime.cores() == 3


def test_a_busy_process_beside_this_one_is_seen():
    """A busy loop in another process counts as one busy core, whatever this process runs."""
    quiet = runtime.busy_elsewhere(looks=9)
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert runtime.busy_elsewhere(looks=9) >= quiet + 1
    finally:
        loop.kill()


def test_adapt_follows_the_load_but_never_an_explicit_choice(monkeypatch):
    busy = [0]
    monkeypatch.setattr(runtime, "numba", None)  # the decisions alone (numba's pool may be smaller than 2 here)
    monkeypatch.setattr(runtime, "explicit_threads", lambda environ=None: None)  # whatever this shell has set
    monkeypatch.setattr(runtime, "cores", lambda: 2)
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda: busy[0])
    monkeypatch.setattr(runtime, "ADAPT_SECONDS", 0.0)
    assert runtime.use_threads() == 2 and not runtime.EXPLICIT
    busy[0] = 1
    assert runtime.adapt() == 1                                       # another job started: one thread
    busy[0] = 0
    assert runtime.adapt() == 2                                       # it ended: both again
    monkeypatch.setattr(runtime, "ADAPT_SECONDS", 3600.0)
    busy[0] = 1
    assert runtime.adapt() == 2                                       # not before ADAPT_SECONDS have passed
    monkeypatch.setattr(runtime, "ADAPT_SECONDS", 0.0)
    assert runtime.use_threads(2) == 2 and runtime.EXPLICIT
    assert runtime.adapt() == 2                                       # chosen by the user: kept


def test_compile_watch_times_compiling_once_nested_and_not_cached_code():
    """generate says when numba compiles (the first run on a machine) and counts that time apart from the answer's."""
    calls = []
    watch = runtime.CompileWatch(lambda: calls.append("first"))
    inner = numba.njit(lambda x: x + 1)      # new functions, not cached: they compile at their first call
    outer = numba.njit(lambda x: inner(x) * 2)  # compiling it compiles inner inside: one outermost compile
    assert outer(1) == 4 and calls == ["first"] and watch.seconds > 0
    once = watch.seconds
    assert outer(2) == 6 and watch.seconds == once  # compiled already: nothing to time
    assert inner(0.5) == 1.5 and watch.seconds > once and calls == ["first"]  # a new type compiles; said once
    watch.close()
    total = watch.seconds
    assert numba.njit(lambda x: x - 1)(1) == 0 and watch.seconds == total  # closed: no longer counting


def test_use_threads_reaches_numba_and_openblas():
    """runtime.use_threads sets numba's threads and those of NumPy's OpenBLAS, together."""
    names = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads")
    get = [getattr(lib, n) for lib in runtime.blas_libraries() for n in names if hasattr(lib, n)]
    before = numba.get_num_threads()
    try:
        runtime.use_threads(1)
        assert numba.get_num_threads() == runtime.THREADS == 1 and get and all(g() == 1 for g in get)
    finally:
        runtime.use_threads(before)
    assert numba.get_num_threads() == runtime.THREADS == before and all(g() == before for g in get)
