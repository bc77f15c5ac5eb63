"""How this process runs: its threads, the memory malloc keeps, and numba's compiling. Process-wide settings, in
one place; the kernels (fused.py, fused_llama.py) read THREADS.

Threads. A decoded token runs ~150 parallel loops and each waits for its slowest thread, so a thread that shares
its core with another busy program stalls every loop (the README measures by how much). The number of threads
for numba's loops and for the OpenBLAS behind NumPy is decided here, once, and set for both together:

  1. an explicit choice wins: use_threads(n) (the tools' -t), else TINYLLAVA_THREADS, else NUMBA_NUM_THREADS or
     OPENBLAS_NUM_THREADS if the user set one;
  2. an MPI rank (mpiexec -n N) takes its share of this machine's cores: cores // ranks on this node;
  3. otherwise the cores this process may use (its CPU affinity, less a cgroup CPU quota) that other processes
     do not keep busy right now (threads running in other processes, the median of a few looks), at least one.

A long job (training, an evaluation, the server) calls adapt() between its steps: at most every ADAPT_SECONDS it
decides again, so that its threads follow the machine's load when another job starts or stops. An explicit
choice is never changed.
"""
import ctypes
import os
import time

try:
    import numba
except ImportError:  # fused.py falls back to NumPy; threads then mean OpenBLAS's alone
    numba = None

THREADS = numba.config.NUMBA_NUM_THREADS if numba else 1  # the threads the products use now (use_threads)
DECIDED = False        # has use_threads run in this process?
EXPLICIT = False       # were THREADS chosen by the user (never changed by adapt)?
ADAPT_SECONDS = 2.0    # how often adapt() looks at the machine again
_last_look = 0.0


# -- how many threads --------------------------------------------------------------------------------------
def cores():
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2/v1 CPU quota if one is set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda s: s.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", lambda s: [s, _read(
                            "/sys/fs/cgroup/cpu/cpu.cfs_period_us")])):
        text = _read(path)
        if text:
            quota, period = parse(text.strip())
            if quota not in ("max", "-1") and period:
                n = min(n, max(1, int(quota) // int(period)))
            break
    return max(1, n)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def busy_elsewhere(looks=5, gap=0.004):
    """Threads of other processes running right now: the machine's running tasks (/proc/loadavg) less this
    process's own, the median of a few looks `gap` seconds apart (a passing shell command is not a busy job).
    Without /proc, the 1-minute load average."""
    seen = []
    for k in range(looks):
        loadavg, mine = _read("/proc/loadavg"), 0
        if loadavg is None:
            return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        try:
            for task in os.listdir("/proc/self/task"):
                stat = _read(f"/proc/self/task/{task}/stat")
                mine += bool(stat) and stat.rsplit(")", 1)[1].split()[0] == "R"
        except OSError:
            pass
        seen.append(int(loadavg.split()[3].split("/")[0]) - mine)
        if k < looks - 1:
            time.sleep(gap)
    return max(0, sorted(seen)[len(seen) // 2])


def mpi_ranks_here(environ=os.environ):
    """Ranks of this MPI job on this machine, from what mpiexec tells each rank (MPICH's hydra, Open MPI), or 1."""
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"):
        if environ.get(name, "").isdigit():
            return max(1, int(environ[name]))
    return 1


def explicit_threads(environ=os.environ):  # -> the user's choice from the environment, or None
    for name in ("TINYLLAVA_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def decide(environ=os.environ):
    """-> (threads, why): what this process should use now, by the rules in the module's docstring."""
    if (n := explicit_threads(environ)) is not None:
        return n, "set in the environment"
    ranks = mpi_ranks_here(environ)
    if ranks > 1:
        return max(1, cores() // ranks), f"its share of {cores()} cores among {ranks} MPI ranks"
    free = cores() - busy_elsewhere()
    return max(1, free), f"{cores()} cores, {cores() - max(1, free)} busy elsewhere"


def threads():
    """The threads the products use, decided at the first call (the library's loaders make it) unless the user
    chose them already. -> the threads now"""
    return THREADS if DECIDED else use_threads()


def use_threads(n=None):
    """Run the products on n threads (an explicit choice, kept), or on what decide() says (adapt() may change
    it later). Sets numba's loops and NumPy's OpenBLAS together. -> the threads now"""
    global DECIDED, EXPLICIT, _last_look
    DECIDED, EXPLICIT = True, n is not None or explicit_threads() is not None
    _apply(n if n is not None else decide()[0])
    _last_look = time.monotonic()
    return THREADS


def adapt():
    """Decide the threads again if ADAPT_SECONDS have passed and the user did not choose them; a long job calls
    this between its steps. -> the threads now"""
    global _last_look
    if EXPLICIT or time.monotonic() - _last_look < ADAPT_SECONDS:
        return THREADS
    _last_look = time.monotonic()
    n = decide()[0]
    if n != THREADS:
        _apply(n)
    return THREADS


def _apply(n):
    global THREADS
    THREADS = min(n, numba.config.NUMBA_NUM_THREADS) if numba else n
    if numba:
        numba.set_num_threads(THREADS)
    for lib in blas_libraries():
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(THREADS))
                break


def blas_libraries():  # -> the OpenBLAS libraries loaded in this process (NumPy's wheels bundle one; Linux)
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return []
    return [ctypes.CDLL(p) for p in sorted(paths)]


# -- memory ------------------------------------------------------------------------------------------------
def keep_freed_memory():
    """Raise glibc's mmap threshold so that NumPy's temporaries (1-3 MB each in a forward pass) come from the
    heap and are reused, instead of each being a fresh mmap that page-faults on every touch and is unmapped when
    freed. Blocks up to 32 MB come from the heap; up to 64 MB of freed heap are kept (Linux/glibc; elsewhere
    nothing happens). The command-line tools call it; importing the package does not."""
    glibc("mallopt", -3, 32 << 20)  # M_MMAP_THRESHOLD
    glibc("mallopt", -1, 64 << 20)  # M_TRIM_THRESHOLD


def trim_memory():
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing happens)."""
    glibc("malloc_trim", 0)


def glibc(name, *args):  # call the C library's function `name` (Linux, glibc); elsewhere nothing happens
    try:
        getattr(ctypes.CDLL(None), name)(*args)
    except (OSError, AttributeError, TypeError):  # not glibc; Windows: CDLL(None) is a TypeError
        pass


# -- compiling ---------------------------------------------------------------------------------------------
class CompileWatch:
    """The seconds numba has spent compiling since this was made (`.seconds`), and a call at the first compile.
    The first run on a machine compiles the loops; later runs load them from numba's cache, which is not
    compiling. numba's TimingListener times the outermost of nested compiles. close() stops it."""

    def __init__(self, on_first=None):
        self._timer = None
        if numba:
            from numba.core import event

            class Timer(event.TimingListener):
                def on_start(self, ev):
                    nonlocal on_first
                    if on_first:
                        on_first()
                        on_first = None
                    super().on_start(ev)

            self._timer = Timer()
            event.register("numba:compile", self._timer)

    @property
    def seconds(self):
        return self._timer.duration if self._timer and self._timer.done else 0.0

    def close(self):
        if self._timer:
            from numba.core import event
            event.unregister("numba:compile", self._timer)
