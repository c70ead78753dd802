"""Gene activity scores from snATAC-seq peak counts.

Coordinate conventions
----------------------
Everything is computed in **0-based, half-open** coordinates (the BED convention): a peak named
``chr1:100-600`` covers the 0-based bases 100, 101, ..., 599 (1-based bases 101-600). Peak names and
peak ``var`` columns are read in this convention, and so are the columns of a gene table passed as a
:class:`pandas.DataFrame`. GTF records are 1-based and inclusive; a GTF ``gene`` line with start ``s``
and end ``e`` becomes the half-open interval ``[s - 1, e)``. A peak ``[ps, pe)`` overlaps a region
``[rs, re)`` when ``ps < re`` and ``pe > rs`` (at least one shared base).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from rmge._constants import COUNTS
from rmge._validation import check_nonnegative_finite, detect_value_kind

logger = logging.getLogger(__name__)

_CHROM_COLUMNS = ("chrom", "chr", "seqnames", "chromosome", "Chromosome")
_START_COLUMNS = ("start", "chromStart", "Start")
_END_COLUMNS = ("end", "chromEnd", "End")
_STRAND_COLUMNS = ("strand", "Strand")
_GENE_TYPE_KEYS = ("gene_type", "gene_biotype")
# ``chr1:100-600``, ``chr1-100-600`` or ``chr1_100_600``; the chromosome part is greedy so that
# scaffold names holding ``_`` or ``-`` (``chrUn_gl000220``) still parse.
_PEAK_NAME_RE = r"^(?P<chrom>.+)[:_-](?P<start>\d+)[-_](?P<end>\d+)$"
_ARCHR_FLOOR = float(np.exp(-1.0))
# Largest number of (peak, gene) candidate pairs examined at once by the overlap search.
_MAX_CANDIDATES = 20_000_000


# --------------------------------------------------------------------------------------------------
# Peaks
# --------------------------------------------------------------------------------------------------
def _first_column(df: pd.DataFrame, names: Iterable[str]) -> str | None:
    for name in names:
        if name in df.columns:
            return name
    return None


def _parse_peak_names(names: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split peak names ``CHROM<sep>START<sep>END`` into (parsed?, chrom, start, end) arrays.

    Same grammar as ``_PEAK_NAME_RE``, but solved on a bytes matrix with numpy: pandas' ``str.extract``
    spends ~10 s on a million names, this takes ~1 s. Names that are not ASCII go through the regex.
    """
    try:
        raw = names.astype("S")
    except UnicodeEncodeError:
        parsed = pd.Series(names).str.extract(_PEAK_NAME_RE)
        ok = parsed["chrom"].notna().to_numpy(copy=True)  # writable: pandas 3 returns read-only views
        ok &= (parsed["start"].str.len() <= 18).to_numpy(dtype=bool) & (parsed["end"].str.len() <= 18).to_numpy(bool)
        chrom = parsed["chrom"].fillna("").to_numpy(dtype=object).astype(str)
        start = np.array([int(v) if k else 0 for v, k in zip(parsed["start"], ok, strict=True)], dtype=np.int64)
        end = np.array([int(v) if k else 0 for v, k in zip(parsed["end"], ok, strict=True)], dtype=np.int64)
        return ok, chrom, start, end
    n = len(raw)
    width = max(raw.dtype.itemsize, 1)
    matrix = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(n, width) if n else np.zeros((0, 1), np.uint8)
    ok = np.zeros(n, dtype=bool)
    chrom_bytes = np.zeros(n, dtype=f"S{width}")
    start = np.zeros(n, dtype=np.int64)
    end = np.zeros(n, dtype=np.int64)
    pos = np.arange(width)
    block = max(1, 2_000_000 // width)
    for b0 in range(0, n, block):
        b = matrix[b0 : b0 + block]
        rows = np.arange(len(b))
        length = (b != 0).sum(1)
        non_digit = ~((b >= 48) & (b <= 57)) & (pos < length[:, None])
        is_sep = (b == ord("-")) | (b == ord("_")) | (b == ord(":"))
        # p2: last non-digit (separator before END); p1: last non-digit before p2 (separator before START).
        p2 = width - 1 - np.argmax(non_digit[:, ::-1], axis=1)
        before = non_digit & (pos < p2[:, None])
        p1 = width - 1 - np.argmax(before[:, ::-1], axis=1)
        good = (
            non_digit.any(1)
            & before.any(1)
            & is_sep[rows, p2]
            & (b[rows, p2] != ord(":"))
            & is_sep[rows, p1]
            & (p1 >= 1)
            & (p2 - p1 - 1 >= 1)
            & (p2 - p1 - 1 <= 18)
            & (length - p2 - 1 >= 1)
            & (length - p2 - 1 <= 18)
        )
        digits = b.astype(np.int64) - 48
        for lo, hi, out in ((p1 + 1, p2, start), (p2 + 1, length, end)):
            inside = (pos >= lo[:, None]) & (pos < hi[:, None])
            power = 10 ** np.clip(hi[:, None] - 1 - pos, 0, 18)
            out[b0 : b0 + len(b)] = np.where(inside & good[:, None], digits * power, 0).sum(1)
        chrom_bytes[b0 : b0 + len(b)] = np.where(pos < p1[:, None], b, 0).astype(np.uint8).view(f"S{width}").ravel()
        ok[b0 : b0 + len(b)] = good
    codes, uniques = pd.factorize(chrom_bytes)
    chrom = np.asarray([u.decode("ascii") for u in uniques], dtype=object)[codes].astype(str)
    return ok, chrom, start, end


def _peak_coordinates(var: pd.DataFrame, var_names: pd.Index) -> pd.DataFrame:
    """Chromosome, start and end of every peak, from ``var`` columns or from the peak names."""
    chrom_col = _first_column(var, _CHROM_COLUMNS)
    start_col = _first_column(var, _START_COLUMNS)
    end_col = _first_column(var, _END_COLUMNS)
    if chrom_col is not None and start_col is not None and end_col is not None:
        source = f"var columns {chrom_col!r}/{start_col!r}/{end_col!r}"
        chrom = var[chrom_col].astype(str).to_numpy()
        start = pd.to_numeric(var[start_col], errors="coerce").to_numpy(dtype=float)
        end = pd.to_numeric(var[end_col], errors="coerce").to_numpy(dtype=float)
        bad = ~(np.isfinite(start) & np.isfinite(end))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{int(bad.sum())} peak(s) have no numeric start/end in {source}, e.g. peak {var_names[i]!r} "
                f"(start={var[start_col].iloc[i]!r}, end={var[end_col].iloc[i]!r}). Fill these columns with "
                "integer positions or remove the peaks."
            )
    else:
        source = "var names"
        ok, chrom, start, end = _parse_peak_names(np.asarray(var_names, dtype=str))
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"Could not read genomic coordinates of {int((~ok).sum())} of {len(var_names)} peak(s), "
                f"e.g. {var_names[i]!r}. Name peaks like 'chr1:100-600' (also 'chr1-100-600' or "
                "'chr1_100_600'), or add var columns 'chrom', 'start' and 'end'."
            )
    start = np.asarray(start).astype(np.int64)
    end = np.asarray(end).astype(np.int64)
    bad = (end <= start) | (start < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{int(bad.sum())} peak(s) have end <= start or a negative start in {source}, e.g. {var_names[i]!r} "
            f"(start={start[i]}, end={end[i]}). Peaks must be 0-based half-open intervals with end > start."
        )
    return pd.DataFrame({"chrom": chrom, "start": start, "end": end})


# --------------------------------------------------------------------------------------------------
# Genes
# --------------------------------------------------------------------------------------------------
def _open_text(path: str):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt")
    return open(path)


def _gtf_attribute(attributes: pd.Series, key: str) -> pd.Series:
    """Vectorised extraction of one attribute (quoted or not) from the GTF attribute column."""
    pattern = rf'(?:^|;)\s*{re.escape(key)}\s+"?([^";]*)"?'
    return attributes.str.extract(pattern, expand=False)


def _read_gtf_genes(path: str | os.PathLike, gene_id_key: str) -> pd.DataFrame:
    """``gene`` records of a GTF file as a 0-based half-open table."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"GTF file not found: {path!r}. Pass an existing GTF path (plain or .gz) or a DataFrame."
        )
    rows: list[list[str]] = []
    features: dict[str, int] = {}
    with _open_text(path) as fh:
        # Only `gene` lines are kept, so a full annotation (millions of exon lines) is streamed, not loaded.
        for line in fh:
            if line.startswith("#"):
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 9:
                continue
            feature = fields[2]
            if feature == "gene":
                rows.append([fields[0], fields[3], fields[4], fields[6], fields[8]])
            elif len(features) < 20 or feature in features:
                features[feature] = features.get(feature, 0) + 1
    if not rows:
        seen = ", ".join(f"{k!r} ({v})" for k, v in features.items()) or "none"
        raise ValueError(
            f"GTF file {path!r} holds no 'gene' records (3rd column == 'gene'); features found: {seen}. "
            "Use an annotation with gene lines (e.g. GENCODE or Ensembl GTF), or build a DataFrame with columns "
            "chrom/start/end/strand/gene_name (0-based half-open) and pass it instead."
        )
    gtf = pd.DataFrame(rows, columns=["chrom", "start", "end", "strand", "attributes"])
    names = _gtf_attribute(gtf["attributes"], gene_id_key)
    if names.isna().all():
        keys = sorted(set(re.findall(r"(?:^|;)\s*(\w+)\s", gtf["attributes"].iloc[0])))
        raise ValueError(
            f"GTF gene records have no attribute {gene_id_key!r}; attributes of the first record: {keys}. "
            "Set `gene_id_key` to one of them."
        )
    gene_type = None
    for key in _GENE_TYPE_KEYS:
        values = _gtf_attribute(gtf["attributes"], key)
        if values.notna().any():
            gene_type = values
            break
    out = pd.DataFrame(
        {
            "chrom": gtf["chrom"].astype(str),
            # GTF is 1-based inclusive: [s, e] -> 0-based half-open [s - 1, e).
            "start": gtf["start"].astype(np.int64) - 1,
            "end": gtf["end"].astype(np.int64),
            "strand": gtf["strand"].astype(str),
            "gene_name": names,
        }
    )
    if gene_type is not None:
        out["gene_type"] = gene_type
    return out


def _gene_table(
    genes: str | os.PathLike | pd.DataFrame,
    gene_id_key: str,
    gene_type: str | Iterable[str] | None,
) -> pd.DataFrame:
    """Gene table with columns chrom/start/end/strand/gene_name (0-based half-open), filtered by type."""
    if isinstance(genes, pd.DataFrame):
        chrom_col = _first_column(genes, _CHROM_COLUMNS)
        start_col = _first_column(genes, _START_COLUMNS)
        end_col = _first_column(genes, _END_COLUMNS)
        strand_col = _first_column(genes, _STRAND_COLUMNS)
        missing = [
            what
            for what, col in (("chrom", chrom_col), ("start", start_col), ("end", end_col), ("strand", strand_col))
            if col is None
        ]
        if gene_id_key not in genes.columns:
            missing.append(gene_id_key)
        if missing:
            raise ValueError(
                f"Gene table lacks column(s) {missing}; it has {list(genes.columns)}. It needs chrom, start, end "
                f"(0-based half-open), strand ('+'/'-') and the name column given by gene_id_key={gene_id_key!r}."
            )
        table = pd.DataFrame(
            {
                "chrom": genes[chrom_col].astype(str).to_numpy(),
                "start": pd.to_numeric(genes[start_col], errors="coerce").to_numpy(),
                "end": pd.to_numeric(genes[end_col], errors="coerce").to_numpy(),
                "strand": genes[strand_col].astype(str).to_numpy(),
                "gene_name": genes[gene_id_key].to_numpy(),
            }
        )
        type_col = _first_column(genes, _GENE_TYPE_KEYS)
        if type_col is not None:
            table["gene_type"] = genes[type_col].to_numpy()
        bad = ~(np.isfinite(table["start"].astype(float)) & np.isfinite(table["end"].astype(float)))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} gene(s) have a missing or non-numeric start/end, e.g. "
                f"{table['gene_name'].iloc[int(np.flatnonzero(bad)[0])]!r}. Fix or drop them."
            )
        table["start"] = table["start"].astype(np.int64)
        table["end"] = table["end"].astype(np.int64)
    else:
        table = _read_gtf_genes(genes, gene_id_key)

    missing_name = table["gene_name"].isna().to_numpy()
    if missing_name.any():
        warnings.warn(
            f"{int(missing_name.sum())} gene record(s) have no {gene_id_key!r}; they are left out.",
            UserWarning,
            stacklevel=3,
        )
        table = table.loc[~missing_name]
    table["gene_name"] = table["gene_name"].astype(str)

    if gene_type is not None:
        wanted = [gene_type] if isinstance(gene_type, str) else list(gene_type)
        if "gene_type" not in table.columns:
            warnings.warn(
                f"The gene annotation has no gene_type/gene_biotype information; gene_type={gene_type!r} is "
                "ignored and all genes are used. Pass gene_type=None to silence this warning.",
                UserWarning,
                stacklevel=3,
            )
        else:
            keep = table["gene_type"].isin(wanted).to_numpy()
            if not keep.any():
                types = table["gene_type"].value_counts().index[:10].tolist()
                raise ValueError(
                    f"No gene has gene_type in {wanted}; the most common types are {types}. "
                    "Pass one of them as `gene_type`, or gene_type=None to use all genes."
                )
            table = table.loc[keep]

    bad = (table["end"] <= table["start"]) | (table["start"] < 0)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} gene(s) have end <= start or a negative start, e.g. "
            f"{table.loc[bad, 'gene_name'].iloc[0]!r}. Gene coordinates must be 0-based half-open with end > start "
            "(GTF files are converted automatically)."
        )
    strand = table["strand"].to_numpy()
    odd = ~np.isin(strand, ["+", "-"])
    if odd.any():
        warnings.warn(
            f"{int(odd.sum())} gene(s) have a strand other than '+' or '-' (e.g. {strand[odd][0]!r}); their TSS is "
            "taken at the start coordinate, as for '+' genes.",
            UserWarning,
            stacklevel=3,
        )
        table["strand"] = np.where(odd, "+", strand)
    if len(table) == 0:
        raise ValueError("The gene annotation holds no usable gene records.")
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Chromosome names
# --------------------------------------------------------------------------------------------------
def _chrom_key(name: str) -> str:
    """Naming-style free key of a chromosome: ``chr1`` and ``1`` -> ``1``; ``chrM``/``MT`` -> ``MT``."""
    key = name[3:] if name[:3].lower() == "chr" else name
    return "MT" if key in ("M", "m", "MT", "Mt") else key


def _harmonise_chromosomes(peak_chroms: np.ndarray, gene_chroms: np.ndarray) -> tuple[np.ndarray, bool]:
    """Rename gene chromosomes to the peaks' naming style when that makes more chromosomes match."""
    peak_set = set(pd.unique(peak_chroms).tolist())
    gene_set = set(pd.unique(gene_chroms).tolist())
    shared = peak_set & gene_set
    by_key: dict[str, str] = {}
    for c in sorted(peak_set):
        by_key.setdefault(_chrom_key(c), c)
    mapping = {g: by_key.get(_chrom_key(g), g) for g in gene_set}
    shared_after = {mapping[g] for g in gene_set} & peak_set
    renamed = False
    if len(shared_after) > len(shared):
        examples = [f"{g!r} -> {p!r}" for g, p in sorted(mapping.items()) if g != p][:3]
        warnings.warn(
            f"Peaks and genes name chromosomes differently (peaks: {sorted(peak_set)[:3]}, genes: "
            f"{sorted(gene_set)[:3]}); gene chromosomes were renamed to the peaks' style ({', '.join(examples)}).",
            UserWarning,
            stacklevel=3,
        )
        gene_chroms = pd.Series(gene_chroms).map(mapping).to_numpy()
        renamed = True
        shared = shared_after
    if not shared:
        raise ValueError(
            f"Peaks and genes share no chromosome (peaks: {sorted(peak_set)[:5]}, genes: {sorted(gene_set)[:5]}). "
            "Check that both use the same genome assembly, and rename chromosomes of one side so that they match "
            "(e.g. `genes['chrom'] = 'chr' + genes['chrom']`)."
        )
    return gene_chroms, renamed


# --------------------------------------------------------------------------------------------------
# Overlap
# --------------------------------------------------------------------------------------------------
def _gene_regions(
    start: np.ndarray, end: np.ndarray, minus: np.ndarray, upstream: int, downstream: int, gene_body: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Region start/end and TSS (0-based base) of every gene, strand-aware."""
    tss = np.where(minus, end - 1, start)
    if gene_body:
        core_start, core_end = start, end
    else:
        core_start, core_end = tss, tss + 1
    reg_start = np.where(minus, core_start - downstream, core_start - upstream)
    reg_end = np.where(minus, core_end + upstream, core_end + downstream)
    return np.maximum(reg_start, 0), reg_end, tss


def _overlap_pairs(
    peak_chrom: np.ndarray,
    peak_start: np.ndarray,
    peak_end: np.ndarray,
    reg_chrom: np.ndarray,
    reg_start: np.ndarray,
    reg_end: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """All (peak, region) pairs that share at least one base.

    Hand-written rather than pyranges/ncls: the query is a single interval join that numpy solves
    with two ``searchsorted`` calls, without adding compiled dependencies. Chromosomes are laid end
    to end on one axis (code * 2**40 + position), so one sorted search serves all of them. Peaks are
    sorted by start; a peak can overlap ``[rs, re)`` only if its start lies in ``(rs - L, re)``,
    with ``L`` the longest peak, and the candidates in that window are then filtered exactly.
    """
    chroms = pd.Index(pd.unique(np.concatenate([peak_chrom, reg_chrom])))
    offset = np.int64(1) << np.int64(40)
    p_code = chroms.get_indexer(peak_chrom).astype(np.int64) * offset
    r_code = chroms.get_indexer(reg_chrom).astype(np.int64) * offset
    ps = p_code + peak_start
    pe = p_code + peak_end
    order = np.argsort(ps, kind="stable")
    ps_sorted, pe_sorted = ps[order], pe[order]
    max_len = int((peak_end - peak_start).max())
    rs = r_code + reg_start
    re_ = r_code + reg_end
    lo = np.searchsorted(ps_sorted, rs - max_len, side="right")
    hi = np.searchsorted(ps_sorted, re_, side="left")
    n_cand = np.maximum(hi - lo, 0)

    peaks_out: list[np.ndarray] = []
    regions_out: list[np.ndarray] = []
    # Candidates are examined in blocks of regions to bound memory when a few peaks are very long.
    cum = np.cumsum(n_cand)
    block_starts = [0]
    while True:
        base = cum[block_starts[-1] - 1] if block_starts[-1] > 0 else 0
        nxt = int(np.searchsorted(cum, base + _MAX_CANDIDATES, side="right"))
        nxt = max(nxt, block_starts[-1] + 1)
        if nxt >= len(n_cand):
            break
        block_starts.append(nxt)
    block_starts.append(len(n_cand))
    for b0, b1 in zip(block_starts[:-1], block_starts[1:], strict=False):
        counts = n_cand[b0:b1]
        total = int(counts.sum())
        if total == 0:
            continue
        region = np.repeat(np.arange(b0, b1, dtype=np.int64), counts)
        first = np.cumsum(counts) - counts
        pos = np.arange(total, dtype=np.int64) - np.repeat(first, counts) + np.repeat(lo[b0:b1], counts)
        hit = pe_sorted[pos] > rs[region]
        peaks_out.append(order[pos[hit]])
        regions_out.append(region[hit])
    if not peaks_out:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(peaks_out), np.concatenate(regions_out)


def _peak_tss_distance(peak_start: np.ndarray, peak_end: np.ndarray, tss: np.ndarray) -> np.ndarray:
    """Bases between a peak and a TSS base: 0 if the peak holds the TSS, else the gap to its nearest edge."""
    return np.maximum(np.maximum(peak_start - tss, tss - (peak_end - 1)), 0)


def _weights(distance: np.ndarray, distance_weight, distance_scale: float) -> np.ndarray:
    if distance_weight is None:
        return np.ones(distance.shape, dtype=np.float32)
    if callable(distance_weight):
        w = np.asarray(distance_weight(distance.copy()), dtype=np.float64)
        if w.shape != distance.shape:
            raise ValueError(
                f"distance_weight returned shape {w.shape}; it must return one weight per distance {distance.shape}."
            )
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise ValueError("distance_weight returned negative or non-finite weights; weights must be >= 0.")
        return w.astype(np.float32)
    if distance_weight == "exponential":
        return (np.exp(-np.abs(distance) / distance_scale) + _ARCHR_FLOOR).astype(np.float32)
    raise ValueError(
        f"Unknown distance_weight {distance_weight!r}; use None, 'exponential' or a function of the distance in bp."
    )


def _describe_weight(distance_weight) -> str:
    if distance_weight is None:
        return "none"
    if isinstance(distance_weight, str):
        return distance_weight
    return getattr(distance_weight, "__name__", "callable")


def _merge_duplicates(
    peak_idx: np.ndarray, gene_idx: np.ndarray, weight: np.ndarray, name_codes: np.ndarray, n_names: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map genes to names; a peak overlapping several records of one name counts once (largest weight)."""
    name_idx = name_codes[gene_idx]
    key = peak_idx * np.int64(n_names) + name_idx
    order = np.lexsort((-weight, key))
    key_sorted = key[order]
    first = np.ones(len(key_sorted), dtype=bool)
    first[1:] = key_sorted[1:] != key_sorted[:-1]
    sel = order[first]
    return peak_idx[sel], name_idx[sel], weight[sel]


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def gene_activity(
    atac: ad.AnnData,
    genes: str | os.PathLike | pd.DataFrame,
    *,
    upstream: int = 2000,
    downstream: int = 0,
    gene_body: bool = True,
    distance_weight: Literal["exponential"] | Callable[[np.ndarray], np.ndarray] | None = None,
    distance_scale: float = 5000.0,
    gene_type: str | Iterable[str] | None = "protein_coding",
    gene_id_key: str = "gene_name",
    layer: str | None = None,
    duplicates: Literal["merge", "unique"] = "merge",
    drop_empty: bool = True,
    chunk_size: int = 10_000,
) -> ad.AnnData:
    """Per-gene activity scores from snATAC-seq peak counts.

    The activity of gene *g* in cell *c* is the (optionally distance-weighted) sum of the counts of the
    peaks that overlap the gene's region. The region is the gene body (``gene_body=True``) or the single
    TSS base (``gene_body=False``), extended by ``upstream`` bases on its 5' side and ``downstream`` bases
    on its 3' side, strand-aware: for a ``+`` gene ``[start, end)`` the TSS is ``start`` and the region is
    ``[start - upstream, end + downstream)``; for a ``-`` gene the TSS is ``end - 1`` and the region is
    ``[start - downstream, end + upstream)``. With ``gene_body=False`` the region is the promoter window
    ``[TSS - upstream, TSS + downstream]`` (both ends included; mirrored for ``-`` genes). A peak counts
    when it shares at least one base with the region. All coordinates are 0-based half-open; GTF
    records (1-based inclusive ``[s, e]``) are converted to ``[s - 1, e)``.

    The computation builds a sparse peaks × genes weight matrix ``W`` by an interval join and returns
    ``X @ W``, processed in blocks of ``chunk_size`` cells; the count matrix is never densified.

    Parameters
    ----------
    atac
        Cells × peaks AnnData with counts in ``X`` (or ``layers[layer]``), sparse or dense; backed
        AnnData objects are read block by block. Peak coordinates come from ``var`` columns
        ``chrom``/``start``/``end`` (also ``chr`` or ``seqnames`` for the chromosome) when present, else
        from the peak names, written ``chr1:100-600``, ``chr1-100-600`` or ``chr1_100_600``
        (0-based half-open, as in BED files and 10x/Signac peak names).
    genes
        Path to a GTF file (plain or gzip-compressed; only ``gene`` records are used, with the name in
        attribute ``gene_id_key`` and the type in ``gene_type`` or ``gene_biotype``), or a DataFrame
        with columns ``chrom``, ``start``, ``end`` (0-based half-open), ``strand`` and the
        ``gene_id_key`` column, optionally ``gene_type``.
    upstream
        Bases added on the 5' side (upstream of the TSS).
    downstream
        Bases added on the 3' side: past the gene end when ``gene_body=True``, past the TSS otherwise.
    gene_body
        Use the gene body plus flanks (``True``) or only the promoter window around the TSS (``False``).
    distance_weight
        ``None``: every overlapping peak has weight 1, so activities are sums of counts (integers for
        integer input). ``"exponential"``: weight ``exp(-d / distance_scale) + exp(-1)``, the ArchR gene
        model, where ``d`` is the number of bases between the peak and the TSS base (0 when the peak
        contains the TSS, else the distance from the TSS to the nearest peak base). A function maps an
        integer array of such distances to non-negative weights of the same shape.
    distance_scale
        Length scale in bases of the ``"exponential"`` weight.
    gene_type
        Keep only genes of this type (or these types); ``None`` keeps all genes.
    gene_id_key
        GTF attribute or DataFrame column holding the gene names used as ``var_names``.
    layer
        Layer of ``atac`` holding the counts; ``None`` uses ``atac.X``.
    duplicates
        What to do with gene records sharing a name. ``"merge"`` (default): one output gene whose
        region is the union of the records' regions; a peak overlapping several of them counts once
        (with its largest weight). ``"unique"``: one output gene per record, later copies renamed
        ``NAME-1``, ``NAME-2``, ... A warning tells how many names were affected.
    drop_empty
        Drop genes whose region overlaps no peak (their activity is 0 in every cell). The number
        dropped is logged and stored in ``uns['gene_activity']['n_genes_without_peaks']``.
    chunk_size
        Number of cells processed at once.

    Returns
    -------
    Cells × genes AnnData with a CSR float32 ``X``, ``obs`` and ``obsm`` copied from ``atac``, ``var``
    indexed by gene name with columns ``chrom``, ``start``, ``end`` (0-based half-open gene body,
    without flanks; for merged names, the span of the first record), ``strand``, ``n_peaks`` (peaks
    overlapping the region) and, for ``duplicates="merge"``, ``n_records``. The parameters are stored
    in ``uns['gene_activity']``.

    Raises
    ------
    FileNotFoundError
        If the GTF path does not exist.
    ValueError
        If peak coordinates cannot be read, the GTF holds no gene records, peaks and genes share no
        chromosome (after renaming ``chr1``/``1`` styles) or no peak overlaps any gene, or the counts
        hold negative or non-finite values.

    Examples
    --------
    >>> import rmge
    >>> ga = rmge.pp.gene_activity(atac, "gencode.v19.annotation.gtf.gz")  # doctest: +SKIP
    >>> ga.var.loc["MS4A1", "n_peaks"]  # doctest: +SKIP
    """
    if not isinstance(atac, ad.AnnData):
        raise TypeError(f"atac must be an AnnData (cells × peaks), got {type(atac).__name__}.")
    for name, value in (("upstream", upstream), ("downstream", downstream)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer number of bases, got {value!r}.")
    upstream, downstream = int(upstream), int(downstream)
    if not (np.isfinite(distance_scale) and distance_scale > 0):
        raise ValueError(f"distance_scale must be a positive number of bases, got {distance_scale!r}.")
    if duplicates not in ("merge", "unique"):
        raise ValueError(f"duplicates must be 'merge' or 'unique', got {duplicates!r}.")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if distance_weight is not None and not callable(distance_weight) and distance_weight != "exponential":
        raise ValueError(
            f"Unknown distance_weight {distance_weight!r}; use None, 'exponential' or a function of the distance in bp."
        )
    if layer is not None and layer not in atac.layers:
        raise KeyError(f"Layer {layer!r} not found in atac.layers (available: {list(atac.layers.keys())}).")
    if atac.n_vars == 0 or atac.n_obs == 0:
        raise ValueError(f"atac is empty ({atac.n_obs} cells × {atac.n_vars} peaks).")

    peaks = _peak_coordinates(atac.var, atac.var_names)
    table = _gene_table(genes, gene_id_key, gene_type)
    gene_chrom, renamed = _harmonise_chromosomes(peaks["chrom"].to_numpy(), table["chrom"].to_numpy())
    table["chrom"] = gene_chrom

    start = table["start"].to_numpy(np.int64)
    end = table["end"].to_numpy(np.int64)
    minus = table["strand"].to_numpy() == "-"
    reg_start, reg_end, tss = _gene_regions(start, end, minus, upstream, downstream, gene_body)
    p_start = peaks["start"].to_numpy(np.int64)
    p_end = peaks["end"].to_numpy(np.int64)
    peak_idx, gene_idx = _overlap_pairs(
        peaks["chrom"].to_numpy(), p_start, p_end, table["chrom"].to_numpy(), reg_start, reg_end
    )
    if len(peak_idx) == 0:
        raise ValueError(
            f"No peak overlaps any of the {len(table)} gene regions (upstream={upstream}, downstream={downstream}, "
            f"gene_body={gene_body}). Check that peaks and genes come from the same genome assembly (e.g. hg19 vs "
            "hg38) and that peak coordinates are right."
        )
    weight = _weights(
        _peak_tss_distance(p_start[peak_idx], p_end[peak_idx], tss[gene_idx]), distance_weight, distance_scale
    )

    # Duplicated names.
    names = table["gene_name"].to_numpy()
    dup_mask = pd.Index(names).duplicated(keep=False)
    n_dup_names = int(pd.Index(names[dup_mask]).nunique())
    if duplicates == "merge":
        codes, uniques = pd.factorize(names)
        peak_idx, out_idx, weight = _merge_duplicates(peak_idx, gene_idx, weight, codes.astype(np.int64), len(uniques))
        first_record = np.unique(codes, return_index=True)[1]
        var = table.iloc[first_record][["chrom", "start", "end", "strand"]].reset_index(drop=True)
        var["n_records"] = np.bincount(codes, minlength=len(uniques)).astype(np.int64)
        var_names = pd.Index(uniques.astype(str))
    else:
        out_idx = gene_idx
        var = table[["chrom", "start", "end", "strand"]].reset_index(drop=True)
        var_names = pd.Index(ad.utils.make_index_unique(pd.Index(names.astype(str))))
    if n_dup_names:
        examples = pd.Index(names[dup_mask]).unique()[:5].tolist()
        action = (
            "merged into one gene each (union of their regions; a peak counts once)"
            if duplicates == "merge"
            else "kept apart and made unique with suffixes -1, -2, ..."
        )
        warnings.warn(
            f"{n_dup_names} gene name(s) appear in several gene records (e.g. {examples}); they were {action}. "
            "Set `duplicates` to choose the other behaviour.",
            UserWarning,
            stacklevel=2,
        )

    n_out = len(var_names)
    W = sp.csr_matrix((weight, (peak_idx, out_idx)), shape=(atac.n_vars, n_out), dtype=np.float32)
    n_peaks = np.bincount(out_idx, minlength=n_out)
    var["n_peaks"] = n_peaks.astype(np.int64)
    var.index = var_names
    n_empty = int((n_peaks == 0).sum())
    if drop_empty and n_empty:
        keep = np.flatnonzero(n_peaks > 0)
        W = W[:, keep].tocsr()
        var = var.iloc[keep]
        logger.info("%d of %d genes overlap no peak and were dropped; %d genes kept.", n_empty, n_out, len(keep))

    X = atac.layers[layer] if layer is not None else atac.X
    what = f"atac.layers[{layer!r}]" if layer is not None else "atac.X"
    if sp.issparse(X) and X.format == "csc":
        X = X.tocsr()  # row blocks of a CSC matrix would rescan every column for each block
    activity = _chunked_product(X, W, int(chunk_size), what)
    # After the product, which checked every block for negative and non-finite values.
    if detect_value_kind(X) != COUNTS:
        warnings.warn(
            f"{what} does not look like integer counts; gene activities will be sums of these values. "
            "Pass raw peak counts (e.g. `layer='counts'`) for count-like activities.",
            UserWarning,
            stacklevel=2,
        )

    uns = {
        "upstream": upstream,
        "downstream": downstream,
        "gene_body": bool(gene_body),
        "distance_weight": _describe_weight(distance_weight),
        "distance_scale": float(distance_scale),
        "gene_type": "all" if gene_type is None else ([gene_type] if isinstance(gene_type, str) else list(gene_type)),
        "gene_id_key": gene_id_key,
        "layer": "X" if layer is None else layer,
        "duplicates": duplicates,
        "drop_empty": bool(drop_empty),
        "genes": "DataFrame" if isinstance(genes, pd.DataFrame) else os.fspath(genes),
        "coordinates": "0-based half-open",
        "chromosomes_renamed": bool(renamed),
        "n_genes_without_peaks": n_empty,
        "n_duplicated_names": n_dup_names,
    }
    out = ad.AnnData(
        X=activity,
        obs=atac.obs.copy(),
        var=var,
        obsm={k: v.copy() for k, v in atac.obsm.items()},
        uns={"gene_activity": uns},
    )
    return out


def _chunked_product(X, W: sp.csr_matrix, chunk_size: int, what: str) -> sp.csr_matrix:
    """``X @ W`` computed ``chunk_size`` rows at a time, as a CSR float32 matrix."""
    n = X.shape[0]
    data: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    row_nnz: list[np.ndarray] = []
    for s in range(0, n, chunk_size):
        block = X[s : min(s + chunk_size, n)]
        if not sp.issparse(block):
            block = sp.csr_matrix(np.asarray(block))
        block = sp.csr_matrix(block)
        check_nonnegative_finite(block.data, what=what)  # stored values only: no row-slice copies
        if block.dtype != np.float32:
            block = block.astype(np.float32)
        prod = (block @ W).tocsr()
        prod.sum_duplicates()  # canonical: sorted indices, no duplicates
        prod.eliminate_zeros()
        data.append(prod.data.astype(np.float32, copy=False))
        indices.append(prod.indices)
        row_nnz.append(np.diff(prod.indptr))
    nnz = int(sum(len(d) for d in data))
    idx_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n + 1, dtype=idx_dtype)
    np.cumsum(np.concatenate(row_nnz), out=indptr[1:])
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices).astype(idx_dtype, copy=False), indptr),
        shape=(n, W.shape[1]),
    )
