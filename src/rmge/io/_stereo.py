"""Readers of Stereo-seq output (SAW pipeline): GEM text files and GEF (HDF5) files.

Stereo-seq measures expression on a grid of DNB spots (500 nm pitch). The readers sum the
counts of the spots into square bins of ``bin_size`` spots, or into segmented cells, and return an
:class:`~anndata.AnnData` with sparse counts.

Bin convention (the same for GEM and GEF input): a spot at coordinates ``(x, y)``, as written in the
file, falls into the bin ``(floor(x / bin_size), floor(y / bin_size))``. The coordinates in SAW files
are already relative to the chip offset (``#OffsetX``/``#OffsetY`` in the GEM header), so this is the
grid SAW and stereopy use, and a bin never depends on which spots happen to be present. The centre of
bin ``b`` is ``b * bin_size + (bin_size - 1) / 2`` (the mean coordinate of the spots it covers; for
``bin_size=1`` it is the spot itself).

The GEF files are read with :mod:`h5py` rather than with ``gefpy``/``stereopy`` or ``spatialdata-io``:
those readers pull in compiled extensions (geftools, OpenCV) and large dependency trees, while the GEF
layout is a few plain HDF5 compound datasets that h5py reads directly. The GEM reader is written here
because no lightweight library streams GEM files: stereopy loads the whole table into memory, which is
not possible for whole-chip files of 10^8 lines.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["read_stereo_seq", "read_gem", "read_gef"]

#: Values of ``bin_size`` that ask for one observation per segmented cell.
CELLBIN_ALIASES = ("cellbin", "cell_bins", "cell")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_GZIP_MAGIC = b"\x1f\x8b"
_GEM_SUFFIXES = (".gem", ".gem.gz", ".txt", ".txt.gz", ".tsv", ".tsv.gz")
_GEF_SUFFIXES = (".gef", ".bgef", ".cgef", ".h5")

# Accepted spellings of the GEM columns (compared case-insensitively), first one is canonical.
_GENE_COLUMNS = ("geneID", "gene_id", "gene")
_GENE_NAME_COLUMNS = ("geneName", "gene_name")
_COUNT_COLUMNS = ("MIDCount", "MIDCounts", "UMICount", "UMICounts", "MIDcount", "count", "counts")
_CELL_COLUMNS = ("CellID", "cell_id", "cellID", "label")

_Y_SHIFT = np.int64(2**31)  # shifts y to non-negative so that (x, y) packs into one int64 key
_LOW32 = np.int64(0xFFFFFFFF)


# --------------------------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------------------------- #
def _check_path(path) -> Path:
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Stereo-seq file not found: '{path}'. Check the path (absolute: '{path.resolve()}').")
    if path.is_dir():
        raise IsADirectoryError(
            f"'{path}' is a folder; pass the GEM (.gem/.gem.gz) or GEF (.gef) file inside it, "
            "e.g. the file in SAW's 'GeneExpMatrix' or 'count' output folder."
        )
    return path


def _is_cellbin(bin_size) -> bool:
    return isinstance(bin_size, str) and bin_size.lower() in CELLBIN_ALIASES


def _check_bin_size(bin_size) -> int | str:
    """Return a validated bin size: a positive ``int`` or the string ``"cellbin"``."""
    if isinstance(bin_size, str):
        if _is_cellbin(bin_size):
            return "cellbin"
        raise ValueError(
            f"bin_size={bin_size!r} is not understood: pass a positive integer (number of DNB spots per bin "
            f"side, e.g. 50) or 'cellbin' for one observation per segmented cell."
        )
    if isinstance(bin_size, bool) or not isinstance(bin_size, int | np.integer):
        if isinstance(bin_size, float | np.floating) and float(bin_size).is_integer() and bin_size > 0:
            return int(bin_size)
        raise ValueError(f"bin_size must be a positive integer or 'cellbin', got {bin_size!r}.")
    if bin_size <= 0:
        raise ValueError(f"bin_size must be a positive integer (DNB spots per bin side, e.g. 50), got {bin_size}.")
    return int(bin_size)


def _pack_xy(bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Pack two int arrays (each within +-2**31) into one sortable int64 key."""
    return (bx.astype(np.int64) << 32) | (by.astype(np.int64) + _Y_SHIFT)


def _unpack_xy(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return keys >> 32, (keys & _LOW32) - _Y_SHIFT


def _decode(values) -> np.ndarray:
    """Decode fixed-width HDF5 byte strings into a str array."""
    out = []
    for v in np.asarray(values).ravel():
        if isinstance(v, bytes | np.bytes_):
            v = v.decode("utf-8", errors="replace")
        out.append(str(v).rstrip("\x00").strip())
    return np.asarray(out, dtype=object)


class _Accumulator:
    """Sum counts by (observation key, gene) over many chunks; memory follows the result's nnz.

    Keys (packed bin coordinates or cell numbers) get a row number on first sight through a hash
    index. The (row, gene, count) triplets of the incoming chunks wait in a buffer that is folded into
    a running CSR matrix (scipy sums duplicate entries in compiled code) whenever it grows as large as
    that matrix, so the buffer never exceeds the matrix's nnz (or ``min_fold``) and the total work stays
    proportional to the number of lines.
    """

    def __init__(self, min_fold: int = 1_000_000):
        self._known = pd.Index(np.zeros(0, dtype=np.int64))
        self._X = sp.csr_matrix((0, 0), dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_pending = 0
        self._min_fold = min_fold

    def _rows(self, keys: np.ndarray) -> np.ndarray:
        codes, uniques = pd.factorize(keys)
        pos = self._known.get_indexer(uniques)
        new = pos < 0
        if new.any():
            pos[new] = len(self._known) + np.arange(int(new.sum()))
            self._known = self._known.append(pd.Index(np.asarray(uniques)[new]))
        return pos[codes]

    def add(self, keys: np.ndarray, genes: np.ndarray, counts: np.ndarray, n_genes: int) -> None:
        if keys.size == 0:
            return
        rows = self._rows(np.asarray(keys, dtype=np.int64))
        # int32 triplets halve the buffer; rows, genes and per-line counts stay far below 2**31.
        small = len(self._known) < 2**31 and n_genes < 2**31 and int(np.max(counts)) < 2**31
        itype = np.int32 if small else np.int64
        self._pending.append((rows.astype(itype), np.asarray(genes).astype(itype), np.asarray(counts).astype(itype)))
        self._n_pending += keys.size
        if self._n_pending >= max(self._min_fold, self._X.nnz):
            self._fold(n_genes)

    def _fold(self, n_genes: int) -> None:
        shape = (len(self._known), n_genes)
        X = self._X
        X.resize(shape)
        if self._pending:
            rows, genes, counts = (np.concatenate(parts) for parts in zip(*self._pending, strict=True))
            self._pending, self._n_pending = [], 0
            # COO -> CSR sums the duplicate (row, gene) entries.
            X = X + sp.csr_matrix((counts.astype(np.int64), (rows, genes)), shape=shape)
        self._X = X

    def result(self, n_genes: int) -> tuple[np.ndarray, sp.csr_matrix]:
        """Return the sorted unique keys and the keys x genes CSR matrix (int64 counts)."""
        self._fold(n_genes)
        keys = np.asarray(self._known, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        return keys[order], self._X[order]


def _finish_matrix(X: sp.csr_matrix, dtype) -> sp.csr_matrix:
    X = X.tocsr()
    X.sum_duplicates()
    X.eliminate_zeros()
    X.sort_indices()
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and X.nnz and X.data.max() > 2 ** (np.finfo(dtype).nmant + 1):
        warnings.warn(
            f"Some summed counts exceed {2 ** (np.finfo(dtype).nmant + 1)} and are not exact in {dtype}; "
            "pass dtype=np.float64 or np.int64 to keep them exact.",
            UserWarning,
            stacklevel=3,
        )
    return X.astype(dtype)


def _unique_var_names(names: np.ndarray) -> tuple[pd.Index, bool]:
    idx = pd.Index(np.asarray(names, dtype=object).astype(str))
    if idx.is_unique:
        return idx, False
    dup = idx[idx.duplicated()].unique()
    warnings.warn(
        f"{len(dup)} gene name(s) occur more than once (e.g. {', '.join(map(str, dup[:5]))}); they are kept as "
        "separate columns and made unique by appending '-1', '-2', ... (original names in var['gene_id']).",
        UserWarning,
        stacklevel=3,
    )
    return pd.Index(ad.utils.make_index_unique(idx)), True


def _build_anndata(
    X: sp.csr_matrix,
    obs: pd.DataFrame,
    spatial: np.ndarray,
    gene_ids: np.ndarray,
    gene_names: np.ndarray | None,
    uns: dict,
) -> ad.AnnData:
    var_names, made_unique = _unique_var_names(gene_ids)
    var = pd.DataFrame(index=var_names)
    if made_unique:
        var["gene_id"] = np.asarray(gene_ids, dtype=object).astype(str)
    if gene_names is not None:
        var["gene_name"] = np.asarray(gene_names, dtype=object).astype(str)
    obs = obs.copy()
    obs["total_counts"] = np.asarray(X.sum(axis=1)).ravel().astype(np.int64)
    obs["n_genes"] = np.diff(X.indptr).astype(np.int64)
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = np.asarray(spatial, dtype=np.float64)
    adata.uns["stereo_seq"] = uns
    return adata


def _square_bin_obs(keys: np.ndarray, bin_size: int) -> tuple[pd.DataFrame, np.ndarray]:
    bx, by = _unpack_xy(keys)
    names = pd.Index(bx.astype(str).astype(object) + "_" + by.astype(str).astype(object))
    obs = pd.DataFrame({"bin_x": bx.astype(np.int64), "bin_y": by.astype(np.int64)}, index=names)
    half = (bin_size - 1) / 2.0
    spatial = np.column_stack([bx * bin_size + half, by * bin_size + half]).astype(np.float64)
    return obs, spatial


# --------------------------------------------------------------------------------------------- #
# GEM
# --------------------------------------------------------------------------------------------- #
def _open_text(path: Path, gz: bool):
    return gzip.open(path, "rt", encoding="utf-8", errors="replace") if gz else open(path, encoding="utf-8")


def _read_gem_header(path: Path, gz: bool, sep: str) -> tuple[dict[str, str], int, list[str]]:
    """Parse the ``#key=value`` lines and the column-name line of a GEM file."""
    meta: dict[str, str] = {}
    n_comment = 0
    columns: list[str] | None = None
    with _open_text(path, gz) as fh:
        for line in fh:
            stripped = line.strip()
            if stripped.startswith("#"):
                n_comment += 1
                body = stripped.lstrip("#").strip()
                if "=" in body:
                    key, value = body.split("=", 1)
                    meta[key.strip()] = value.strip()
                continue
            if not stripped:
                n_comment += 1
                continue
            columns = [c.strip() for c in line.rstrip("\r\n").split(sep)]
            break
    if columns is None:
        raise ValueError(f"'{path}' holds no GEM table: no column-name line was found after the '#' header lines.")
    return meta, n_comment, columns


def _find_column(columns: Iterable[str], aliases: Iterable[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    for alias in aliases:
        if alias.lower() in lower:
            return lower[alias.lower()]
    return None


def _int_header(meta: dict[str, str], key: str) -> int:
    try:
        return int(float(meta.get(key, 0)))
    except ValueError:
        return 0


def _check_chunk_numeric(values: pd.Series, what: str, first_line: int) -> np.ndarray:
    """Check a numeric GEM column of one chunk (integers, no missing values) and return it as int64."""
    arr = values.to_numpy()
    if arr.dtype.kind not in "iuf":
        coerced = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(np.isnan(coerced))
        if bad.size:
            pos = int(bad[0])
            raise ValueError(
                f"Column '{values.name}' ({what}) must hold integers, but line {first_line + pos} holds "
                f"{values.iloc[pos]!r}. Check that the file is an unmodified SAW GEM file."
            )
        arr = coerced
    if arr.dtype.kind == "f":
        nan = np.isnan(arr)
        if nan.any():
            pos = int(np.flatnonzero(nan)[0])
            raise ValueError(
                f"Column '{values.name}' ({what}) has a missing value on line {first_line + pos}; "
                "remove incomplete lines from the file."
            )
        frac = arr != np.round(arr)
        if frac.any():
            pos = int(np.flatnonzero(frac)[0])
            raise ValueError(
                f"Column '{values.name}' ({what}) must hold integers, but line {first_line + pos} holds "
                f"{float(arr[pos])!r}. Stereo-seq counts and DNB coordinates are whole numbers; pass raw SAW output."
            )
    return arr.astype(np.int64, copy=False)


def read_gem(
    path,
    bin_size: int | str = 50,
    *,
    chunk_size: int = 2_000_000,
    sep: str = "\t",
    dtype=np.float32,
) -> ad.AnnData:
    """Read a Stereo-seq GEM file (plain or gzip-compressed) into binned or cell-level counts.

    The file is streamed in chunks of ``chunk_size`` lines, so whole-chip files of 10^8 lines are read
    with memory that grows with the number of non-zero (bin, gene) pairs, not with the number of lines.

    Parameters
    ----------
    path
        GEM file (``.gem``, ``.gem.gz``, ``.txt``, ``.txt.gz``, ``.tsv``, ``.tsv.gz``): optional ``#key=value``
        header lines (``#FileFormat=GEMv0.1``, ``#OffsetX=...``), then a tab-separated table with the columns
        ``geneID``, ``x``, ``y`` and a count column (``MIDCount``, ``MIDCounts``, ``UMICount`` or
        ``UMICounts``). ``ExonCount`` is accepted and ignored; ``geneName`` (SAW >= 7) goes to
        ``var['gene_name']``; ``CellID`` or ``label`` (cell-bin GEM) is used when ``bin_size='cellbin'``.
    bin_size
        Side of the square bins in DNB spots (``50`` gives 25 µm bins), or ``'cellbin'`` (also
        ``'cell_bins'``) for one observation per cell of a cell-bin GEM. A spot ``(x, y)`` goes to bin
        ``(floor(x / bin_size), floor(y / bin_size))`` (see docs/io.md).
    chunk_size
        Number of lines parsed at a time. Larger chunks are a little faster and use more memory.
    sep
        Column separator (SAW writes tabs).
    dtype
        Data type of the returned count matrix. ``float32`` holds integers exactly up to 2^24 per entry.

    Returns
    -------
    anndata.AnnData
        - ``X``: CSR matrix of summed counts (observations x genes), integer-valued;
        - ``obs_names``: ``"{bin_x}_{bin_y}"`` (bin indices) or the cell ID; ``obs`` columns ``bin_x``,
          ``bin_y`` (square bins) or ``x``, ``y`` (cells), ``total_counts`` and ``n_genes``;
        - ``obsm['spatial']``: bin centres, or count-weighted cell centroids, in DNB coordinates;
        - ``var_names``: the ``geneID`` values, sorted; ``var['gene_name']`` when the file has ``geneName``;
        - ``uns['stereo_seq']``: ``bin_size``, ``offset_x``, ``offset_y`` (chip offset from the header, 0
          when absent), ``min_x``, ``min_y`` (smallest coordinates), ``format``, ``source``, ``n_lines``
          and the header entries.

        Bins or cells whose lines all have a zero count are left out. In cell-bin files, lines whose cell
        ID is 0 or empty (spots outside every cell) are left out.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        On a bad ``bin_size``, missing columns, or counts or coordinates that are not non-negative integers.
    """
    path = _check_path(path)
    bin_size = _check_bin_size(bin_size)
    if not isinstance(chunk_size, int | np.integer) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_HDF5_MAGIC):
        raise ValueError(f"'{path}' is an HDF5 (GEF) file, not a GEM text file; use rmge.io.read_gef.")
    gz = head.startswith(_GZIP_MAGIC)
    meta, n_comment, columns = _read_gem_header(path, gz, sep)

    gene_col = _find_column(columns, _GENE_COLUMNS)
    count_col = _find_column(columns, _COUNT_COLUMNS)
    x_col = _find_column(columns, ("x",))
    y_col = _find_column(columns, ("y",))
    missing = [
        name for name, col in (("geneID", gene_col), ("x", x_col), ("y", y_col), ("MIDCount", count_col)) if col is None
    ]
    if missing:
        raise ValueError(
            f"GEM file '{path}' lacks the required column(s) {missing} (found columns: {columns}). A GEM table needs "
            "geneID, x, y and a count column named MIDCount, MIDCounts, UMICount or UMICounts."
        )
    name_col = _find_column(columns, _GENE_NAME_COLUMNS)
    cell_col = _find_column(columns, _CELL_COLUMNS)
    cellbin = bin_size == "cellbin"
    if cellbin and cell_col is None:
        raise ValueError(
            f"bin_size='cellbin' needs a cell column (CellID or label) but '{path}' has only {columns}. "
            "Use the cell-bin GEM written by SAW (e.g. '*.cellbin.gem') or pass an integer bin_size."
        )

    usecols = [gene_col, x_col, y_col, count_col] + ([name_col] if name_col else []) + ([cell_col] if cellbin else [])
    col_dtypes = {gene_col: object}
    if name_col:
        col_dtypes[name_col] = object

    gene_index: dict[str, int] = {}
    gene_name_of: dict[int, str] = {}
    cell_index: dict = {}
    cell_sums = np.zeros((0, 3), dtype=np.float64)  # per cell: sum(count * x), sum(count * y), sum(count)
    acc = _Accumulator()
    n_lines = 0
    min_x = min_y = None
    first_data_line = n_comment + 2  # 1-based line number of the first table row

    reader = pd.read_csv(
        path,
        sep=sep,
        skiprows=n_comment,
        header=0,
        usecols=usecols,
        dtype=col_dtypes,
        chunksize=int(chunk_size),
        compression="gzip" if gz else None,
        na_filter=True,
        keep_default_na=False,
        na_values=[""],
    )
    with reader:
        for chunk in reader:
            first_line = first_data_line + n_lines
            n_lines += len(chunk)
            if chunk.empty:
                continue
            counts = _check_chunk_numeric(chunk[count_col], "count", first_line)
            if counts.size and counts.min() < 0:
                pos = int(np.argmin(counts))
                raise ValueError(
                    f"Column '{count_col}' holds a negative count ({counts[pos]}) on line {first_line + pos}; "
                    "counts must be non-negative integers."
                )
            x = _check_chunk_numeric(chunk[x_col], "x coordinate", first_line)
            y = _check_chunk_numeric(chunk[y_col], "y coordinate", first_line)
            min_x = int(x.min()) if min_x is None else min(min_x, int(x.min()))
            min_y = int(y.min()) if min_y is None else min(min_y, int(y.min()))
            genes = chunk[gene_col]
            if genes.isna().any():
                pos = int(np.flatnonzero(genes.isna().to_numpy())[0])
                raise ValueError(f"Column '{gene_col}' has a missing gene ID on line {first_line + pos}.")
            codes, uniques = pd.factorize(genes, sort=False)
            lookup = np.fromiter(
                (gene_index.setdefault(g, len(gene_index)) for g in uniques), dtype=np.int64, count=len(uniques)
            )
            gidx = lookup[codes]
            if name_col:
                _, first = np.unique(codes, return_index=True)
                names = chunk[name_col].to_numpy()[first]
                for code, nm in zip(lookup, names, strict=True):
                    if int(code) not in gene_name_of:
                        gene_name_of[int(code)] = "" if pd.isna(nm) else str(nm)

            keep = counts > 0
            if cellbin:
                cells = chunk[cell_col]
                in_cell = cells.notna().to_numpy(copy=True)  # writable: pandas 3 returns read-only views
                if cells.dtype.kind in "iuf":
                    in_cell &= cells.fillna(0).to_numpy() != 0
                    labels = cells.to_numpy()
                else:
                    labels = cells.astype(str).str.strip().to_numpy()
                    in_cell &= ~np.isin(labels, ["0", "", "nan"])
                keep &= in_cell
                if not keep.any():
                    continue
                ccodes, cuniques = pd.factorize(labels[keep], sort=False)
                if cells.dtype.kind == "f":
                    cuniques = np.asarray(cuniques).astype(np.int64)
                clookup = np.fromiter(
                    (cell_index.setdefault(str(c), len(cell_index)) for c in cuniques),
                    dtype=np.int64,
                    count=len(cuniques),
                )
                keys = clookup[ccodes]
                c = counts[keep].astype(np.float64)
                if len(cell_index) > cell_sums.shape[0]:
                    cell_sums = np.vstack([cell_sums, np.zeros((len(cell_index) - cell_sums.shape[0], 3))])
                n_now = len(cell_index)
                cell_sums[:, 0] += np.bincount(keys, weights=c * x[keep], minlength=n_now)
                cell_sums[:, 1] += np.bincount(keys, weights=c * y[keep], minlength=n_now)
                cell_sums[:, 2] += np.bincount(keys, weights=c, minlength=n_now)
            else:
                if not keep.any():
                    continue
                keys = _pack_xy(np.floor_divide(x[keep], bin_size), np.floor_divide(y[keep], bin_size))
            acc.add(keys, gidx[keep], counts[keep], len(gene_index))

    n_genes = len(gene_index)
    keys, X = acc.result(n_genes)
    gene_ids = np.array(list(gene_index.keys()), dtype=object)
    # Genes sorted by ID (the order geftools writes in GEF files), independent of the chunk size.
    order = np.argsort(gene_ids.astype(str), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    X = sp.csr_matrix((X.data, rank[X.indices], X.indptr), shape=X.shape)
    gene_ids = gene_ids[order]
    gene_names = None
    if name_col:
        gene_names = np.array([gene_name_of.get(int(i), "") for i in order], dtype=object)

    if cellbin:
        cell_ids = np.array(list(cell_index.keys()), dtype=object)[keys]
        sums = cell_sums[keys]
        centres = sums[:, :2] / sums[:, 2:3]
        obs = pd.DataFrame({"x": centres[:, 0], "y": centres[:, 1]}, index=pd.Index(cell_ids.astype(str)))
        obs.index.name = None
        spatial = centres
    else:
        obs, spatial = _square_bin_obs(keys, bin_size)

    uns = {
        "bin_size": bin_size,
        "offset_x": _int_header(meta, "OffsetX"),
        "offset_y": _int_header(meta, "OffsetY"),
        "min_x": int(min_x or 0),
        "min_y": int(min_y or 0),
        "format": "gem",
        "source": str(path),
        "n_lines": int(n_lines),
        "header": {k: str(v) for k, v in meta.items()},
    }
    return _build_anndata(_finish_matrix(X, dtype), obs, spatial, gene_ids, gene_names, uns)


# --------------------------------------------------------------------------------------------- #
# GEF
# --------------------------------------------------------------------------------------------- #
def _attr_value(v):
    if isinstance(v, bytes | np.bytes_):
        return v.decode("utf-8", errors="replace").rstrip("\x00")
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "SO":
            return [str(_attr_value(e)) for e in v.ravel()]
        return v.item() if v.size == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _plain_attrs(obj) -> dict:
    out = {}
    for k, v in obj.attrs.items():
        try:
            val = _attr_value(v)
        except Exception:  # unreadable attributes are skipped: they are informational only
            continue
        if isinstance(val, str | int | float | list):
            out[str(k)] = val
    return out


def _gef_offset(f: h5py.File, axis: str) -> int:
    """Chip offset recorded in a GEF file (attribute ``offsetX``/``offsetY``), 0 when absent."""
    for obj in (f, f.get("cellBin"), f.get("geneExp")):
        if obj is not None and f"offset{axis}" in obj.attrs:
            try:
                return int(_attr_value(obj.attrs[f"offset{axis}"]))
            except (TypeError, ValueError):
                return 0
    return 0


def _gene_table(ds, what: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Return gene IDs, gene names (or None), offsets and counts from a GEF gene dataset."""
    data = ds[()]
    fields = data.dtype.names or ()
    if "geneID" in fields and "geneName" in fields:
        ids, names = _decode(data["geneID"]), _decode(data["geneName"])
    elif "gene" in fields:
        ids, names = _decode(data["gene"]), None
    elif "geneName" in fields:
        ids, names = _decode(data["geneName"]), None
    elif "geneID" in fields:
        ids, names = _decode(data["geneID"]), None
    else:
        raise ValueError(f"{what} has no gene name field (expected 'gene', 'geneName' or 'geneID'; found {fields}).")
    offset = data["offset"].astype(np.int64) if "offset" in fields else None
    count = data["count"].astype(np.int64) if "count" in fields else None
    return ids, names, offset, count


def _available_bins(gene_exp: h5py.Group) -> list[int]:
    sizes = []
    for k in gene_exp.keys():
        if k.startswith("bin") and k[3:].isdigit() and "expression" in gene_exp[k] and "gene" in gene_exp[k]:
            sizes.append(int(k[3:]))
    return sorted(sizes)


def _read_square_gef(f: h5py.File, path: Path, bin_size: int, block_size: int, dtype) -> ad.AnnData:
    gene_exp = f["geneExp"]
    available = _available_bins(gene_exp)
    # A stored bin of size k nests exactly in the requested bins when k divides bin_size (both grids start
    # at coordinate 0), so the coarsest such level is re-binned; bin1 always qualifies.
    usable = [k for k in available if bin_size % k == 0]
    if not usable:
        raise ValueError(
            f"Bin size {bin_size} cannot be built from '{path}': it stores bins {available} and no bin1 (or a size "
            f"dividing {bin_size}) to re-bin from. Choose bin_size among {available} or a multiple of one of them."
        )
    src = max(usable)
    grp = gene_exp[f"bin{src}"]
    exp_ds, gene_ds = grp["expression"], grp["gene"]
    exp_fields = exp_ds.dtype.names or ()
    missing = [c for c in ("x", "y", "count") if c not in exp_fields]
    if missing:
        raise ValueError(f"'{path}' /geneExp/bin{src}/expression lacks the field(s) {missing} (found {exp_fields}).")
    gene_ids, gene_names, offsets, gcounts = _gene_table(gene_ds, f"'{path}' /geneExp/bin{src}/gene")
    n_exp = exp_ds.shape[0]
    if offsets is None or gcounts is None:
        raise ValueError(f"'{path}' /geneExp/bin{src}/gene lacks the 'offset' and 'count' fields.")
    order = np.lexsort((gcounts, offsets))  # empty genes first among equal offsets
    starts, lens = offsets[order], gcounts[order]
    ends = starts + lens
    if starts.size and (starts[0] != 0 or np.any(starts[1:] != ends[:-1]) or ends[-1] != n_exp):
        raise ValueError(
            f"'{path}' /geneExp/bin{src}/gene offsets and counts do not tile the {n_exp} expression rows; "
            "the file is damaged or not a GEF file."
        )
    n_genes = gene_ids.size

    # geftools stores the lower-left DNB coordinate of each bin (a multiple of the bin size). Files that
    # store bin indices instead are recognised by coordinates that are not multiples of the bin size.
    scale = 1
    acc = _Accumulator()
    blocks = range(0, n_exp, max(int(block_size), 1))
    if src > 1:
        probe = exp_ds[: min(n_exp, 100_000)]
        if probe.size and (np.any(probe["x"] % src) or np.any(probe["y"] % src)):
            warnings.warn(
                f"/geneExp/bin{src}/expression holds coordinates that are not multiples of {src}; they are read as "
                f"bin indices (DNB coordinate = index x {src}).",
                UserWarning,
                stacklevel=3,
            )
            scale = src
    for start in blocks:
        stop = min(start + int(block_size), n_exp)
        block = exp_ds[start:stop]
        counts = block["count"].astype(np.int64)
        if counts.size and counts.min() < 0:
            raise ValueError(f"'{path}' holds negative counts in /geneExp/bin{src}/expression.")
        x = block["x"].astype(np.int64) * scale
        y = block["y"].astype(np.int64) * scale
        gidx = order[np.searchsorted(starts, np.arange(start, stop), side="right") - 1]
        keep = counts > 0
        keys = _pack_xy(np.floor_divide(x[keep], bin_size), np.floor_divide(y[keep], bin_size))
        acc.add(keys, gidx[keep], counts[keep], n_genes)
    keys, X = acc.result(n_genes)
    obs, spatial = _square_bin_obs(keys, bin_size)

    ref = gene_exp["bin1"]["expression"] if "bin1" in available else exp_ds
    uns = {
        "bin_size": bin_size,
        "offset_x": _gef_offset(f, "X"),
        "offset_y": _gef_offset(f, "Y"),
        "min_x": int(_attr_value(ref.attrs.get("minX", 0))),
        "min_y": int(_attr_value(ref.attrs.get("minY", 0))),
        "format": "gef",
        "source": str(path),
        "gef_bin_read": int(src),
        "gef_bins_available": [int(b) for b in available],
        "gef_attrs": _plain_attrs(f),
    }
    return _build_anndata(_finish_matrix(X, dtype), obs, spatial, gene_ids, gene_names, uns)


def _read_cellbin_gef(f: h5py.File, path: Path, dtype) -> ad.AnnData:
    cb = f["cellBin"]
    for name in ("cell", "cellExp"):
        if name not in cb:
            raise ValueError(f"'{path}' /cellBin lacks the '{name}' dataset; it is not a complete cell-bin GEF.")
    cell = cb["cell"][()]
    cfields = cell.dtype.names or ()
    missing = [c for c in ("x", "y", "offset", "geneCount") if c not in cfields]
    if missing:
        raise ValueError(f"'{path}' /cellBin/cell lacks the field(s) {missing} (found {cfields}).")
    if "gene" in cb:
        gene_ids, gene_names, _, _ = _gene_table(cb["gene"], f"'{path}' /cellBin/gene")
    elif "geneList" in cb:
        gene_ids, gene_names = _decode(cb["geneList"][()]), None
    else:
        raise ValueError(f"'{path}' /cellBin has no 'gene' (or 'geneList') dataset with gene names.")
    exp_ds = cb["cellExp"]
    efields = exp_ds.dtype.names or ()
    if "geneID" not in efields or "count" not in efields:
        raise ValueError(f"'{path}' /cellBin/cellExp lacks the 'geneID' and 'count' fields (found {efields}).")
    gene_of = exp_ds["geneID"].astype(np.int64)
    counts = exp_ds["count"].astype(np.int64)

    offsets = cell["offset"].astype(np.int64)
    n_per_cell = cell["geneCount"].astype(np.int64)
    n_cells, n_genes = cell.shape[0], gene_ids.size
    if np.any(offsets + n_per_cell > gene_of.size) or np.any(offsets < 0):
        raise ValueError(f"'{path}' /cellBin/cell offsets point past the end of /cellBin/cellExp; the file is damaged.")
    if gene_of.size and (gene_of.min() < 0 or gene_of.max() >= n_genes):
        raise ValueError(f"'{path}' /cellBin/cellExp refers to gene indices outside the {n_genes} genes listed.")
    indptr = np.concatenate([[0], np.cumsum(n_per_cell)])
    # Row i holds cellExp[offset_i : offset_i + geneCount_i]; gather the entries in cell order.
    take = np.repeat(offsets - indptr[:-1], n_per_cell) + np.arange(indptr[-1])
    X = sp.csr_matrix((counts[take], gene_of[take], indptr), shape=(n_cells, n_genes))

    ids = cell["id"] if "id" in cfields else np.arange(n_cells)
    names = pd.Index(np.asarray(ids).astype(str))
    if not names.is_unique:
        names = pd.Index(np.arange(n_cells).astype(str))
    spatial = np.column_stack([cell["x"], cell["y"]]).astype(np.float64)
    obs = pd.DataFrame({"x": spatial[:, 0], "y": spatial[:, 1]}, index=names)
    for fld, col in (("area", "area"), ("dnbCount", "dnb_count"), ("clusterID", "cluster_id")):
        if fld in cfields:
            obs[col] = cell[fld].astype(np.int64)
    uns = {
        "bin_size": "cellbin",
        "offset_x": _gef_offset(f, "X"),
        "offset_y": _gef_offset(f, "Y"),
        "min_x": int(spatial[:, 0].min()) if n_cells else 0,
        "min_y": int(spatial[:, 1].min()) if n_cells else 0,
        "format": "gef",
        "source": str(path),
        "gef_attrs": _plain_attrs(f),
    }
    return _build_anndata(_finish_matrix(X, dtype), obs, spatial, gene_ids, gene_names, uns)


def read_gef(path, bin_size: int | str = 50, *, block_size: int = 10_000_000, dtype=np.float32) -> ad.AnnData:
    """Read a Stereo-seq GEF (HDF5) file: square-bin GEF or cell-bin GEF.

    Square-bin GEF (``/geneExp/bin{N}``): ``expression`` is a compound dataset with fields ``x``, ``y``
    (lower-left DNB coordinate of the bin) and ``count``, grouped by gene; ``gene`` lists the genes with
    fields ``gene`` (or ``geneID`` and ``geneName``), ``offset`` and ``count`` (the gene's rows in
    ``expression``). When ``bin{bin_size}`` is not stored, the counts are re-binned from the coarsest
    stored level whose size divides ``bin_size`` (``bin1`` at worst), reading ``block_size`` rows at a time.

    Cell-bin GEF (``/cellBin``): ``cell`` (fields ``x``, ``y``, ``offset``, ``geneCount`` and optionally
    ``id``, ``area``, ``dnbCount``, ``clusterID``), ``gene`` (``geneName``, or ``geneID`` and ``geneName``)
    and ``cellExp`` (``geneID``, the row in ``gene``, and ``count``); cell ``i`` owns the rows
    ``cellExp[offset_i : offset_i + geneCount_i]``. Read with ``bin_size='cellbin'``.

    Parameters
    ----------
    path
        GEF file (``.gef``, ``.bgef``, ``.cgef``).
    bin_size
        Side of the square bins in DNB spots, or ``'cellbin'`` for a cell-bin GEF.
    block_size
        Number of expression rows read at a time when re-binning.
    dtype
        Data type of the returned count matrix.

    Returns
    -------
    anndata.AnnData
        Laid out as in :func:`read_gem`; ``uns['stereo_seq']`` also records the bin level read
        (``gef_bin_read``), the stored levels (``gef_bins_available``) and the file attributes.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a GEF file, lacks the requested kind of bins, or cannot provide ``bin_size``.
    """
    path = _check_path(path)
    bin_size = _check_bin_size(bin_size)
    if not h5py.is_hdf5(path):
        raise ValueError(f"'{path}' is not an HDF5 file, so not a GEF file; GEM text files are read by read_gem.")
    with h5py.File(path, "r") as f:
        if bin_size == "cellbin":
            if "cellBin" not in f:
                raise ValueError(
                    f"'{path}' holds no /cellBin group (it is a square-bin GEF); pass an integer bin_size, or the "
                    "cell-bin GEF written by SAW ('*.cellbin.gef')."
                )
            return _read_cellbin_gef(f, path, dtype)
        if "geneExp" not in f:
            if "cellBin" in f:
                raise ValueError(
                    f"'{path}' is a cell-bin GEF (only /cellBin); read it with bin_size='cellbin', or use the "
                    "square-bin GEF ('*.raw.gef' / '*.tissue.gef') for square bins."
                )
            raise ValueError(f"'{path}' is an HDF5 file without /geneExp or /cellBin groups: not a Stereo-seq GEF.")
        return _read_square_gef(f, path, bin_size, block_size, dtype)


# --------------------------------------------------------------------------------------------- #
# Dispatch
# --------------------------------------------------------------------------------------------- #
def _sniff_gem(path: Path, gz: bool) -> bool:
    """True if the first non-comment line of a text file looks like a GEM column header."""
    try:
        with _open_text(path, gz) as fh:
            for _, line in zip(range(200), fh, strict=False):
                s = line.strip()
                if not s or s.startswith("#"):
                    continue
                cols = s.split("\t")
                return _find_column(cols, _GENE_COLUMNS) is not None and _find_column(cols, ("x",)) is not None
    except (OSError, UnicodeDecodeError, EOFError):
        return False
    return False


_OPTIONS = {"GEM": ("chunk_size", "sep", "dtype"), "GEF": ("block_size", "dtype")}


def _check_options(kwargs: dict, fmt: str, path: Path) -> dict:
    unknown = sorted(set(kwargs) - set(_OPTIONS[fmt]))
    if unknown:
        raise TypeError(
            f"Option(s) {unknown} do not apply to '{path}', which is a {fmt} file; {fmt} files take "
            f"{list(_OPTIONS[fmt])}."
        )
    return kwargs


def read_stereo_seq(path, bin_size: int | str = 50, **kwargs) -> ad.AnnData:
    """Read Stereo-seq counts from a GEM or GEF file, binned into squares or cells.

    The format is told from the content (HDF5 signature: GEF; gzip or text with a GEM column line: GEM)
    and, for empty or unreadable files, from the extension.

    Parameters
    ----------
    path
        GEM (``.gem``, ``.gem.gz``, ``.txt``, ``.txt.gz``) or GEF (``.gef``) file written by SAW.
    bin_size
        Side of the square bins in DNB spots (default 50, i.e. 25 µm), or ``'cellbin'`` for one
        observation per segmented cell (cell-bin GEM or GEF).
    **kwargs
        Passed to :func:`read_gem` (``chunk_size``, ``sep``, ``dtype``) or :func:`read_gef`
        (``block_size``, ``dtype``).

    Returns
    -------
    anndata.AnnData
        Sparse counts, ``obsm['spatial']`` in DNB coordinates and ``uns['stereo_seq']``; see
        :func:`read_gem`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is neither a GEM nor a GEF file, or on the errors of the format's reader.
    TypeError
        If ``kwargs`` holds an option the detected format does not take.
    """
    path = _check_path(path)
    _check_bin_size(bin_size)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_HDF5_MAGIC):
        return read_gef(path, bin_size, **_check_options(kwargs, "GEF", path))
    name = path.name.lower()
    gz = head.startswith(_GZIP_MAGIC)
    if name.endswith(_GEM_SUFFIXES) or _sniff_gem(path, gz):
        return read_gem(path, bin_size, **_check_options(kwargs, "GEM", path))
    if name.endswith(_GEF_SUFFIXES):
        raise ValueError(f"'{path}' has a GEF extension but is not an HDF5 file; the file is damaged or truncated.")
    raise ValueError(
        f"Unknown Stereo-seq file format: '{path}'. Expected a GEM table (.gem, .gem.gz, .txt, .txt.gz with "
        "columns geneID, x, y, MIDCount) or a GEF HDF5 file (.gef)."
    )
