"""Measures how far one float32 run's resident set rises, in a process of its own.

``python tests/_memory_worker.py WHAT`` prints the stated bound, the rise and one vector's size (bytes)
as JSON, or ``{"skip": why}`` where the kernel's high-water mark cannot be reset. The test starts it with malloc's
mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), so every vector is its own mapping, returned to the
kernel when freed: the resident set then follows the live vectors, whatever ran before in a process
(the same measurement inside the test process read 0 to 96 MiB of a 128 to 352 MiB bound on another
machine, after earlier tests had left freed memory resident).
"""

import json
import sys

import torch

from nethessian.linalg._lanczos import eigenvalues
from nethessian.linalg._trace import trace

N = 8_400_000


class _Diagonal:
    """A diagonal operator whose product allocates only its output (``d ⊙ V``)."""

    def __init__(self, d):
        self.d, self.shape, self.dtype, self.device = d, (d.numel(), d.numel()), d.dtype, d.device

    def __matmul__(self, v):
        return self.d * v if v.ndim == 1 else self.d[:, None] * v


def _status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def main(what):
    d = torch.linspace(0.0, 1.0, N)
    d[-2:] = torch.tensor([3.0, 4.0])
    A = _Diagonal(d)
    runs = {
        "hutch++": lambda: trace(A, method="hutch++", num_matvecs=12, chunk_size=1),
        "hutchinson": lambda: trace(A, method="hutchinson", num_matvecs=4, chunk_size=2),
        "eigenvalues": lambda: eigenvalues(A, k=2, ncv=6, tol=1e-3, check_symmetry=False),
    }
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # the high-water mark restarts from the current resident set
    except OSError as err:
        return {"skip": f"the resident-set high-water mark cannot be reset here ({err})"}
    start = _status("VmRSS")
    res = runs[what]()
    return {"bound": res.memory_bytes, "rose": _status("VmHWM") - start, "vector_bytes": N * 4}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
