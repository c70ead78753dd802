"""Checks of user input that raise errors naming the problem and its fix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from rmge._constants import COUNTS, LOG_NORMALIZED, NORMALIZED


def _values(X) -> np.ndarray:
    """Stored values of a dense or sparse matrix (no densification of sparse data)."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def csr_row_view(X: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a CSR matrix as a view on its arrays (read it, never modify it).

    Slicing copies the rows, and so does scipy's constructor for index and data arrays that are views
    of less than half their base (its ``prune`` step): the arrays are set on an empty matrix instead.
    """
    lo, hi = X.indptr[start], X.indptr[stop]
    view = sp.csr_matrix((stop - start, X.shape[1]), dtype=X.dtype)
    view.data, view.indices, view.indptr = X.data[lo:hi], X.indices[lo:hi], X.indptr[start : stop + 1] - lo
    return view


def _iter_row_blocks(X, block_size: int = 20_000):
    """Yield row blocks of ``X`` (works for dense, sparse and backed h5py-like matrices)."""
    n = X.shape[0]
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        if sp.issparse(X) and X.format == "csr":
            yield csr_row_view(X, start, stop)
        else:
            yield X[start:stop]


def check_nonnegative_finite(X, what: str = "data") -> None:
    """Raise ``ValueError`` if ``X`` holds negative or non-finite values.

    Parameters
    ----------
    X
        Dense or sparse matrix.
    what
        Name of the matrix used in the error message.
    """
    for block in _iter_row_blocks(X):
        v = _values(block)
        if v.size == 0:
            continue
        if not np.all(np.isfinite(v)):
            n_bad = int((~np.isfinite(v)).sum())
            raise ValueError(
                f"{what} holds {n_bad} non-finite value(s) (NaN or inf). Remove or replace them "
                "(e.g. `X.data[~np.isfinite(X.data)] = 0`) before using rmge."
            )
        if v.min() < 0:
            raise ValueError(
                f"{what} holds negative values (min {v.min():.3g}); rmge needs non-negative counts. "
                "Scaled or centred data (e.g. after `sc.pp.scale`) cannot be used: pass raw counts, "
                "for example from `adata.layers['counts']` or `adata.raw`."
            )


def detect_value_kind(X, n_sample: int = 2_000, seed: int = 0) -> str:
    """Tell whether a matrix holds raw counts, normalised values or log-normalised values.

    The guess is made on a random sample of rows: integer values mean counts; non-integer
    values whose maximum stays below 20 look like ``log1p`` of normalised data; other
    non-integer values are taken as normalised (e.g. ``normalize_total`` output or gene
    activity scores).

    Parameters
    ----------
    X
        Dense or sparse matrix (cells × genes).
    n_sample
        Number of rows inspected.
    seed
        Seed of the row sample.

    Returns
    -------
    One of ``"counts"``, ``"normalized"``, ``"log_normalized"``.
    """
    n = X.shape[0]
    if n == 0:
        return COUNTS
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, n_sample), replace=False))
    v = _values(X[rows])
    v = v[v != 0]
    if v.size == 0:
        return COUNTS
    if np.allclose(v, np.round(v), atol=1e-6):
        return COUNTS
    if v.max() < 20:
        return LOG_NORMALIZED
    return NORMALIZED
