"""Compiled (numba) kernels of RMGE: thinning, data statistics and sparse inference."""

from __future__ import annotations

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
def _uniform(state):  # pragma: no cover - compiled
    s0, s1 = state[0], state[1]
    r = s0 + s1
    s1 ^= s0
    state[0] = ((s0 << _U64(24)) | (s0 >> _U64(40))) ^ s1 ^ (s1 << _U64(16))
    state[1] = (s1 << _U64(37)) | (s1 >> _U64(27))
    return (r >> _U64(11)) * (1.0 / 9007199254740992.0)


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
    if pmf < 1e-300:  # q^n underflows: draw directly
        return float(np.random.binomial(n, p))
    cdf = pmf
    ratio = p / q
    k = 0
    while u >= cdf and k < n:
        k += 1
        pmf *= (n - k + 1) / k * ratio
        cdf += pmf
    return float(k)


@_njit()
def _thin_rows(x, scale, factor, seed, out):  # pragma: no cover - compiled
    state = _seed_state(seed)
    n_rows, n_cols = x.shape
    for i in range(n_rows):
        s = scale[i]
        for g in range(n_cols):
            v = x[i, g]
            out[i, g] = _draw(v, s * factor[g], state) if v > 0.0 else 0.0


def thin_counts(x: torch.Tensor, scale: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Binomially thin counts: entry ``(i, g)`` becomes ``Binomial(x[i, g], min(scale[i] * factor[g], 1))``.

    On CPU a compiled kernel (numba) walks the counts once, skipping zeros, and draws each entry by
    inversion of the cumulative distribution: one uniform number (xoroshiro128+) per non-zero entry;
    with thinning probabilities of a few percent nearly every draw ends after one or two steps. Its
    seed comes from torch's generator, so ``torch.manual_seed`` makes the draws reproducible.
    Elsewhere (GPU), :func:`torch.binomial` draws them.

    Parameters
    ----------
    x
        Counts (cells × genes; non-negative integers stored as floats).
    scale
        Per-cell retention scale (cells).
    factor
        Per-gene retention factor (genes).

    Returns
    -------
    Thinned counts, same shape, dtype and device as ``x``.
    """
    if x.device.type != "cpu" or x.requires_grad or x.dim() != 2:
        p = (scale.unsqueeze(-1) * factor).clamp(0.0, 1.0)
        return torch.binomial(x, p.to(x.dtype))
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    xn = np.ascontiguousarray(x.detach().numpy())
    out = np.empty_like(xn)
    _thin_rows(
        xn,
        np.ascontiguousarray(scale.detach().double().numpy()),
        np.ascontiguousarray(factor.detach().double().numpy()),
        seed,
        out,
    )
    return torch.from_numpy(out)


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


def log_norm_sums(block, groups, slots, labels, target, factor, rng, sums: dict) -> None:
    """Add a CSR block's ``log1p(normalize_total(x, 1e4))`` sums per group (and per class) to ``sums``.

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
        float(_target_sum()),
        sums["s1"],
        sums["s2"],
        sums["class_sums"],
        sums["class_n"],
        np.empty(max(width, 1)),
    )


def _target_sum() -> float:
    from ._module import TARGET_SUM

    return TARGET_SUM


# ----------------------------------------------------------------------------- sparse inference
@_njit()
def _encode_rows(
    data, indices, indptr, groups, target_sum, params, weight_t, zero_w, zero_sum, zero_sq, max_z, standardize,
    out_w, out_sum, out_sq,
):  # pragma: no cover - compiled  # fmt: skip
    n_rows = len(indptr) - 1
    n_out = weight_t.shape[1]
    acc = np.zeros(n_out)
    logs = np.empty(256)  # log1p(v * c) of the small integer counts v of the current cell
    for i in range(n_rows):
        start, stop = indptr[i], indptr[i + 1]
        lib = 0.0
        for j in range(start, stop):
            lib += data[j]
        c = target_sum / max(lib, 1.0)
        logs[:] = -1.0
        g = groups[i]
        acc_sum = zero_sum[g]
        acc_sq = zero_sq[g]
        for k in range(n_out):
            acc[k] = zero_w[g, k]
        for j in range(start, stop):
            v = float(data[j])
            if v == 0.0:
                continue
            y = _log1p_scaled(v, c, logs)
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
            w = weight_t[col]
            for k in range(n_out):
                acc[k] += d * w[k]
        for k in range(n_out):
            out_w[i, k] = acc[k]
        out_sum[i] = acc_sum
        out_sq[i] = acc_sq


def sparse_logits(module, block, groups: np.ndarray) -> np.ndarray | None:
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

    Returns
    -------
    Activities (cells × types, ``float32``) or ``None``.
    """
    if module.encoder.weight.device.type != "cpu":
        return None
    from ._module import MAX_Z, TARGET_SUM

    with torch.no_grad():
        w = module.encoder.weight.detach().double()
        cosine = module.classifier != "linear"
        if cosine:
            w = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        weight_t = np.ascontiguousarray(w.numpy().T)
        n_groups, n_genes = module.group_mean.shape
        if module.standardize:
            mean = module.group_mean.detach().double().numpy()
            inv_std = 1.0 / module.group_std.detach().double().numpy()
            zero = np.clip(-mean * inv_std, -MAX_Z, MAX_Z)
        else:
            mean = np.zeros((n_groups, n_genes))
            inv_std = np.ones((n_groups, n_genes))
            zero = np.zeros((n_groups, n_genes))
        log_scale = float(module.log_scale.detach().double().exp()) if cosine else 1.0
        bias = module.encoder.bias.detach().double().numpy() if module.encoder.bias is not None else None
    n = block.shape[0]
    out_w = np.empty((n, weight_t.shape[1]))
    out_sum = np.empty(n)
    out_sq = np.empty(n)
    _encode_rows(
        block.data,
        block.indices,
        block.indptr,
        np.ascontiguousarray(groups, dtype=np.int64),
        float(TARGET_SUM),
        np.ascontiguousarray(np.stack([mean, inv_std, zero], axis=-1)),
        weight_t.astype(np.float32),
        np.ascontiguousarray(zero @ weight_t),
        zero.sum(1),
        (zero**2).sum(1),
        float(MAX_Z),
        bool(module.standardize),
        out_w,
        out_sum,
        out_sq,
    )
    if cosine:
        # centre each profile on its mean over genes, then divide by the norm of the centred profile
        mu = out_sum / n_genes
        centred = out_w - mu[:, None] * weight_t.sum(0)[None, :]
        norm = np.sqrt(np.maximum(out_sq - n_genes * mu**2, 0.0))
        z = log_scale * centred / np.maximum(norm, 1e-6)[:, None]
    else:
        z = out_w + (bias if bias is not None else 0.0)
    return z.astype(np.float32)
