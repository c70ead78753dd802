"""Tests of rmge.pp.gene_activity: known answers, input formats, harmonisation and bad input."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import rmge
from rmge.pp import _gene_activity as ga_mod

DATA = str(Path(os.environ.get("RMGE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data")))
PEAKS_H5AD = os.path.join(DATA, "granja2019_bonemarrow_atac_peaks.h5ad")
GTF_HG19 = os.path.join(DATA, "gencode_hg19_genes.gtf.gz")

# Peaks, 0-based half-open.
PEAKS = [
    ("chr1", 100, 200),  # p0: upstream of everything
    ("chr1", 900, 1000),  # p1: ends right at A's TSS (1000)
    ("chr1", 1500, 1600),  # p2: inside A
    ("chr1", 5000, 5100),  # p3: just past A's end, inside B
    ("chr1", 9950, 10050),  # p4: holds B's TSS (9999)
    ("chr2", 100, 200),  # p5: 50 bp past C's end
    ("chr1", 20000, 20100),  # p6: no gene
]
# cells x peaks
COUNTS = np.array(
    [
        [1, 2, 0, 3, 0, 5, 1],
        [0, 0, 4, 0, 1, 0, 0],
        [2, 1, 1, 1, 1, 1, 1],
    ],
    dtype=np.float32,
)
# Genes, 0-based half-open; A on '+', B on '-'.
GENES = pd.DataFrame(
    {
        "chrom": ["chr1", "chr1", "chr2", "chr3"],
        "start": [1000, 3000, 0, 0],
        "end": [5000, 10000, 50, 1000],
        "strand": ["+", "-", "+", "+"],
        "gene_name": ["A", "B", "C", "D"],
        "gene_type": ["protein_coding"] * 4,
    }
)


def _w(d):
    return np.exp(-d / 5000.0) + np.exp(-1.0)


def make_atac(names=None, X=None, **var_cols) -> ad.AnnData:
    if names is None:
        names = [f"{c}:{s}-{e}" for c, s, e in PEAKS]
    X = sp.csr_matrix(COUNTS if X is None else X)
    obs = pd.DataFrame({"cell_type": ["x", "y", "z"]}, index=[f"cell{i}" for i in range(X.shape[0])])
    var = pd.DataFrame(var_cols, index=names)
    a = ad.AnnData(X=X, obs=obs, var=var)
    a.obsm["X_umap"] = np.arange(2 * a.n_obs, dtype=float).reshape(-1, 2)
    return a


def dense(adata: ad.AnnData, genes) -> np.ndarray:
    return adata[:, list(genes)].X.toarray()


def write_gtf(path, records, extra_lines=()):
    """records: (chrom, start1, end1, strand, name, type, feature) with 1-based inclusive coordinates."""
    lines = ["##description: test annotation", "#!genome-build test"]
    lines += list(extra_lines)
    for chrom, s, e, strand, name, gtype, feature in records:
        attrs = f'gene_id "ID_{name}"; gene_name "{name}"; gene_type "{gtype}"; level 2;'
        lines.append("\t".join([chrom, "TEST", feature, str(s), str(e), ".", strand, ".", attrs]))
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


GTF_RECORDS = [
    # GENES converted to 1-based inclusive: [s, e) -> [s + 1, e]
    ("chr1", 1001, 5000, "+", "A", "protein_coding", "gene"),
    ("chr1", 1001, 5000, "+", "A", "protein_coding", "transcript"),
    ("chr1", 3001, 10000, "-", "B", "protein_coding", "gene"),
    ("chr2", 1, 50, "+", "C", "protein_coding", "gene"),
    ("chr3", 1, 1000, "+", "D", "protein_coding", "gene"),
    ("chr1", 1, 20200, "+", "LINC", "lincRNA", "gene"),
]


# --------------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------------
def test_gene_body_known_answer():
    out = rmge.pp.gene_activity(make_atac(), GENES, upstream=500)
    # A: [500, 5000) -> p1, p2.  B ('-', TSS 9999): [3000, 10500) -> p3, p4.  C, D: nothing -> dropped.
    assert list(out.var_names) == ["A", "B"]
    expected = np.array([[2, 3], [4, 1], [2, 2]], dtype=np.float32)
    np.testing.assert_array_equal(dense(out, ["A", "B"]), expected)
    assert list(out.var["n_peaks"]) == [2, 2]
    assert out.uns["gene_activity"]["n_genes_without_peaks"] == 2


def test_half_open_boundaries_without_flank():
    out = rmge.pp.gene_activity(make_atac(), GENES, upstream=0)
    # A: [1000, 5000): p1 = [900, 1000) touches but shares no base; p3 = [5000, 5100) neither. -> p2 only.
    np.testing.assert_array_equal(dense(out, ["A"]).ravel(), [0, 4, 1])
    # B: [3000, 10000): p3 and p4 (9950 < 10000).
    np.testing.assert_array_equal(dense(out, ["B"]).ravel(), [3, 1, 2])


def test_promoter_window_strand_aware():
    out = rmge.pp.gene_activity(make_atac(), GENES, upstream=500, gene_body=False)
    # A: [500, 1001) -> p1.  B: TSS 9999, window [9999, 10500) on the '-' strand -> p4 (not p3).
    np.testing.assert_array_equal(dense(out, ["A", "B"]), [[2, 0], [0, 1], [1, 1]])
    assert list(out.var["n_peaks"]) == [1, 1]


def test_promoter_downstream_flank():
    out = rmge.pp.gene_activity(make_atac(), GENES, upstream=500, downstream=600, gene_body=False)
    # A: [500, 1601) -> p1, p2.  B: [9399, 10500) -> p4.  C: [0, 601) -> p5.
    assert list(out.var_names) == ["A", "B", "C"]
    np.testing.assert_array_equal(dense(out, ["A", "B", "C"]), [[2, 0, 5], [4, 1, 0], [2, 1, 1]])


def test_gene_body_downstream_extends_past_gene_end():
    out = rmge.pp.gene_activity(make_atac(), GENES, upstream=500, downstream=100)
    # C: [0, 150) now reaches p5 = [100, 200); A: [500, 5100) now also takes p3.
    np.testing.assert_array_equal(dense(out, ["A", "C"]), [[5, 5], [4, 0], [3, 1]])


def test_exponential_weighting():
    out = rmge.pp.gene_activity(make_atac(), GENES, upstream=500, distance_weight="exponential")
    # Distances to the TSS base: A (TSS 1000): p1 -> 1, p2 -> 500.  B (TSS 9999): p3 -> 4900, p4 -> 0.
    wa = np.array([_w(1), _w(500)])
    wb = np.array([_w(4900), _w(0)])
    expected = np.column_stack([COUNTS[:, [1, 2]] @ wa, COUNTS[:, [3, 4]] @ wb])
    np.testing.assert_allclose(dense(out, ["A", "B"]), expected, rtol=1e-6)
    assert out.X.dtype == np.float32
    assert out.uns["gene_activity"]["distance_weight"] == "exponential"


def test_callable_weighting_receives_distances():
    seen = []

    def at_tss(d):
        seen.append(np.sort(d))
        return (d == 0).astype(float)

    out = rmge.pp.gene_activity(make_atac(), GENES, upstream=500, distance_weight=at_tss)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), [0, 1, 500, 4900])
    np.testing.assert_array_equal(dense(out, ["A", "B"]), [[0, 0], [0, 1], [0, 1]])
    assert out.uns["gene_activity"]["distance_weight"] == "at_tss"


def test_keep_empty_genes():
    out = rmge.pp.gene_activity(make_atac(), GENES, upstream=500, drop_empty=False)
    assert list(out.var_names) == ["A", "B", "C", "D"]
    assert list(out.var["n_peaks"]) == [2, 2, 0, 0]
    np.testing.assert_array_equal(dense(out, ["C", "D"]), 0)


def test_output_structure_and_roundtrip(tmp_path):
    atac = make_atac()
    out = rmge.pp.gene_activity(atac, GENES, upstream=500)
    assert sp.isspmatrix_csr(out.X) or isinstance(out.X, sp.csr_array)
    assert out.X.dtype == np.float32
    pd.testing.assert_frame_equal(out.obs, atac.obs)
    np.testing.assert_array_equal(out.obsm["X_umap"], atac.obsm["X_umap"])
    assert {"chrom", "start", "end", "strand", "n_peaks"} <= set(out.var.columns)
    assert out.var.loc["B", "strand"] == "-" and out.var.loc["B", "start"] == 3000
    assert np.all(out.X.data == np.round(out.X.data))  # unweighted: integer counts
    params = out.uns["gene_activity"]
    assert params["upstream"] == 500 and params["gene_body"] is True and params["genes"] == "DataFrame"
    path = tmp_path / "ga.h5ad"
    out.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.X.toarray(), out.X.toarray())
    assert back.uns["gene_activity"]["coordinates"] == "0-based half-open"


def test_chunking_dense_csc_and_layer_agree():
    atac = make_atac()
    ref = rmge.pp.gene_activity(atac, GENES, upstream=500).X.toarray()
    assert np.array_equal(rmge.pp.gene_activity(atac, GENES, upstream=500, chunk_size=1).X.toarray(), ref)
    dense_atac = make_atac(X=COUNTS)
    dense_atac.X = COUNTS.copy()
    assert np.array_equal(rmge.pp.gene_activity(dense_atac, GENES, upstream=500).X.toarray(), ref)
    csc_atac = make_atac()
    csc_atac.X = sp.csc_matrix(COUNTS)
    assert np.array_equal(rmge.pp.gene_activity(csc_atac, GENES, upstream=500).X.toarray(), ref)
    layered = make_atac(X=np.zeros_like(COUNTS))
    layered.layers["counts"] = sp.csr_matrix(COUNTS)
    out = rmge.pp.gene_activity(layered, GENES, upstream=500, layer="counts")
    assert np.array_equal(out.X.toarray(), ref)
    assert out.uns["gene_activity"]["layer"] == "counts"


def test_backed_anndata_matches_in_memory(tmp_path):
    atac = make_atac()
    path = tmp_path / "atac.h5ad"
    atac.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    out = rmge.pp.gene_activity(backed, GENES, upstream=500, chunk_size=2)
    np.testing.assert_array_equal(out.X.toarray(), rmge.pp.gene_activity(atac, GENES, upstream=500).X.toarray())
    backed.file.close()


# --------------------------------------------------------------------------------------------------
# Input formats
# --------------------------------------------------------------------------------------------------
def test_gtf_input_matches_dataframe(tmp_path):
    gtf = write_gtf(tmp_path / "genes.gtf.gz", GTF_RECORDS)
    from_df = rmge.pp.gene_activity(make_atac(), GENES, upstream=500, drop_empty=False)
    from_gtf = rmge.pp.gene_activity(make_atac(), gtf, upstream=500, drop_empty=False)
    # 1-based inclusive GTF records become the same 0-based half-open intervals; lincRNA filtered out.
    assert list(from_gtf.var_names) == ["A", "B", "C", "D"]
    pd.testing.assert_frame_equal(from_gtf.var, from_df.var)
    np.testing.assert_array_equal(from_gtf.X.toarray(), from_df.X.toarray())
    assert from_gtf.uns["gene_activity"]["genes"] == str(gtf)


def test_plain_gtf_gene_type_none_and_gene_id_key(tmp_path):
    gtf = write_gtf(tmp_path / "genes.gtf", GTF_RECORDS)
    out = rmge.pp.gene_activity(make_atac(), gtf, upstream=500, gene_type=None, gene_id_key="gene_id")
    # LINC spans [0, 20200) on '+': p0..p4 and p6 (not p5, on chr2).
    assert "ID_LINC" in out.var_names and "ID_A" in out.var_names
    np.testing.assert_array_equal(dense(out, ["ID_LINC"]).ravel(), COUNTS[:, [0, 1, 2, 3, 4, 6]].sum(1))
    assert out.uns["gene_activity"]["gene_type"] == "all"


@pytest.mark.parametrize("fmt", ["{c}-{s}-{e}", "{c}_{s}_{e}", "{c}:{s}-{e}"])
def test_peak_name_formats(fmt):
    names = [fmt.format(c=c, s=s, e=e) for c, s, e in PEAKS]
    out = rmge.pp.gene_activity(make_atac(names=names), GENES, upstream=500)
    np.testing.assert_array_equal(dense(out, ["A", "B"]), [[2, 3], [4, 1], [2, 2]])


def test_peak_names_with_underscored_scaffold():
    names = [f"{c}:{s}-{e}" for c, s, e in PEAKS]
    names[6] = "chrUn_gl000220_20000_20100"
    coords = ga_mod._peak_coordinates(pd.DataFrame(index=names), pd.Index(names))
    assert coords.loc[6].tolist() == ["chrUn_gl000220", 20000, 20100]


TRICKY_NAMES = [
    "chr1:100-600",
    "chr1-100-600",
    "chr1_100_600",
    "1:0-1",
    "chrUn_gl000220:5-10",
    "HLA-A*01:01:01:01:7-99",
    "chr1:100-600-1",
    "chrX:123456789012-123456789999",
    "chr1:100:600",
    "chr1:100-",
    ":100-600",
    "chr1:-600",
    "chr1:1x0-600",
    "peak_17",
    "",
    "chr1 100 600",
    "chr1:100-600 ",
    "chr1:1234567890123456789-1",
]


@pytest.mark.parametrize("non_ascii", [False, True])
def test_peak_name_parser_matches_regex(non_ascii):
    names = TRICKY_NAMES + (["chré:1-2", "chré"] if non_ascii else [])
    ok, chrom, start, end = ga_mod._parse_peak_names(np.asarray(names, dtype=str))
    ref = pd.Series(names).str.extract(ga_mod._PEAK_NAME_RE)
    ref_ok = ref["chrom"].notna().to_numpy() & (ref["start"].str.len() <= 18).fillna(False).to_numpy()
    np.testing.assert_array_equal(ok, ref_ok)
    np.testing.assert_array_equal(chrom[ok], ref["chrom"][ok].to_numpy())
    np.testing.assert_array_equal(start[ok], ref["start"][ok].astype(np.int64).to_numpy())
    np.testing.assert_array_equal(end[ok], ref["end"][ok].astype(np.int64).to_numpy())
    assert ok[:8].all() and not ok[8 : len(TRICKY_NAMES)].any()


@pytest.mark.parametrize("chrom_col", ["chrom", "seqnames", "chr"])
def test_peak_var_columns(chrom_col):
    chroms, starts, ends = zip(*PEAKS, strict=True)
    atac = make_atac(names=[f"peak{i}" for i in range(len(PEAKS))], start=list(starts), end=list(ends))
    atac.var[chrom_col] = list(chroms)
    out = rmge.pp.gene_activity(atac, GENES, upstream=500)
    np.testing.assert_array_equal(dense(out, ["A", "B"]), [[2, 3], [4, 1], [2, 2]])


def test_chromosome_names_harmonised_both_ways():
    names = [f"{c.removeprefix('chr')}:{s}-{e}" for c, s, e in PEAKS]
    with pytest.warns(UserWarning, match="renamed to the peaks' style"):
        out = rmge.pp.gene_activity(make_atac(names=names), GENES, upstream=500)
    np.testing.assert_array_equal(dense(out, ["A", "B"]), [[2, 3], [4, 1], [2, 2]])
    assert out.var.loc["A", "chrom"] == "1"
    assert out.uns["gene_activity"]["chromosomes_renamed"] is True

    genes = GENES.assign(chrom=GENES["chrom"].str.removeprefix("chr"))
    with pytest.warns(UserWarning, match="renamed"):
        out2 = rmge.pp.gene_activity(make_atac(), genes, upstream=500)
    np.testing.assert_array_equal(out2.X.toarray(), out.X.toarray())


def test_mitochondrial_names_harmonised():
    atac = make_atac(names=["chrM:100-200", "chrM:300-400"], X=np.ones((3, 2)))
    genes = pd.DataFrame({"chrom": ["MT"], "start": [150], "end": [350], "strand": ["+"], "gene_name": ["MT-X"]})
    with pytest.warns(UserWarning, match="renamed"):
        out = rmge.pp.gene_activity(atac, genes, upstream=0, gene_type=None)
    np.testing.assert_array_equal(out.X.toarray().ravel(), [2, 2, 2])


def test_no_chromosome_warning_when_names_match():
    atac = make_atac()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rmge.pp.gene_activity(atac, GENES, upstream=500)


def test_duplicate_names_merge_and_unique():
    genes = pd.concat(
        [GENES, pd.DataFrame({"chrom": ["chr1"], "start": [1200], "end": [5050], "strand": ["+"], "gene_name": ["A"]})]
    ).assign(gene_type="protein_coding")
    # Second record of A: [700, 5050) with 500 bp upstream -> p1, p2, p3.
    with pytest.warns(UserWarning, match="1 gene name"):
        merged = rmge.pp.gene_activity(make_atac(), genes, upstream=500)
    assert list(merged.var_names) == ["A", "B"]
    # Union of regions: p1, p2, p3 each counted once.
    np.testing.assert_array_equal(dense(merged, ["A"]).ravel(), COUNTS[:, [1, 2, 3]].sum(1))
    assert merged.var.loc["A", "n_records"] == 2 and merged.var.loc["A", "n_peaks"] == 3
    assert merged.var.loc["A", "start"] == 1000  # first record's span

    with pytest.warns(UserWarning, match="made unique"):
        unique = rmge.pp.gene_activity(make_atac(), genes, upstream=500, duplicates="unique")
    assert list(unique.var_names) == ["A", "B", "A-1"]
    np.testing.assert_array_equal(dense(unique, ["A-1"]).ravel(), COUNTS[:, [1, 2, 3]].sum(1))
    np.testing.assert_array_equal(dense(unique, ["A"]).ravel(), COUNTS[:, [1, 2]].sum(1))


def test_merge_counts_shared_peak_once_with_largest_weight():
    genes = pd.DataFrame(
        {"chrom": ["chr1", "chr1"], "start": [1000, 1550], "end": [1600, 3000], "strand": ["+", "+"]}
    ).assign(gene_name="G")
    # p2 = [1500, 1600) overlaps both records: 500 bp from the first TSS (1000), holds the second (1550).
    with pytest.warns(UserWarning, match="merged"):
        plain = rmge.pp.gene_activity(make_atac(), genes, upstream=0, gene_type=None)
    np.testing.assert_array_equal(plain.X.toarray().ravel(), COUNTS[:, 2])
    assert plain.var.loc["G", "n_peaks"] == 1
    with pytest.warns(UserWarning, match="merged"):
        weighted = rmge.pp.gene_activity(make_atac(), genes, upstream=0, gene_type=None, distance_weight="exponential")
    np.testing.assert_allclose(weighted.X.toarray().ravel(), COUNTS[:, 2] * _w(0), rtol=1e-6)


def test_overlap_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    n_p, n_g = 3000, 400
    p_chrom = rng.choice(["chr1", "chr2", "chrX"], n_p)
    p_start = rng.integers(0, 1_000_000, n_p)
    p_end = p_start + rng.integers(1, 3000, n_p)
    p_end[::500] += 50_000  # a few long peaks
    g_chrom = rng.choice(["chr1", "chr2", "chr3"], n_g)
    g_start = rng.integers(0, 1_000_000, n_g)
    g_end = g_start + rng.integers(1, 80_000, n_g)
    monkeypatch.setattr(ga_mod, "_MAX_CANDIDATES", 5_000)  # exercise the blocked search
    pi, gi = ga_mod._overlap_pairs(p_chrom, p_start, p_end, g_chrom, g_start, g_end)
    got = set(zip(pi.tolist(), gi.tolist(), strict=True))
    hit = (
        (p_chrom[:, None] == g_chrom[None, :])
        & (p_start[:, None] < g_end[None, :])
        & (p_end[:, None] > g_start[None, :])
    )
    want = set(zip(*np.nonzero(hit), strict=True))
    assert got == {(int(a), int(b)) for a, b in want}
    assert len(got) == len(pi) > 0


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_unparseable_peak_names():
    names = [f"{c}:{s}-{e}" for c, s, e in PEAKS]
    names[3] = "weird_peak"
    with pytest.raises(ValueError, match=r"1 of 7 peak.*'weird_peak'.*chr1:100-600"):
        rmge.pp.gene_activity(make_atac(names=names), GENES)


def test_peak_end_before_start():
    names = [f"{c}:{s}-{e}" for c, s, e in PEAKS]
    names[0] = "chr1:300-200"
    with pytest.raises(ValueError, match=r"end <= start.*chr1:300-200"):
        rmge.pp.gene_activity(make_atac(names=names), GENES)


def test_non_numeric_var_columns():
    atac = make_atac(names=[f"p{i}" for i in range(7)], chrom=["chr1"] * 7, start=["x"] + [1] * 6, end=[5] * 7)
    with pytest.raises(ValueError, match=r"no numeric start/end.*'p0'"):
        rmge.pp.gene_activity(atac, GENES)


def test_missing_gtf(tmp_path):
    with pytest.raises(FileNotFoundError, match="GTF file not found"):
        rmge.pp.gene_activity(make_atac(), tmp_path / "nope.gtf.gz")


def test_gtf_without_gene_records(tmp_path):
    records = [r[:6] + ("transcript",) for r in GTF_RECORDS]
    gtf = write_gtf(tmp_path / "tx.gtf.gz", records)
    with pytest.raises(ValueError, match=r"no 'gene' records.*'transcript'"):
        rmge.pp.gene_activity(make_atac(), gtf)


def test_gtf_without_name_attribute(tmp_path):
    gtf = write_gtf(tmp_path / "genes.gtf", GTF_RECORDS)
    with pytest.raises(ValueError, match=r"no attribute 'symbol'.*gene_name"):
        rmge.pp.gene_activity(make_atac(), gtf, gene_id_key="symbol")


def test_unknown_gene_type():
    with pytest.raises(ValueError, match=r"No gene has gene_type in \['miRNA'\].*protein_coding"):
        rmge.pp.gene_activity(make_atac(), GENES, gene_type="miRNA")


def test_gene_type_ignored_without_column():
    with pytest.warns(UserWarning, match="no gene_type"):
        out = rmge.pp.gene_activity(make_atac(), GENES.drop(columns="gene_type"), upstream=500)
    assert list(out.var_names) == ["A", "B"]


def test_dataframe_missing_columns():
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['strand'\]"):
        rmge.pp.gene_activity(make_atac(), GENES.drop(columns="strand"))


def test_no_shared_chromosome():
    genes = GENES.assign(chrom="chrZ")
    with pytest.raises(ValueError, match=r"share no chromosome.*same genome assembly"):
        rmge.pp.gene_activity(make_atac(), genes)


def test_no_overlap_at_all():
    genes = GENES.assign(start=GENES["start"] + 500_000, end=GENES["end"] + 500_000)
    with pytest.raises(ValueError, match=r"No peak overlaps any of the 4 gene regions"):
        rmge.pp.gene_activity(make_atac(), genes)


@pytest.mark.parametrize(("value", "match"), [(-1.0, "negative"), (np.nan, "non-finite"), (np.inf, "non-finite")])
def test_bad_counts(value, match):
    X = COUNTS.copy()
    X[1, 2] = value
    with pytest.raises(ValueError, match=match):
        rmge.pp.gene_activity(make_atac(X=X), GENES)


def test_non_count_input_warns():
    with pytest.warns(UserWarning, match="does not look like integer counts"):
        out = rmge.pp.gene_activity(make_atac(X=COUNTS * 0.5), GENES, upstream=500)
    np.testing.assert_allclose(dense(out, ["A"]).ravel(), [1, 2, 1])


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"upstream": -5}, ValueError, "upstream must be a non-negative integer"),
        ({"downstream": 1.5}, ValueError, "downstream must be a non-negative integer"),
        ({"distance_weight": "gaussian"}, ValueError, "Unknown distance_weight 'gaussian'"),
        ({"distance_scale": 0}, ValueError, "distance_scale must be a positive number"),
        ({"duplicates": "sum"}, ValueError, "duplicates must be 'merge' or 'unique'"),
        ({"layer": "counts"}, KeyError, "Layer 'counts' not found"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer"),
    ],
)
def test_bad_parameters(kwargs, err, match):
    with pytest.raises(err, match=match):
        rmge.pp.gene_activity(make_atac(), GENES, **kwargs)


def test_bad_callable_weights():
    with pytest.raises(ValueError, match="negative or non-finite weights"):
        rmge.pp.gene_activity(make_atac(), GENES, distance_weight=lambda d: -np.ones_like(d, dtype=float))


def test_not_anndata():
    with pytest.raises(TypeError, match="atac must be an AnnData"):
        rmge.pp.gene_activity(sp.csr_matrix(COUNTS), GENES)


# --------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.skipif(
    not (os.path.exists(PEAKS_H5AD) and os.path.exists(GTF_HG19)), reason="shared real data not available"
)
def test_granja_peaks_marker_enrichment():
    atac = ad.read_h5ad(PEAKS_H5AD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicated GENCODE names are merged
        ga = rmge.pp.gene_activity(atac, GTF_HG19)
    # 10,000 random peaks reach about a quarter of the ~20,000 protein-coding genes.
    assert 3_000 < ga.n_vars < 8_000
    assert ga.n_obs == atac.n_obs and ga.var_names.is_unique
    assert np.all(ga.X.data == np.round(ga.X.data)) and ga.X.data.min() > 0
    # Column sums of 25 random genes equal a brute-force sum over the peaks overlapping their regions.
    peaks = ga_mod._peak_coordinates(atac.var, atac.var_names)
    peak_totals = np.asarray(atac.X.sum(0)).ravel()
    gene_totals = np.asarray(ga.X.sum(0)).ravel()
    for j in np.random.default_rng(0).choice(ga.n_vars, 25, replace=False):
        row = ga.var.iloc[j]
        if row["n_records"] != 1:
            continue
        lo = row["start"] - (2000 if row["strand"] == "+" else 0)
        hi = row["end"] + (2000 if row["strand"] == "-" else 0)
        hit = (peaks["chrom"] == row["chrom"]) & (peaks["start"] < hi) & (peaks["end"] > lo)
        assert hit.sum() == row["n_peaks"]
        assert gene_totals[j] == pytest.approx(peak_totals[hit.to_numpy()].sum())
    labels = atac.obs["BioClassification"].astype(str)
    group = np.select(
        [labels.str.contains("Mono"), labels.str.contains(r"CD4|CD8"), labels == "17_B"],
        ["mono", "T", "B"],
        default="other",
    )

    def mean_by_group(gene):
        x = ga[:, gene].X.toarray().ravel()
        return pd.Series(x).groupby(group).mean()

    # MS4A1, CD79A and CD14 have no peak in this 10,000-peak sample; these lineage markers do.
    for gene, high, lows in [
        ("EBF1", "B", ["T", "mono"]),
        ("BANK1", "B", ["T"]),
        ("CD74", "B", ["T"]),
        ("CD3E", "T", ["B", "mono"]),
        ("BCL11B", "T", ["B", "mono"]),
        ("CEBPA", "mono", ["B", "T"]),
        ("CLEC7A", "mono", ["B", "T"]),
        ("LYZ", "mono", ["B", "T"]),
    ]:
        m = mean_by_group(gene)
        assert m[high] > 3 * m[lows].max(), (gene, m.to_dict())
