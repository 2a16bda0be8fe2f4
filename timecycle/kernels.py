"""The compiled CPU loop of the propagation engine's shortlist (:mod:`timecycle.propagate`).

It lives apart so that numba is imported, and the loop compiled (about 2.5 s, then
cached), only where it runs: a GPU scores every key in float32 and never needs it.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(fastmath={"reassoc", "contract"}, cache=True)
def dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b in a's float64, summed in any order: the bound on an exact score's error
    (:meth:`timecycle.propagate._Propagator._code_queries`) holds for every order, and
    this one vectorises. Not inlined into :func:`select`: numba would drop the fast-math
    flags with the call, and the sum would run scalar, 8 times slower."""
    total = 0.0
    for c in range(a.shape[0]):
        total += a[c] * b[c]
    return total


@numba.njit(nogil=True, cache=True)
def select(q, feats, absent, approximate, run_bounds, key_errors, weights, theta, reach, run, rows, cols, slots,
           top, left, width, values, keys, first, last):
    """For queries first..last of a tile, the k best exact scores, ``values`` (Q, k)
    filled in place, and their keys' indices into the buffers, ``keys`` (Q, k), among
    the keys that may be among them (see :meth:`timecycle.propagate._Context.exact`,
    whose buffers, block and bounds these are; a run is ``run`` neighbouring keys).

    About 1 run in 100 reaches a query's threshold and a key stays for a few of a
    tile's queries only, so scoring what stays as matrices, or taking the flagged pairs
    apart with tensor ops, costs more in memory traffic and bookkeeping than the float64
    products themselves; one loop does it all, runs outermost so that the keys of a run
    are read once for every query that wants them. Ties keep the key met first.
    Returns how many (key, query) pairs it scored."""
    k, scored = values.shape[1], 0
    bits = np.empty(1, np.uint32)
    approx = bits.view(np.float32)  # a bfloat16 score is the top half of a float32's bits
    for r in range(run_bounds.shape[0]):  # runs are ordered (band, row, slot)
        band, row, slot = r // (rows * slots), r // slots % rows, r % slots
        for i in range(first, last):
            if not run_bounds[r, i] >= theta[i]:
                continue
            for j in range(run):
                col = band * run + j  # within the block
                key = ((top + row) * width + left + col) * slots + slot  # in the buffers
                bits[0] = np.uint32(approximate[((band * rows + row) * run + j) * slots + slot, i]) << 16
                bound = approx[0] + (key_errors[key, 0] * weights[0, i] + key_errors[key, 1] * weights[1, i])
                if reach.shape[0]:
                    bound += reach[row * cols + col, i]
                if not bound >= theta[i]:
                    continue
                score = dot(q[i], feats[key]) + absent[key]
                scored += 1
                m = k - 1
                if not score > values[i, m]:
                    continue
                while m > 0 and values[i, m - 1] < score:
                    values[i, m], keys[i, m] = values[i, m - 1], keys[i, m - 1]
                    m -= 1
                values[i, m], keys[i, m] = score, key
    return scored
