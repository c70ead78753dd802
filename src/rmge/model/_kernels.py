"""Compiled (numba) kernels of RMGE: thinning, data statistics and sparse inference."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba  # a dependency of scanpy
import numpy as np
import torch


def _njit(**kwargs):
    """``numba.njit`` with an on-disk cache (compiled once per installation) and without the GIL."""
    return numba.njit(cache=True, nogil=True, **kwargs)


_U64 = numba.uint64
_GOLDEN = 0x9E3779B97F4A7C15


@_njit(inline="always")
def _splitmix64(z):  # pragma: no cover - compiled
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


@_njit()
def _seed_state(seed):  # pragma: no cover - compiled
    # xoroshiro128+ state from splitmix64; numba's own generator serves the rare direct draws
    state = np.empty(2, dtype=np.uint64)
    state[0] = _splitmix64(_U64(seed) + _U64(_GOLDEN))
    state[1] = _splitmix64(_U64(seed) + _U64(_GOLDEN) + _U64(_GOLDEN))
    np.random.seed(seed)
    return state


@_njit(inline="always")
def _next(s0, s1):  # pragma: no cover - compiled
    # one step of xoroshiro128+ with the state in two local variables (kept in registers)
    r = s0 + s1
    s1 ^= s0
    s0 = ((s0 << _U64(24)) | (s0 >> _U64(40))) ^ s1 ^ (s1 << _U64(16))
    s1 = (s1 << _U64(37)) | (s1 >> _U64(27))
    return r, s0, s1


@_njit(inline="always")
def _unit(r):  # pragma: no cover - compiled
    # uniform number in [0, 1) from the top 53 bits of a 64-bit draw
    return (r >> _U64(11)) * (1.0 / 9007199254740992.0)


@_njit(inline="always")
def _uniform(state):  # pragma: no cover - compiled
    r, state[0], state[1] = _next(state[0], state[1])
    return _unit(r)


@_njit(inline="always")
def _invert(n, p, pmf, u):  # pragma: no cover - compiled
    # Binomial(n, p) by inversion of the cumulative distribution from k = 0, given pmf = (1 - p)^n and a
    # uniform number u
    if pmf < 1e-300:  # q^n underflows: draw directly
        return float(np.random.binomial(n, p))
    cdf = pmf
    ratio = p / (1.0 - p)
    k = 0
    while u >= cdf and k < n:
        k += 1
        pmf *= (n - k + 1) / k * ratio
        cdf += pmf
    return float(k)


@_njit(inline="always")
def _draw(v, p, state):  # pragma: no cover - compiled
    # Binomial(n = round(v), p) by inversion of the cumulative distribution from k = 0
    if v <= 0.0 or p <= 0.0:
        return 0.0
    n = int(v + 0.5)
    if p >= 1.0:
        return float(n)
    u = _uniform(state)
    if n == 1:
        return 1.0 if u < p else 0.0
    q = 1.0 - p
    if n == 2:
        c0 = q * q
        return 0.0 if u < c0 else (1.0 if u < c0 + 2.0 * p * q else 2.0)
    if n <= 16:
        pmf = q
        for _ in range(n - 1):
            pmf *= q
    else:
        pmf = q**n
    return _invert(n, p, pmf, u)


@_njit(inline="always")
def _draw_fast(v, p, s0, s1):  # pragma: no cover - compiled
    # Binomial(n = round(v), p): for n <= 16 a sum of n Bernoulli draws (two 32-bit uniforms per 64-bit
    # draw, p resolved to 2^-32), which avoids the power and the branches of the inversion; else inversion
    n = int(v + 0.5)
    if n <= 0 or p <= 0.0:
        return 0.0, s0, s1
    if p >= 1.0:
        return float(n), s0, s1
    if n <= 16:
        thr = _U64(np.int64(p * 4294967296.0))
        k = 0
        for t in range(0, n, 2):
            r, s0, s1 = _next(s0, s1)
            k += (r & _U64(0xFFFFFFFF)) < thr
            if t + 1 < n:
                k += (r >> _U64(32)) < thr
        return float(k), s0, s1
    r, s0, s1 = _next(s0, s1)
    return _invert(n, p, (1.0 - p) ** n, _unit(r)), s0, s1


@_njit(inline="always")
def _gather_row(x, i, cols, vals):  # pragma: no cover - compiled
    # the non-zero entries of row i of x into cols and vals, without a data-dependent branch; their number
    m = 0
    for j in range(x.shape[1]):
        v = x[i, j]
        cols[m] = j
        vals[m] = v
        m += v != 0.0
    return m


@_njit(inline="always")
def _thin_values(vals, cols, m, s, factor, s0, s1, thr, words):  # pragma: no cover - compiled
    # the m counts in vals (at columns cols) thinned in place with retention p = min(s * factor[col], 1): a
    # count's first four Bernoulli trials take the four 16-bit uniforms of one 64-bit draw (p resolved to
    # 2^-16), compared without branches; counts above four then take trials five to eight from a second
    # draw, and counts above eight add the rest by _draw_fast. Separate loops over the counts (thresholds,
    # draws, trials) keep each simple; thr and words are scratch arrays of at least m entries
    for t in range(m):
        # through int64: a float to uint64 conversion branches on x86
        thr[t] = np.int64(min(s * factor[cols[t]], 1.0) * 65536.0)
    for t in range(m):
        words[t], s0, s1 = _next(s0, s1)
    for t in range(m):
        n = np.int64(vals[t] + np.float32(0.5))
        r = words[t]
        th = _U64(thr[t])
        k = 0
        for b in range(4):
            k += (((r >> _U64(16 * b)) & _U64(0xFFFF)) < th) & (n > b)
        vals[t] = np.float32(k)
        thr[t] = n  # the count, for the loop below
    for t in range(m):
        n = thr[t]
        if n > 4:
            p = min(s * factor[cols[t]], 1.0)
            th = _U64(np.int64(p * 65536.0))
            r, s0, s1 = _next(s0, s1)
            k = 0
            for b in range(4):
                k += (((r >> _U64(16 * b)) & _U64(0xFFFF)) < th) & (n > b + 4)
            if n > 8:
                extra, s0, s1 = _draw_fast(float(n - 8), p, s0, s1)
                k += int(extra)
            vals[t] += k
    return s0, s1


@_njit(inline="always")
def _depth_scale(vals, cols, m, factor, ref_quantiles, spatial_quantiles, jitter, u):  # pragma: no cover - compiled
    # retention scale of a reference row (as RMGEModule._thin_scale): the spatial library size at the rank of
    # the row's library size among reference cells (jittered by (2u - 1) * jitter), over the row's
    # factor-weighted library size
    lib = 0.0
    weighted = 0.0
    for t in range(m):
        lib += vals[t]
        weighted += vals[t] * factor[cols[t]]
    nq = ref_quantiles.shape[0]
    rank = np.searchsorted(ref_quantiles, np.float32(lib), side="right") / nq + (2.0 * u - 1.0) * jitter
    pos = min(max(rank, 0.0), 1.0) * (nq - 1)
    lo = min(int(np.floor(pos)), nq - 1)
    hi = min(lo + 1, nq - 1)
    frac = pos - lo
    target = spatial_quantiles[lo] * (1.0 - frac) + spatial_quantiles[hi] * frac
    return target / max(weighted, 1e-8)


@_njit()
def _thin_rows(x, scale, factor, rows, seed, out):  # pragma: no cover - compiled
    state = _seed_state(seed)
    s0, s1 = state[0], state[1]
    n_rows, n_cols = x.shape
    cols = np.empty(n_cols, dtype=np.int64)
    vals = np.empty(n_cols, dtype=np.float32)
    thr = np.empty(n_cols, dtype=np.int64)
    words = np.empty(n_cols, dtype=np.uint64)
    for i in range(n_rows):
        if not rows[i]:
            for g in range(n_cols):
                out[i, g] = x[i, g]
            continue
        m = _gather_row(x, i, cols, vals)
        s0, s1 = _thin_values(vals, cols, m, scale[i], factor, s0, s1, thr, words)
        for g in range(n_cols):
            out[i, g] = 0.0
        for t in range(m):
            out[i, cols[t]] = vals[t]


def thin_counts(
    x: torch.Tensor, scale: torch.Tensor, factor: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Binomially thin counts: entry ``(i, g)`` becomes ``Binomial(x[i, g], min(scale[i] * factor[g], 1))``.

    On CPU a compiled kernel (numba) gathers the non-zero counts of a row and draws each as a sum of
    Bernoulli trials: up to eight trials compared without branches against 16-bit uniform numbers
    (xoroshiro128+, four per 64-bit draw; the probability resolved to 2^-16), the trials of counts up
    to 16 against 32-bit ones, and larger counts by inversion of the cumulative distribution. Its seed
    comes from torch's generator, so ``torch.manual_seed`` makes the draws reproducible. Elsewhere
    (GPU), :func:`torch.binomial` draws them.

    Parameters
    ----------
    x
        Counts (cells × genes; non-negative integers stored as floats).
    scale
        Per-cell retention scale (cells).
    factor
        Per-gene retention factor (genes).
    rows
        Boolean mask of the rows to thin (cells); the other rows are copied unchanged. ``None``: all rows.

    Returns
    -------
    Thinned counts, a new tensor of the same shape, dtype and device as ``x``.
    """
    if x.device.type != "cpu" or x.requires_grad or x.dim() != 2:
        p = (scale.unsqueeze(-1) * factor).clamp(0.0, 1.0)
        if rows is None:
            return torch.binomial(x, p.to(x.dtype))
        out = x.clone()
        out[rows] = torch.binomial(x[rows], p[rows].to(x.dtype))
        return out
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    xn = np.ascontiguousarray(x.detach().numpy())
    out = np.empty_like(xn)
    mask = np.ones(xn.shape[0], dtype=np.bool_) if rows is None else np.ascontiguousarray(rows.cpu().numpy())
    _thin_rows(
        xn,
        np.ascontiguousarray(scale.detach().double().numpy()),
        np.ascontiguousarray(factor.detach().double().numpy()),
        mask,
        seed,
        out,
    )
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- training inputs
@_njit(fastmath=True)
def _cosine_rows(
    x, groups, mean, inv_std, zero, zero_sum, zero_sq, standardize, max_z, target_sum, thin_scale, factor,
    ref_quantiles, spatial_quantiles, jitter, drop16, seed, clean_slot, x_norm, x_drop, x_clean, x_sq,
):  # pragma: no cover - compiled  # fmt: skip
    state = _seed_state(seed)
    s0, s1 = state[0], state[1]
    n_rows, n_cols = x.shape
    table = np.empty(256, dtype=np.float32)
    dropout = drop16 > 0
    # 16-bit uniforms of the dropout mask, four from each 64-bit draw
    n_words = (n_cols + 3) // 4 if dropout else 0
    words = np.empty(n_words, dtype=np.uint64)
    u16 = words.view(np.uint16)
    lo, hi = np.float32(-max_z), np.float32(max_z)
    cols = np.empty(n_cols, dtype=np.int64)
    vals = np.empty(n_cols, dtype=np.float32)
    thr = np.empty(n_cols, dtype=np.int64)
    thin_words = np.empty(n_cols, dtype=np.uint64)
    for i in range(n_rows):
        # the row's non-zero counts, thinned where the row has a positive scale; library size, largest count
        m = _gather_row(x, i, cols, vals)
        s_thin = thin_scale[i]
        if s_thin < 0.0:
            r, s0, s1 = _next(s0, s1)
            s_thin = _depth_scale(vals, cols, m, factor, ref_quantiles, spatial_quantiles, jitter, _unit(r))
        if s_thin > 0.0:
            s0, s1 = _thin_values(vals, cols, m, s_thin, factor, s0, s1, thr, thin_words)
        lib = 0.0
        top = np.float32(0.0)
        for t in range(m):
            lib += vals[t]
            top = max(top, vals[t])
        c = target_sum / max(lib, 1.0)
        # log1p(v * c) of the integer counts up to the row's largest (at most 255), looked up in a table
        n_table = min(int(top), 255) + 1
        for k in range(n_table):
            table[k] = np.log1p(k * c)
        g = groups[i]
        # every entry starts at its group's value of a zero count (a copy of one row); the non-zero counts
        # replace theirs, and the row's sum and sum of squares are corrected by the difference
        for j in range(n_cols):
            x_norm[i, j] = zero[g, j]
        s = zero_sum[g]
        ss = zero_sq[g]
        for t in range(m):
            j = cols[t]
            v = vals[t]
            iv = int(v)
            y = table[iv] if (iv == v and iv < n_table) else np.float32(np.log1p(v * c))
            if standardize:
                y = min(max((y - mean[g, j]) * inv_std[g, j], lo), hi)
            y0 = zero[g, j]
            x_norm[i, j] = y
            s += y - y0
            ss += y * y - y0 * y0
        x_sq[i] = ss
        # centre each profile on its mean over genes and divide by the norm of the centred profile; the
        # rescaling of kept entries by 1 / (1 - p) cancels in this division
        r = clean_slot[i]
        if r >= 0:
            mu = s / n_cols
            inv = 1.0 / max(np.sqrt(max(ss - n_cols * mu * mu, 0.0)), 1e-6)
            mu32, inv32 = np.float32(mu), np.float32(inv)
            for j in range(n_cols):
                x_clean[r, j] = (x_norm[i, j] - mu32) * inv32
        if dropout:
            for k in range(n_words):
                words[k], s0, s1 = _next(s0, s1)
            sd = 0.0
            ssd = 0.0
            # separate loops vectorise
            for j in range(n_cols):
                yd = x_norm[i, j] * np.float32(u16[j] >= drop16)
                x_drop[i, j] = yd
                sd += yd
                ssd += yd * yd
            mu = sd / n_cols
            inv = 1.0 / max(np.sqrt(max(ssd - n_cols * mu * mu, 0.0)), 1e-6)
            mu32, inv32 = np.float32(mu), np.float32(inv)
            for j in range(n_cols):
                x_drop[i, j] = (x_drop[i, j] - mu32) * inv32


def cosine_inputs(
    x: torch.Tensor,
    groups: torch.Tensor,
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    *,
    standardize: bool,
    dropout: float,
    clean: bool | torch.Tensor,
    thin_scale: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
    depth: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    seed: int | None = None,
    target_sum: float | None = None,
    max_value: float | None = None,
    defer: bool = False,
):
    """Inputs of the cosine classifier for a dense CPU minibatch of counts, in one compiled pass.

    Computes what :func:`thin_counts`, :meth:`rmge.RMGEModule.normalize` and the input side of
    :meth:`rmge.RMGEModule.encode` compute with several tensor operations each (binomial thinning of
    some rows, normalisation to ``target_sum`` counts, ``log1p`` (looked up in a per-cell table for integer
    counts), standardisation within each cell's group, clipping, input dropout, centring on the mean
    over genes and division by the norm), reading and writing each entry a few times instead of a
    dozen, and drawing the dropout mask with a fast generator (xoroshiro128+, 16-bit uniforms, seeded
    from torch's generator) rather than torch's per-entry Bernoulli draws. On a CPU these element-wise
    steps, not the matrix products, dominate a training step.

    Parameters
    ----------
    x
        Counts (cells × genes), ``float32`` on the CPU.
    groups
        Standardisation group of each cell.
    mean, inv_std
        Per-group means and inverse standard deviations of the genes (groups × genes).
    standardize
        Standardise within the group (else the ``log1p`` values are used).
    dropout
        Input dropout probability (0: none).
    clean
        Also return the profiles without dropout (when ``dropout > 0``): ``True`` for every row, or a
        boolean mask of the rows wanted.
    thin_scale, factor
        Thinning: row ``i`` (where ``thin_scale[i] > 0``) is first thinned as by :func:`thin_counts`
        with retention ``min(thin_scale[i] * factor[j], 1)``; rows with a zero scale are used as they are.
        A negative scale asks for the scale of :meth:`rmge.RMGEModule._thin_scale`, computed here from
        ``depth``. ``None``: no thinning.
    depth
        ``(ref_quantiles, spatial_quantiles, rank_jitter)``: library-size quantiles of the reference and
        spatial cells and the half-width of the rank jitter, for rows with a negative ``thin_scale``.
    seed
        Seed of the draws (thinning, jitter, dropout mask); ``None``: drawn from torch's generator. A
        caller outside the main thread passes its own, so that torch's generator is read in one order.
    target_sum
        Total each cell is scaled to before ``log1p``; ``None``: ``TARGET_SUM`` (10,000).
    max_value
        Magnitude the standardised values are clipped to; ``None``: ``MAX_Z`` (10).
    defer
        Return a function of no arguments that runs the pass and returns its outputs: every array is
        allocated here, by the calling thread, and the function only runs the compiled kernel (without
        the GIL), e.g. in a background thread. Memory then comes and goes in the caller's allocator arena
        (allocating in a second thread's arena and freeing in the first made peak memory jump).

    Returns
    -------
    ``x_norm`` (standardised values, the reconstruction target), the centred and normalised profiles
    with dropout (``None`` without dropout), those without dropout (every row without dropout;
    else the rows ``clean`` asks for, in their order; ``None`` when ``clean`` is ``False``), and the
    squared norm of each row of ``x_norm`` (with ``defer``, a function returning them).

    Notes
    -----
    Each row starts as a copy of its group's standardised zero count; only its non-zero counts (gathered
    first, and thinned there) are transformed, and the row's sum and sum of squares follow from the
    group's by the differences, so the work per row grows with its non-zero counts apart from a few
    passes that vectorise (the copy, the dropout mask, centring and scaling).
    """
    from ._module import MAX_Z, TARGET_SUM

    max_value = MAX_Z if max_value is None else float(max_value)
    xn = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
    n, m = xn.shape
    drop16 = int(round(min(max(dropout, 0.0), 1.0) * 65536))
    if thin_scale is None:
        scale_np, factor_np = np.zeros(n), np.ones(m)
    else:
        scale_np = np.ascontiguousarray(thin_scale.detach().cpu().numpy(), dtype=np.float64)
        factor_np = np.ascontiguousarray(factor.detach().cpu().numpy(), dtype=np.float64)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if drop16 > 0 or thin_scale is not None else 0
    if depth is None:
        rq = sq = np.zeros(1, dtype=np.float32)
        jitter = 0.0
    else:
        rq = np.ascontiguousarray(depth[0].detach().cpu().numpy(), dtype=np.float32)
        sq = np.ascontiguousarray(depth[1].detach().cpu().numpy(), dtype=np.float32)
        jitter = float(depth[2])
    if (scale_np < 0).any() and depth is None:
        raise ValueError("A negative thin_scale asks for the depth-matched scale: pass depth=(quantiles..., jitter).")
    x_norm = np.empty((n, m), dtype=np.float32)
    x_drop = np.empty((n, m), dtype=np.float32) if drop16 > 0 else np.empty((0, 0), dtype=np.float32)
    if drop16 == 0 or (isinstance(clean, bool) and clean):
        slot = np.arange(n, dtype=np.int64)
    elif isinstance(clean, bool):
        slot = np.full(n, -1, dtype=np.int64)
    else:
        mask = np.asarray(clean.cpu().numpy(), dtype=bool).reshape(-1)
        slot = np.where(mask, np.cumsum(mask) - 1, -1).astype(np.int64)
    n_clean = int((slot >= 0).sum())
    want_clean = drop16 == 0 or not isinstance(clean, bool) or clean
    x_clean = np.empty((n_clean, m), dtype=np.float32)
    x_sq = np.empty(n, dtype=np.float32)
    mean_np = np.ascontiguousarray(mean.detach().cpu().numpy(), dtype=np.float32)
    inv_np = np.ascontiguousarray(inv_std.detach().cpu().numpy(), dtype=np.float32)
    # each group's standardised value of a zero count, and the sum and sum of squares of that row
    if standardize:
        zero = np.clip((np.float32(0.0) - mean_np) * inv_np, -max_value, max_value).astype(np.float32)
    else:
        zero = np.zeros_like(mean_np)
    args = (
        xn,
        np.ascontiguousarray(groups.view(-1).cpu().numpy(), dtype=np.int64),
        mean_np,
        inv_np,
        zero,
        zero.sum(1, dtype=np.float64),
        np.square(zero, dtype=np.float64).sum(1),
        bool(standardize),
        max_value,
        float(TARGET_SUM if target_sum is None else target_sum),
        scale_np,
        factor_np,
        rq,
        sq,
        jitter,
        np.uint64(drop16),
        seed,
        slot,
        x_norm,
        x_drop,
        x_clean,
        x_sq,
    )
    outputs = (
        torch.from_numpy(x_norm),
        torch.from_numpy(x_drop) if drop16 > 0 else None,
        torch.from_numpy(x_clean) if want_clean else None,
        torch.from_numpy(x_sq),
    )

    def run():
        _cosine_rows(*args)
        return outputs

    return run if defer else run()


# ----------------------------------------------------------------------------- statistics
@_njit(inline="always")
def _log1p_scaled(v, c, logs):  # pragma: no cover - compiled
    """``log1p(v * c)``, cached in ``logs`` (negative = not yet computed) for small integer counts."""
    iv = int(v)
    if iv == v and iv < 256:
        y = logs[iv]
        if y < 0.0:
            y = np.log1p(v * c)
            logs[iv] = y
        return y
    return np.log1p(v * c)


@_njit()
def _library_proportions(data, indices, indptr, is_ref, lib, prop_sum):  # pragma: no cover - compiled
    for i in range(len(indptr) - 1):
        total = 0.0
        for j in range(indptr[i], indptr[i + 1]):
            total += data[j]
        lib[i] = total
        inv = 1.0 / max(total, 1e-12)
        d = 1 if is_ref[i] else 0
        for j in range(indptr[i], indptr[i + 1]):
            prop_sum[d, indices[j]] += data[j] * inv


@_njit()
def _log_norm_sums(
    data, indices, indptr, groups, slots, labels, target, factor, seed, target_sum, s1, s2, class_sums, class_n, buf
):  # pragma: no cover - compiled
    state = _seed_state(seed)
    logs = np.empty(256)
    for i in range(len(indptr) - 1):
        start, stop = indptr[i], indptr[i + 1]
        t = target[i]
        if t >= 0.0:
            # thin the cell to depth t: retention t / (counts weighted by the gene factors), times the factor
            wlib = 0.0
            for j in range(start, stop):
                wlib += data[j] * factor[indices[j]]
            scale = t / max(wlib, 1e-8)
            for j in range(start, stop):
                buf[j - start] = _draw(float(data[j]), scale * factor[indices[j]], state)
        else:
            for j in range(start, stop):
                buf[j - start] = data[j]
        total = 0.0
        for j in range(stop - start):
            total += buf[j]
        c = target_sum / max(total, 1.0)
        logs[:] = -1.0
        g = groups[i]
        slot = slots[i]
        lab = labels[i]
        for j in range(start, stop):
            v = buf[j - start]
            if v == 0.0:
                continue
            y = _log1p_scaled(v, c, logs)
            col = indices[j]
            s1[g, col] += y
            s2[g, col] += y * y
            if slot >= 0:
                class_sums[slot, lab, col] += y
        if slot >= 0:
            class_n[slot, lab] += 1.0


def library_proportions(block, is_ref: np.ndarray, prop_sum: np.ndarray) -> np.ndarray:
    """Library sizes of a CSR block's rows; adds each row's gene proportions to ``prop_sum[is_ref]``.

    Parameters
    ----------
    block
        CSR matrix of counts.
    is_ref
        Whether each row is a reference cell (row 1 of ``prop_sum``) or not (row 0).
    prop_sum
        ``2 × genes`` sums of gene proportions, updated in place.

    Returns
    -------
    Library size of each row.
    """
    lib = np.empty(block.shape[0])
    _library_proportions(block.data, block.indices, block.indptr, np.ascontiguousarray(is_ref), lib, prop_sum)
    return lib


def log_norm_sums(block, groups, slots, labels, target, factor, rng, sums: dict, target_sum: float) -> None:
    """Add a CSR block's ``log1p(normalize_total(x, target_sum))`` sums per group (and per class) to ``sums``.

    Rows with a non-negative ``target`` are first thinned binomially to that depth (retention
    proportional to ``factor``), as :meth:`RMGEModule.thin` does in training.

    Parameters
    ----------
    block
        CSR matrix of counts.
    groups
        Standardisation group of each row.
    slots
        Index of each row's group among the reference groups (class sums), or -1.
    labels
        Label code of each row (used where ``slots >= 0``).
    target
        Depth each row is thinned to, or -1 (no thinning).
    factor
        Per-gene retention factor.
    rng
        Generator the thinning seed comes from.
    sums
        Arrays ``s1``, ``s2`` (groups × genes), ``class_sums`` (reference groups × labels × genes) and
        ``class_n`` (reference groups × labels), updated in place.
    target_sum
        Total each cell is scaled to before ``log1p`` (the model's ``target_sum``).
    """
    width = int(np.diff(block.indptr).max()) if block.shape[0] else 0
    _log_norm_sums(
        block.data,
        block.indices,
        block.indptr,
        np.ascontiguousarray(groups, dtype=np.int64),
        np.ascontiguousarray(slots, dtype=np.int64),
        np.ascontiguousarray(labels, dtype=np.int64),
        np.ascontiguousarray(target, dtype=np.float64),
        np.ascontiguousarray(factor, dtype=np.float64),
        int(rng.integers(0, 2**31 - 1)),
        float(target_sum),
        sums["s1"],
        sums["s2"],
        sums["class_sums"],
        sums["class_n"],
        np.empty(max(width, 1)),
    )


# ----------------------------------------------------------------------------- sparse inference
@_njit(fastmath=True)
def _encode_rows(
    data, indices, indptr, groups, target_sum, params, weight_t, zero_w, zero_sum, zero_sq, max_z, standardize,
    cosine, w_sum, log_scale, bias, out, n_out, count_depth, evidence,
):  # pragma: no cover - compiled  # fmt: skip
    n_rows = len(indptr) - 1
    n_genes = weight_t.shape[0]
    n_types = out.shape[1]
    # count evidence (when ``evidence`` has rows): sum_g x_g log p_k,g, shifted by its row maximum and scaled
    # by min(1, count_depth / library size), as RMGEModule.count_log_likelihood. The log-profiles sit in
    # ``weight_t``'s columns n_out to 2 n_out, beside the metagenes, so that one row read serves both
    with_evidence = evidence.shape[0] > 0
    acc_ev = np.zeros(n_out, dtype=np.float32)
    # products with the metagenes accumulate in float32 (as the module's own matrix product), in a loop that
    # vectorises; sums and sums of squares of the profile in float64
    acc = np.zeros(n_out, dtype=np.float32)
    table = np.empty(256)  # log1p(v * c) of the integer counts v up to the cell's largest (at most 255)
    for i in range(n_rows):
        start, stop = indptr[i], indptr[i + 1]
        lib = 0.0
        top = 0.0
        for j in range(start, stop):
            lib += data[j]
            top = max(top, data[j])
        c = target_sum / max(lib, 1.0)
        n_table = min(int(top), 255) + 1
        for k in range(n_table):
            table[k] = np.log1p(k * c)
        g = groups[i]
        acc_sum = zero_sum[g]
        acc_sq = zero_sq[g]
        for k in range(n_out):
            acc[k] = 0.0
            acc_ev[k] = 0.0
        for j in range(start, stop):
            v = float(data[j])
            if v == 0.0:
                continue
            iv = int(v)
            y = table[iv] if (iv == v and iv < n_table) else np.log1p(v * c)
            col = indices[j]
            if standardize:
                # params[g, col] = (mean, 1 / std, standardised value of a zero count)
                s = (y - params[g, col, 0]) * params[g, col, 1]
                s = min(max(s, -max_z), max_z)
                b = params[g, col, 2]
            else:
                s = y
                b = 0.0
            d = s - b
            acc_sum += d
            acc_sq += s * s - b * b
            d32 = np.float32(d)
            w = weight_t[col]
            for k in range(n_out):
                acc[k] += d32 * w[k]
            if with_evidence:
                v32 = np.float32(v)
                for k in range(n_out):
                    acc_ev[k] += v32 * w[n_out + k]
        if cosine:
            # centre the profile on its mean over genes, then divide by the norm of the centred profile
            mu = acc_sum / n_genes
            inv = log_scale / max(np.sqrt(max(acc_sq - n_genes * mu * mu, 0.0)), 1e-6)
            for k in range(n_types):
                out[i, k] = (zero_w[g, k] + acc[k] - mu * w_sum[k]) * inv
        else:
            for k in range(n_types):
                out[i, k] = zero_w[g, k] + acc[k] + bias[k]
        if with_evidence:
            top_ev = acc_ev[0]
            for k in range(1, n_types):
                top_ev = max(top_ev, acc_ev[k])
            scale = min(1.0, count_depth / max(lib, 1e-8))
            for k in range(n_types):
                evidence[i, k] = (acc_ev[k] - top_ev) * scale


def sparse_logits(module, block, groups: np.ndarray, evidence: np.ndarray | None = None) -> np.ndarray | None:
    """Metagene activities of a CSR block of counts, computed from its non-zero entries alone.

    Equals ``module.inference(x, group)["z"]`` in evaluation mode (no dropout, no thinning): the
    standardised profile of a cell is its group's value for a zero count plus a correction on its
    non-zero entries, so products with the metagenes, the mean and the norm of the centred profile
    (cosine classifier) all follow from the non-zero entries in one pass. ``None`` when the module
    is not on the CPU.

    Parameters
    ----------
    module
        An :class:`~rmge.RMGEModule`.
    block
        CSR matrix of counts (cells × genes).
    groups
        Standardisation group code of each row.
    evidence
        Optional ``float32`` array (cells × types) that receives the count evidence in the same pass
        (equal to :meth:`RMGEModule.count_log_likelihood` of the block).

    Returns
    -------
    Activities (cells × types, ``float32``) or ``None``.

    Blocks of more than 8,192 rows are split into row ranges computed in parallel, one per torch thread
    (:func:`torch.get_num_threads`).
    """
    if module.encoder.weight.device.type != "cpu":
        return None
    from ._module import unit_rows

    target_sum = float(module.target_sum)
    max_z = float(module.max_value)
    with torch.no_grad():
        w = module.encoder.weight.detach().double()
        cosine = module.classifier != "linear"
        if cosine:
            w = unit_rows(w)
        weight_t = np.ascontiguousarray(w.numpy().T)
        n_groups, n_genes = module.group_mean.shape
        if module.standardize:
            mean = module.group_mean.detach().double().numpy()
            inv_std = 1.0 / module.group_std.detach().double().numpy()
            zero = np.clip(-mean * inv_std, -max_z, max_z)
        else:
            mean = np.zeros((n_groups, n_genes))
            inv_std = np.ones((n_groups, n_genes))
            zero = np.zeros((n_groups, n_genes))
        log_scale = float(module.log_scale.detach().double().exp()) if cosine else 1.0
        bias = module.encoder.bias.detach().double().numpy() if module.encoder.bias is not None else None
    n = block.shape[0]
    n_out = weight_t.shape[1]
    groups = np.ascontiguousarray(groups, dtype=np.int64)
    params = np.ascontiguousarray(np.stack([mean, inv_std, zero], axis=-1))
    # metagenes padded with zero columns to a multiple of 8 (whole SIMD registers in the kernel's inner loop)
    n_pad = -(-n_out // 8) * 8
    # with count evidence, the log-profiles follow the metagenes in each gene's row (one read serves both)
    weight_t32 = np.zeros((n_genes, 2 * n_pad if evidence is not None else n_pad), dtype=np.float32)
    weight_t32[:, :n_out] = weight_t
    if evidence is not None:
        weight_t32[:, n_pad : n_pad + n_out] = module.count_log_profiles.detach().cpu().numpy().T
    zero_w = np.zeros((n_groups, n_pad))
    zero_w[:, :n_out] = zero @ weight_t
    zero_sum, zero_sq = zero.sum(1), (zero**2).sum(1)
    w_sum = weight_t.sum(0)
    bias = np.zeros(n_out) if bias is None else np.ascontiguousarray(bias, dtype=np.float64)
    z = np.empty((n, n_out), dtype=np.float32)
    if evidence is not None:
        count_depth = float(module.count_depth)
    else:
        count_depth = 0.0
        evidence = np.empty((0, n_out), dtype=np.float32)

    def rows(start: int, stop: int) -> None:
        _encode_rows(
            block.data,
            block.indices,
            block.indptr[start : stop + 1],
            groups[start:stop],
            target_sum,
            params,
            weight_t32,
            zero_w,
            zero_sum,
            zero_sq,
            max_z,
            bool(module.standardize),
            cosine,
            w_sum,
            log_scale,
            bias,
            z[start:stop],
            n_pad,
            count_depth,
            evidence[start:stop] if evidence.shape[0] else evidence,
        )

    # the kernel releases the GIL: row ranges run on torch's number of threads
    n_threads = max(1, min(torch.get_num_threads(), n // 4096))
    if n_threads == 1:
        rows(0, n)
    else:
        bounds = np.linspace(0, n, n_threads + 1).astype(int)
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(rows, bounds[:-1], bounds[1:]))
    return z
