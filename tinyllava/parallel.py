"""Training on several processes, on one machine or many: data parallelism over MPI.

    mpiexec -n 2 python -m tinyllava.train ...                  # the same flags as one process
    mpiexec -f hosts -n 8 python -m tinyllava.train ...         # several machines (hosts: a "name:processes" line each)

Every process (a rank) holds the whole model. Each step takes the images one process would take; rank r works on
images r, r+N, r+2N, ... of them, by the same forward and backward, and one Allreduce sums the gradients, the
loss and the token counts over the ranks, so that every rank takes the same AdamW step and the weights stay
the same everywhere. Rank 0 alone writes the log, the checkpoints and the weights. Without mpiexec (no PMI_RANK
or OMPI_COMM_WORLD_RANK in the environment) mpi4py is never imported: one process needs no MPI installed.
"""
import os
import sys
from contextlib import contextmanager

import numpy as np

from .errors import TinyLlavaError

LAUNCHER_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")  # set by mpiexec (MPICH, PMIx, Open MPI)


class World:
    """The processes of a run: rank, size, and the few collective operations training needs."""

    def __init__(self):
        self.comm, self.rank, self.size = None, 0, 1
        if any(v in os.environ for v in LAUNCHER_VARIABLES):
            try:
                from mpi4py import MPI
            except ImportError:
                raise TinyLlavaError("started by mpiexec, but mpi4py is missing: pip install -e \".[mpi]\"") from None
            self.comm, self.rank, self.size = MPI.COMM_WORLD, MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size

    def share(self, items):  # this rank's part of a list: items r, r + N, r + 2N, ...
        return items[self.rank::self.size]

    def sum(self, arrays, *numbers):
        """Sum {name: array} and some numbers over the ranks (one Allreduce of one buffer, float64 for the
        numbers). -> ({name: summed array}, summed numbers...). On one process: what it was given."""
        if self.comm is None:
            return (arrays, *numbers)
        names = sorted(arrays)
        flat = np.concatenate([np.ravel(arrays[k]).astype(np.float64) for k in names] + [np.array(numbers, float)])
        from mpi4py import MPI
        self.comm.Allreduce(MPI.IN_PLACE, flat)
        out, at = {}, 0
        for k in names:
            out[k] = flat[at:at + arrays[k].size].reshape(arrays[k].shape).astype(arrays[k].dtype)
            at += arrays[k].size
        return (out, *flat[at:].tolist())

    def barrier(self):
        if self.comm is not None:
            self.comm.Barrier()

    @contextmanager
    def stop_all_on_error(self, prog):
        """An error on one rank would leave the others waiting in the next Allreduce for ever: print it, then
        end every rank (MPI_Abort), with status 2 for bad input, 1 for anything else."""
        try:
            yield
        except BaseException as e:  # noqa: BLE001 (the others must not hang, whatever it was)
            if self.comm is None or isinstance(e, SystemExit) and not e.code:
                raise
            code = 2 if isinstance(e, (TinyLlavaError, SystemExit)) else 1
            message = "" if isinstance(e, SystemExit) else f": {e}" if isinstance(e, TinyLlavaError) else \
                f": {type(e).__name__}: {e}"
            print(f"{prog}: rank {self.rank} of {self.size} stopped{message}; stopping every rank", file=sys.stderr,
                  flush=True)
            self.comm.Abort(code)
