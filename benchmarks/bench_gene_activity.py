"""Benchmark of rmge.pp.gene_activity on a synthetic genome-scale peak matrix.

Builds a sparse cells × peaks count matrix (default 100,000 cells × 1,000,000 peaks of 500 bp, placed
uniformly at random on the hg19 chromosomes, 2,000 non-zero peaks per cell, counts 1 or 2) and
computes gene activities against the GENCODE hg19 protein-coding genes. Reports wall seconds and
peak resident memory (``resource.getrusage``).

Usage::

    python benchmarks/bench_gene_activity.py [--n-cells 100000] [--n-peaks 1000000] [--nnz-per-cell 2000]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import rmge

HG19 = {
    "chr1": 249_250_621, "chr2": 243_199_373, "chr3": 198_022_430, "chr4": 191_154_276, "chr5": 180_915_260,
    "chr6": 171_115_067, "chr7": 159_138_663, "chr8": 146_364_022, "chr9": 141_213_431, "chr10": 135_534_747,
    "chr11": 135_006_516, "chr12": 133_851_895, "chr13": 115_169_878, "chr14": 107_349_540, "chr15": 102_531_392,
    "chr16": 90_354_753, "chr17": 81_195_210, "chr18": 78_077_248, "chr19": 59_128_983, "chr20": 63_025_520,
    "chr21": 48_129_895, "chr22": 51_304_566, "chrX": 155_270_560, "chrY": 59_373_566,
}  # fmt: skip
DEFAULT_GTF = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gencode_hg19_genes.gtf.gz")
if not os.path.exists(DEFAULT_GTF):
    DEFAULT_GTF = "/work/shared/data/gencode_hg19_genes.gtf.gz"


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def synthetic_atac(n_cells: int, n_peaks: int, nnz_per_cell: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    names = np.array(list(HG19))
    lengths = np.array(list(HG19.values()), dtype=np.float64)
    chrom = rng.choice(len(names), n_peaks, p=lengths / lengths.sum())
    start = (rng.random(n_peaks) * (lengths[chrom] - 1000)).astype(np.int64)
    while True:  # peak names must be unique: nudge the rare colliding starts
        dup = pd.DataFrame({"c": chrom, "s": start}).duplicated().to_numpy()
        if not dup.any():
            break
        start[dup] += 1
    var_names = pd.Index(
        pd.Series(names[chrom]) + ":" + pd.Series(start).astype(str) + "-" + pd.Series(start + 500).astype(str)
    )
    # Built block by block so that generation transients stay small next to the matrix itself.
    nnz = n_cells * nnz_per_cell
    indices = np.empty(nnz, dtype=np.int32)
    data = np.empty(nnz, dtype=np.float32)
    block = 10_000 * nnz_per_cell
    for s in range(0, nnz, block):
        e = min(s + block, nnz)
        indices[s:e] = rng.integers(0, n_peaks, e - s, dtype=np.int32)
        data[s:e] = 1.0 + (rng.random(e - s) < 0.1)
    indptr = np.arange(0, nnz + 1, nnz_per_cell, dtype=np.int64 if nnz >= 2**31 else np.int32)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_peaks))
    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)]))
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=var_names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=100_000)
    parser.add_argument("--n-peaks", type=int, default=1_000_000)
    parser.add_argument("--nnz-per-cell", type=int, default=2_000)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--gtf", default=DEFAULT_GTF)
    args = parser.parse_args()

    t0 = time.perf_counter()
    atac = synthetic_atac(args.n_cells, args.n_peaks, args.nnz_per_cell)
    t_build = time.perf_counter() - t0
    rss_input = max_rss_gib()
    print(
        f"input: {atac.n_obs:,} cells x {atac.n_vars:,} peaks, {atac.X.nnz:,} non-zeros "
        f"({(atac.X.data.nbytes + atac.X.indices.nbytes) / 2**30:.2f} GiB); built in {t_build:.1f} s; "
        f"max RSS so far {rss_input:.2f} GiB"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # Fixed costs (GTF parsing, peak-name parsing, interval join) measured on 100 cells.
        t0 = time.perf_counter()
        rmge.pp.gene_activity(atac[:100].copy(), args.gtf)
        t_setup = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        ga = rmge.pp.gene_activity(atac, args.gtf, chunk_size=args.chunk_size)
        t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
    rss_end = max_rss_gib()
    print(f"setup (GTF + peak parsing + interval join, 100 cells): {t_setup:.1f} s")
    print(
        f"gene_activity: {t_full:.1f} s wall, {c_full:.1f} s CPU -> {ga.n_obs:,} cells x {ga.n_vars:,} genes, "
        f"{ga.X.nnz:,} non-zeros "
        f"({(ga.X.data.nbytes + ga.X.indices.nbytes) / 2**30:.2f} GiB)"
    )
    print(
        f"max RSS: {rss_end:.2f} GiB (input alone: {rss_input:.2f} GiB; added by gene_activity <= "
        f"{rss_end - rss_input:.2f} GiB); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
