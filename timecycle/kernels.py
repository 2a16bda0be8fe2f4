"""The compiled CPU loops of the propagation engine's shortlist (:mod:`timecycle.propagate`).

They live apart so that numba is imported, and the loops compiled (about 10 s on 2
cores, then cached), only where they run: a GPU scores every key in float32 and never
needs them.
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
def seed(q, feats, absent, approximate, reach, chosen, run, rows, cols, slots, top, left, width, values):
    """For query i and run ``chosen[j, i]`` (-1: none) of the block, ``values[i, j]`` =
    the float64 score of the key with the best approximate score among those within
    reach of the query and there, if any. ``approximate`` (Q / W, keys, W): the block's
    scores, bfloat16's bits, W queries at a time."""
    bits = np.empty(1, np.uint32)
    approx = bits.view(np.float32)  # a bfloat16 score is the top half of a float32's bits
    for i in range(chosen.shape[1]):
        scores = approximate[i // approximate.shape[2], :, i % approximate.shape[2]]  # the query's, (keys,)
        for j in range(chosen.shape[0]):
            r = chosen[j, i]
            if r < 0:
                continue
            band, row, slot = r // (rows * slots), r // slots % rows, r % slots
            top_score, key_chosen = -np.inf, -1
            for m in range(run):
                col = band * run + m  # within the block
                key = ((top + row) * width + left + col) * slots + slot  # in the buffers
                if absent[key] != 0 or (reach.shape[0] and reach[row * cols + col, i] != 0):
                    continue
                bits[0] = np.uint32(scores[r * run + m]) << 16
                if approx[0] > top_score:
                    top_score, key_chosen = approx[0], key
            if key_chosen >= 0:
                values[i, j] = dot(q[i], feats[key_chosen])


@numba.njit(nogil=True, cache=True)
def slab_maxima(best, slabs, maxima, which):
    """For the runs' maxima ``best`` (runs, Q) in ``slabs`` slabs of m = runs // slabs
    runs (the rest in none), ``maxima`` (m, n) and ``which`` (m, n) get, for each of the
    first n queries and each slab row r, the highest of the slabs' r-th runs and the
    first of those runs that holds it. Its slabs in one pass: the seeds then read the
    run they search, where they scanned the slabs again at scattered places."""
    m, n = maxima.shape
    for r in range(m):
        out, arg = maxima[r], which[r]
        row = best[r]
        for i in range(n):
            out[i], arg[i] = row[i], r
        for s in range(1, slabs):
            row = best[s * m + r]
            for i in range(n):
                if row[i] > out[i]:
                    out[i], arg[i] = row[i], s * m + r


@numba.njit(nogil=True, fastmath={"nnan"}, cache=True)
def run_maxima(approximate, pieces, run_reach, run, rows, slots, best):
    """``best`` (runs, Q) float32 gets for each piece (band, first row, last row + 1,
    first query, last query + 1, first row held, last row held + 1) of the block each of
    its runs' best score in ``approximate`` (Q / W, keys, W), bfloat16's bits as int16,
    plus ``run_reach`` (band * rows + row, Q) where given (a 0 / -inf bias); -inf in the
    rows that hold no key of the grid, whose scores were not computed. A piece's queries
    lie within one W, so its scores are read as they are stored, and only the pieces'
    scores are read, two thirds of a ring's block. No score is NaN (finite or -inf),
    which lets the maxima vectorise."""
    wide = np.empty(best.shape[1], np.int32)
    floats = wide.view(np.float32)  # a bfloat16 is the top half of a float32's bits
    top = np.empty(best.shape[1], np.float32)
    for p in range(pieces.shape[0]):
        band, lo, hi, q0, q1, held, held_end = pieces[p]
        n = np.uint64(q1 - q0)  # unsigned: no index wraps around, so the loops vectorise
        part, first = q0 // approximate.shape[2], q0 % approximate.shape[2]
        for row in range(lo, hi):
            for slot in range(slots):
                r = (band * rows + row) * slots + slot
                out = best[r, q0:q1]
                if row < held or row >= held_end:
                    out[:] = -np.inf
                    continue
                for j in range(run):
                    scores = approximate[part, r * run + j, first:first + n]
                    for i in range(n):
                        wide[i] = np.int32(scores[i]) << 16
                    if j == 0:
                        for i in range(n):
                            top[i] = floats[i]
                    else:
                        for i in range(n):
                            top[i] = max(top[i], floats[i])
                if run_reach.shape[0]:
                    reach = run_reach[band * rows + row, q0:q1]
                    for i in range(n):
                        out[i] = top[i] + reach[i]
                else:
                    for i in range(n):
                        out[i] = top[i]


@numba.njit(nogil=True, cache=True)
def best_rows(values, rows):
    """``rows`` (m, Q) filled with the rows of ``values`` (R, Q) holding each query's m
    highest values, highest first, the first met of equals; -1 where fewer than m are
    above -inf. Row by row, as the values are stored: most fall below their query's
    m-th best so far at one comparison. torch's top-k along the first dimension took
    0.55 ms a tile for 2k of ResNet-18's 505 slab rows."""
    m, n = rows.shape
    top = np.full((m, n), -np.inf, np.float32)
    floor = np.full(n, -np.inf, np.float32)  # each query's m-th best so far
    for r in range(values.shape[0]):
        row = values[r]
        for i in range(n):
            v = row[i]
            if not v > floor[i]:
                continue
            j = m - 1
            while j > 0 and top[j - 1, i] < v:
                top[j, i], rows[j, i] = top[j - 1, i], rows[j - 1, i]
                j -= 1
            top[j, i], rows[j, i] = v, r
            floor[i] = top[m - 1, i]


@numba.njit(nogil=True, cache=True)
def threshold(v, terms, i, u, slack):
    """The threshold on query i's approximate scores below which no key scores v or more
    exactly (the derivation: :meth:`timecycle.propagate._Propagator._shortlisted`):
    y - u |y| with y = v - (q . c + t) - e64 - e, ``terms`` (3, Q) holding e, e64 and
    q . c + t, less ``slack`` for the float32 roundings in applying it; rounded to
    float32 and finite, so that a key out of reach (bound -inf) never passes."""
    y = v - terms[2, i] - terms[1, i] - terms[0, i]
    t = y - u * abs(y)
    return max(np.float32(t - (abs(t) + 1) * slack), np.finfo(np.float32).min)


@numba.njit(nogil=True, cache=True)
def thresholds(kth, terms, past, u, slack, theta):
    """``theta`` (Q,) filled with each query's :func:`threshold` for a k-th best score
    of at least ``kth`` (Q,); inf, which nothing reaches, for queries ``past`` the grid."""
    for i in range(len(theta)):
        theta[i] = np.inf if past[i] else threshold(kth[i], terms, i, u, slack)


@numba.njit(nogil=True, cache=True)
def select(q, feats, absent, approximate, reach, run_best, run_errors, key_errors, weights, theta, run, rows, cols,
           slots, top, left, width, values, keys, terms, u, slack):
    """For a tile's queries, the k best exact scores, ``values`` (Q, k) filled in
    place, and their keys' indices into the buffers, ``keys`` (Q, k), among the keys
    that may be among them (see :meth:`timecycle.propagate._Propagator._shortlisted`,
    whose buffers, block and bounds these are; a run is ``run`` neighbouring keys;
    ``approximate`` as :func:`seed`'s).
    A run's upper bound is its best approximate score, ``run_best`` (runs, Q), plus its
    keys' largest errors, weighted as a key's are: ``run_errors`` (buffer columns / run,
    buffer rows, S, 3) holds every run's of the buffers, read where the block lies.

    About 1 run in 100 reaches a query's threshold and a key stays for a few of a
    tile's queries only, so scoring what stays as matrices, or taking the flagged pairs
    apart with tensor ops, costs more in memory traffic and bookkeeping than the float64
    products themselves; one loop does it all, runs outermost and then keys, so that a
    key is read once for every query that wants it. A query meets its keys in the same
    order whatever the bounds, and ties keep the key met first. Once a query has k
    scores, their k-th best bounds the final one from below as well as the seeds' did,
    so ``theta`` is raised in place (:func:`threshold` with ``terms``, ``u`` and
    ``slack``) as it rises: 17% fewer pairs scored with either ResNet on DAVIS.
    Returns how many (key, query) pairs it scored."""
    k, scored = values.shape[1], 0
    bits = np.empty(1, np.uint32)
    approx = bits.view(np.float32)
    width_q, flat = approximate.shape[2], approximate.reshape(-1)
    column = np.empty(values.shape[0], np.int64)  # where a query's scores start in flat, a key's W apart
    for i in range(values.shape[0]):  # no division in the loop below: it took a seventh of the time
        column[i] = i // width_q * approximate.shape[1] * width_q + i % width_q
    reached = np.empty(values.shape[0], np.int64)  # the queries whose threshold a run's bound reaches
    queries = np.uint64(values.shape[0])  # unsigned, so no index wraps around: the count vectorises, 10x faster
    bounds = np.empty(values.shape[0], np.float32)
    for r in range(run_best.shape[0]):  # runs are ordered (band, row, slot), their keys innermost
        band, row, slot = r // (rows * slots), r // slots % rows, r % slots
        best, e = run_best[r], run_errors[left // run + band, top + row, slot]
        flagged = 0
        for i in range(queries):  # most runs reach no query's threshold
            bounds[i] = best[i] + (e[0] * weights[0, i] + e[1] * weights[1, i] + e[2] * weights[2, i])
            flagged += bounds[i] >= theta[i]
        if flagged == 0:
            continue
        n = 0
        for i in range(values.shape[0]):
            if bounds[i] >= theta[i]:
                reached[n] = i
                n += 1
        for j in range(run):
            col = band * run + j
            key = ((top + row) * width + left + col) * slots + slot
            errors = key_errors[key]
            for i in reached[:n]:
                bits[0] = np.uint32(flat[column[i] + (r * run + j) * width_q]) << 16
                bound = approx[0] + (errors[0] * weights[0, i] + errors[1] * weights[1, i] + errors[2] * weights[2, i])
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
                if values[i, k - 1] > -np.inf:
                    theta[i] = max(theta[i], threshold(values[i, k - 1], terms, i, u, slack))
    return scored


@numba.njit(nogil=True, cache=True)
def shortlist(queries, weights, terms, past, y0, x0, tile, live, k, temperature, u, slack, slabs, feats, absent,
              labs, key_errors, run_errors, reach, run_reach, pieces, approximate, best, geometry, values, labels):
    """A tile's kept scores / temperature, ``values`` (Q, k), and their keys' labels,
    ``labels`` (Q, k, K), filled in place, from its block's approximate scores in each
    group of context frames; returns how many (key, query) pairs were scored exactly.

    The steps and the bounds are :meth:`timecycle.propagate._Propagator._shortlisted`'s.
    The tile's queries, ``tile`` = (rows, columns) cells from (y0, x0), are read from the
    frame's (H, W, C) queries, (H, W, 3) weights, (3, H, W) terms and (H, W) cells past
    the grid; only the first ``live`` are scored, the rest (past the grid) keep nothing,
    values -inf. Per group (tuples): the buffers' keys (N, C), absent (N,), labels
    (N, K), key errors (N, 3) and run errors (cols / run, rows, S, 3); the block's reach
    (as :func:`select`), the runs' reach and the tile's pieces (as :func:`run_maxima`);
    the block's scores (Q / W, keys, W) as bfloat16's bits, and a (runs, Q) buffer for the
    runs' maxima, -inf but where the pieces reach; and ``geometry`` (groups, 7): run, the
    block's rows and columns, slots, its top-left in the buffers and the buffers' width.
    One call does what a few dozen torch steps a tile did, whose overhead was about a
    tenth of a ResNet-18 frame's thread-seconds."""
    n, groups = live, len(feats)
    q = np.empty((n, queries.shape[2]))
    w = np.empty((3, n), np.float32)
    theta_terms = np.empty((3, n))
    beyond = np.empty(n, np.bool_)
    grow = np.float32(1 + u)
    for i in range(n):
        y, x = y0 + i // tile[1], x0 + i % tile[1]
        for c in range(q.shape[1]):  # element by element: numba's array assignment compiles slowly
            q[i, c] = queries[y, x, c]
        beyond[i] = past[y, x]
        for c in range(3):
            w[c, i] = weights[y, x, c] * grow
            theta_terms[c, i] = terms[c, y, x]
    total = 0
    for g in range(groups):
        run, rows, cols, slots, top, left, width = geometry[g]
        run_maxima(approximate[g].view(np.int16), pieces[g], run_reach[g], run, rows, slots, best[g])
        total += len(best[g]) // slabs
    # Each group's runs in slabs: the best runs of 2k slab rows are 2k distinct runs.
    maxima = np.empty((total, n), np.float32)
    which = np.empty((total, n), np.int64)  # the run of each group that holds a slab row's maximum
    start = 0
    for g in range(groups):
        m = len(best[g]) // slabs
        slab_maxima(best[g], slabs, maxima[start:start + m], which[start:start + m])
        start += m
    rows_seen = np.full((min(2 * k, total), n), -1, np.int64)
    best_rows(maxima, rows_seen)
    seeds = np.full((n, len(rows_seen)), -np.inf)
    start = 0
    for g in range(groups):
        run, rows, cols, slots, top, left, width = geometry[g]
        m = len(best[g]) // slabs
        chosen = np.full(rows_seen.shape, -1, np.int64)  # the group's runs, -1 for the others'
        for j in range(chosen.shape[0]):
            for i in range(n):
                if start <= rows_seen[j, i] < start + m:
                    chosen[j, i] = which[rows_seen[j, i], i]
        seed(q, feats[g], absent[g], approximate[g], reach[g], chosen, run, rows, cols, slots, top, left, width,
             seeds)
        start += m
    kth = np.full(n, -np.inf)  # each query's k-th best seed
    if seeds.shape[1] >= k:
        kept = np.empty(k)
        for i in range(n):
            kept[:] = -np.inf  # the k best so far, best first
            for v in seeds[i]:
                j = k - 1
                if not v > kept[j]:
                    continue
                while j > 0 and kept[j - 1] < v:
                    kept[j] = kept[j - 1]
                    j -= 1
                kept[j] = v
            kth[i] = kept[k - 1]
    theta = np.empty(n, np.float32)
    thresholds(kth, theta_terms, beyond, u, slack, theta)
    found = np.full((groups, n, k), -np.inf)
    keys = np.zeros((groups, n, k), np.int64)
    scored = 0
    # The last group first: the ring's recent frames hold most of the best keys, so the
    # threshold they raise rules out more of the first frame's: 3% fewer pairs scored,
    # a ResNet-18 frame 1.5% faster, the same results (equal scores are merged below in
    # group order, whatever the order here).
    for g in range(groups - 1, -1, -1):
        run, rows, cols, slots, top, left, width = geometry[g]
        scored += select(q, feats[g], absent[g], approximate[g], reach[g], best[g], run_errors[g], key_errors[g], w,
                         theta, run, rows, cols, slots, top, left, width, found[g], keys[g], theta_terms, u, slack)
    # The groups' k best, merged: the first group's first of equals.
    at = np.zeros(groups, np.int64)
    for i in range(n):
        at[:] = 0
        for j in range(k):
            g = 0
            for h in range(1, groups):
                if found[h, i, at[h]] > found[g, i, at[g]]:
                    g = h
            values[i, j] = found[g, i, at[g]] / temperature
            label = labs[g][keys[g, i, at[g]]]
            for c in range(labels.shape[2]):
                labels[i, j, c] = label[c]
            at[g] += 1
    values[n:] = -np.inf
    labels[n:] = 0
    return scored
