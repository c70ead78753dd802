"""Tests of the Stereo-seq readers against brute-force binning of small synthetic GEM and GEF files."""

from __future__ import annotations

import gzip
from collections import defaultdict

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import rmge
from rmge.io import read_gef, read_gem, read_stereo_seq

GENES = [f"Gene{i:02d}" for i in range(12)]


# --------------------------------------------------------------------------------------------- #
# Synthetic data and brute-force answers
# --------------------------------------------------------------------------------------------- #
def make_lines(seed=0, n=600, span=400, negative=False, cells=False) -> pd.DataFrame:
    """GEM-like lines; a few (gene, x, y) lines are repeated and some counts are zero."""
    rng = np.random.default_rng(seed)
    lo = -60 if negative else 0
    df = pd.DataFrame(
        {
            "geneID": rng.choice(GENES, n),
            "x": rng.integers(lo, span, n),
            "y": rng.integers(lo, span, n),
            "MIDCount": rng.integers(0, 6, n),
        }
    )
    df["ExonCount"] = np.minimum(df["MIDCount"], rng.integers(0, 3, n))
    df = pd.concat([df, df.iloc[:25]], ignore_index=True)  # repeated lines must be summed
    if cells:
        df["CellID"] = rng.integers(0, 9, len(df))  # 0 = outside every cell
    return df


def brute_bins(df: pd.DataFrame, bin_size: int) -> dict[tuple[int, int], dict[str, int]]:
    out: dict[tuple[int, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for g, x, y, c in zip(df["geneID"], df["x"], df["y"], df["MIDCount"], strict=True):
        if c == 0:
            continue
        bx = int(x) // bin_size  # Python's // is floor division, also for negative x
        by = int(y) // bin_size
        out[(bx, by)][g] += int(c)
    return out


def check_against_brute(adata: ad.AnnData, df: pd.DataFrame, bin_size: int) -> None:
    expected = brute_bins(df, bin_size)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert set(adata.obs_names) == {f"{bx}_{by}" for bx, by in expected}
    genes_present = sorted({g for d in expected.values() for g in d})
    assert list(adata.var_names) == genes_present
    dense = adata.X.toarray()
    col = {g: j for j, g in enumerate(adata.var_names)}
    for i, name in enumerate(adata.obs_names):
        bx, by = (int(v) for v in name.split("_"))
        assert adata.obs["bin_x"].iloc[i] == bx and adata.obs["bin_y"].iloc[i] == by
        row = np.zeros(len(col))
        for g, c in expected[(bx, by)].items():
            row[col[g]] = c
        np.testing.assert_array_equal(dense[i], row)
        centre = [bx * bin_size + (bin_size - 1) / 2, by * bin_size + (bin_size - 1) / 2]
        np.testing.assert_array_equal(adata.obsm["spatial"][i], centre)
        assert adata.obs["total_counts"].iloc[i] == row.sum()
        assert adata.obs["n_genes"].iloc[i] == (row > 0).sum()
    assert np.all(dense == np.round(dense))


def write_gem(path, df, header=True, exon=True, count_name="MIDCount", extra_cols=()):
    cols = ["geneID", "x", "y", "MIDCount"] + (["ExonCount"] if exon else []) + list(extra_cols)
    out = df[cols].rename(columns={"MIDCount": count_name})
    text = ""
    if header:
        text += "#FileFormat=GEMv0.1\n#SortedBy=None\n#BinSize=1\n#STOmicsChip=A02677B5\n#OffsetX=1250\n#OffsetY=-30\n"
    text += out.to_csv(sep="\t", index=False)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as fh:
        fh.write(text)
    return path


def write_square_gef(path, df, bins=(1, 50), gene_fields="gene", index_coords=False):
    """Square-bin GEF following geftools: /geneExp/bin{N}/{expression, gene}, rows grouped by gene."""
    str64 = "S64"
    with h5py.File(path, "w") as f:
        f.attrs["version"] = np.uint32(2)
        f.attrs["geftool_ver"] = np.array([0, 7, 6], dtype=np.uint32)
        f.attrs["omics"] = np.bytes_("Transcriptomics")
        f.attrs["bin_type"] = np.bytes_("Bin")
        f.attrs["offsetX"] = np.int32(1250)
        f.attrs["offsetY"] = np.int32(-30)
        ge = f.create_group("geneExp")
        for b in bins:
            d = df[df["MIDCount"] > 0].copy()
            d["bx"], d["by"] = d["x"] // b, d["y"] // b
            agg = (
                d.groupby(["geneID", "bx", "by"], as_index=False)["MIDCount"].sum().sort_values(["geneID", "bx", "by"])
            )
            exp = np.zeros(len(agg), dtype=[("x", "<i4"), ("y", "<i4"), ("count", "<u2")])
            scale = 1 if index_coords else b
            exp["x"], exp["y"], exp["count"] = agg["bx"] * scale, agg["by"] * scale, agg["MIDCount"]
            names = sorted(agg["geneID"].unique())
            sizes = agg.groupby("geneID").size().reindex(names).to_numpy()
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            if gene_fields == "gene":
                gene = np.zeros(len(names), dtype=[("gene", str64), ("offset", "<u4"), ("count", "<u4")])
                gene["gene"] = [n.encode() for n in names]
            else:  # newer layout with separate ID and symbol
                gene = np.zeros(
                    len(names), dtype=[("geneID", str64), ("geneName", str64), ("offset", "<u4"), ("count", "<u4")]
                )
                gene["geneID"] = [f"ENSG{n[-2:]}".encode() for n in names]
                gene["geneName"] = [n.encode() for n in names]
            gene["offset"], gene["count"] = offsets, sizes
            grp = ge.create_group(f"bin{b}")
            ds = grp.create_dataset("expression", data=exp)
            for k, v in (
                ("minX", d["x"].min()),
                ("minY", d["y"].min()),
                ("maxX", d["x"].max()),
                ("maxY", d["y"].max()),
            ):
                ds.attrs[k] = np.int32((v // b) * b)
            ds.attrs["maxExp"] = np.uint32(exp["count"].max())
            ds.attrs["resolution"] = np.uint32(500)
            grp.create_dataset("gene", data=gene)
    return path


# --------------------------------------------------------------------------------------------- #
# GEM
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("suffix", "header", "exon", "count_name", "bin_size"),
    [
        (".gem", True, True, "MIDCount", 50),
        (".gem.gz", True, False, "MIDCounts", 7),
        (".txt", False, True, "UMICount", 1),
        (".txt.gz", False, False, "MIDCount", 100),
    ],
)
def test_gem_matches_bruteforce(tmp_path, suffix, header, exon, count_name, bin_size):
    df = make_lines(seed=bin_size)
    path = write_gem(tmp_path / f"sample{suffix}", df, header=header, exon=exon, count_name=count_name)
    adata = read_stereo_seq(path, bin_size=bin_size)
    check_against_brute(adata, df, bin_size)
    meta = adata.uns["stereo_seq"]
    assert meta["bin_size"] == bin_size and meta["format"] == "gem" and meta["source"] == str(path)
    assert meta["n_lines"] == len(df)
    assert (meta["offset_x"], meta["offset_y"]) == ((1250, -30) if header else (0, 0))
    assert (meta["min_x"], meta["min_y"]) == (df["x"].min(), df["y"].min())
    if header:
        assert meta["header"]["FileFormat"] == "GEMv0.1"


def test_gem_negative_coordinates_use_floor(tmp_path):
    df = make_lines(seed=3, negative=True)
    adata = read_gem(write_gem(tmp_path / "neg.gem", df), bin_size=25)
    check_against_brute(adata, df, 25)
    assert (adata.obs["bin_x"] < 0).any()


def test_gem_chunked_equals_one_shot(tmp_path):
    df = make_lines(seed=11, n=900)
    path = write_gem(tmp_path / "chunks.gem.gz", df)
    whole = read_gem(path, bin_size=30)
    for chunk_size in (1, 7, 64):
        part = read_gem(path, bin_size=30, chunk_size=chunk_size)
        assert list(part.obs_names) == list(whole.obs_names)
        assert list(part.var_names) == list(whole.var_names)
        assert (part.X != whole.X).nnz == 0
        np.testing.assert_array_equal(part.obsm["spatial"], whole.obsm["spatial"])
        pd.testing.assert_frame_equal(part.obs, whole.obs)


@pytest.mark.parametrize("min_fold", [0, 10**9])
def test_accumulator_sums_across_chunks(min_fold):
    """Chunks folded into the running matrix one by one (min_fold=0) or all at the end give the same sums."""
    from rmge.io._stereo import _Accumulator

    rng = np.random.default_rng(1)
    acc, truth = _Accumulator(min_fold=min_fold), defaultdict(int)
    for _ in range(30):
        k, g, c = rng.integers(-5, 5, 40), rng.integers(0, 6, 40), rng.integers(0, 4, 40)
        acc.add(k, g, c, n_genes=6)
        for kk, gg, cc in zip(k, g, c, strict=True):
            truth[(kk, gg)] += cc
    keys, X = acc.result(n_genes=6)
    assert np.all(np.diff(keys) > 0)
    got = {(keys[i], j): X[i, j] for i, j in zip(*X.nonzero(), strict=True)}
    assert got == {kg: v for kg, v in truth.items() if v > 0}


def test_gem_gene_name_column(tmp_path):
    df = make_lines(seed=5)
    df["geneName"] = df["geneID"].str.replace("Gene", "Sym")
    df["geneID"] = df["geneID"].str.replace("Gene", "ENSMUSG")
    path = write_gem(tmp_path / "v02.gem", df, extra_cols=["geneName"])
    adata = read_gem(path, bin_size=40)
    assert adata.var_names[0].startswith("ENSMUSG")
    np.testing.assert_array_equal(adata.var["gene_name"], [g.replace("ENSMUSG", "Sym") for g in adata.var_names])
    check_against_brute(adata, df, 40)


@pytest.mark.parametrize("cell_col", ["CellID", "label"])
def test_gem_cellbin(tmp_path, cell_col):
    df = make_lines(seed=21, cells=True).rename(columns={"CellID": cell_col})
    path = write_gem(tmp_path / "cells.cellbin.gem", df, extra_cols=[cell_col])
    adata = read_stereo_seq(path, bin_size="cellbin", chunk_size=50)
    kept = df[(df[cell_col] != 0) & (df["MIDCount"] > 0)]
    assert set(adata.obs_names) == {str(c) for c in kept[cell_col].unique()}
    assert adata.uns["stereo_seq"]["bin_size"] == "cellbin"
    col = {g: j for j, g in enumerate(adata.var_names)}
    for i, cid in enumerate(adata.obs_names):
        sub = kept[kept[cell_col] == int(cid)]
        row = np.zeros(adata.n_vars)
        for g, c in zip(sub["geneID"], sub["MIDCount"], strict=True):
            row[col[g]] += c
        np.testing.assert_array_equal(adata.X[i].toarray().ravel(), row)
        w = sub["MIDCount"].to_numpy(float)
        centre = [(sub["x"] * w).sum() / w.sum(), (sub["y"] * w).sum() / w.sum()]
        np.testing.assert_allclose(adata.obsm["spatial"][i], centre, rtol=0, atol=1e-9)
        np.testing.assert_allclose(adata.obs[["x", "y"]].iloc[i], centre, atol=1e-9)
    # The same file with an integer bin size ignores the cell column.
    check_against_brute(read_gem(path, bin_size=60), df, 60)


def test_h5ad_round_trip(tmp_path):
    df = make_lines(seed=8)
    adata = read_gem(write_gem(tmp_path / "rt.gem", df), bin_size=50)
    out = tmp_path / "rt.h5ad"
    adata.write_h5ad(out)
    back = ad.read_h5ad(out)
    assert (back.X != adata.X).nnz == 0
    np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    assert back.uns["stereo_seq"]["bin_size"] == 50
    assert back.X.dtype == np.float32


# --------------------------------------------------------------------------------------------- #
# GEF
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize(("stored", "requested"), [((1, 50), 50), ((1, 50), 20), ((1,), 33), ((10, 50), 100)])
def test_gef_square_bins(tmp_path, stored, requested):
    df = make_lines(seed=requested)
    path = write_square_gef(tmp_path / "sample.gef", df, bins=stored)
    adata = read_stereo_seq(path, bin_size=requested, block_size=37)
    check_against_brute(adata, df, requested)
    meta = adata.uns["stereo_seq"]
    assert meta["format"] == "gef"
    assert meta["gef_bin_read"] == max(b for b in stored if requested % b == 0)
    assert (meta["offset_x"], meta["offset_y"]) == (1250, -30)
    # GEF and GEM of the same data give the same AnnData.
    gem = read_gem(write_gem(tmp_path / "same.gem", df), bin_size=requested)
    assert list(gem.obs_names) == list(adata.obs_names) and list(gem.var_names) == list(adata.var_names)
    assert (gem.X != adata.X).nnz == 0


def test_gef_gene_id_and_name_fields(tmp_path):
    df = make_lines(seed=2)
    adata = read_gef(write_square_gef(tmp_path / "v4.gef", df, bins=(1,), gene_fields="idname"), bin_size=50)
    assert all(v.startswith("ENSG") for v in adata.var_names)
    np.testing.assert_array_equal(adata.var["gene_name"], ["Gene" + v[-2:] for v in adata.var_names])


def test_gef_bin_indices_layout_is_recognised(tmp_path):
    df = make_lines(seed=4)
    path = write_square_gef(tmp_path / "idx.gef", df, bins=(50,), index_coords=True)
    with pytest.warns(UserWarning, match="read as bin indices"):
        adata = read_gef(path, bin_size=50)
    check_against_brute(adata, df, 50)


def test_gef_duplicate_gene_names_are_made_unique(tmp_path):
    df = make_lines(seed=6)
    path = write_square_gef(tmp_path / "dup.gef", df, bins=(1,))
    with h5py.File(path, "r+") as f:
        gene = f["geneExp/bin1/gene"][()]
        gene["gene"][1] = gene["gene"][0]
        f["geneExp/bin1/gene"][...] = gene
    with pytest.warns(UserWarning, match="occur more than once"):
        adata = read_gef(path, bin_size=50)
    assert adata.var_names.is_unique
    assert adata.var["gene_id"].iloc[0] == adata.var["gene_id"].iloc[1] == "Gene00"


def write_cellbin_gef(path, n_cells=5, seed=0):
    rng = np.random.default_rng(seed)
    genes = GENES[:8]
    dense = rng.integers(0, 4, size=(n_cells, len(genes))) * (rng.random((n_cells, len(genes))) < 0.6)
    entries = [np.flatnonzero(dense[i]) for i in range(n_cells)]
    # Store the cells' blocks of cellExp in reverse order to exercise the offsets.
    cell_exp, offsets, pos = [], np.zeros(n_cells, dtype=np.int64), 0
    for i in reversed(range(n_cells)):
        offsets[i] = pos
        for j in entries[i]:
            cell_exp.append((j, dense[i, j]))
        pos += len(entries[i])
    cell = np.zeros(
        n_cells,
        dtype=[
            ("id", "<u4"),
            ("x", "<i4"),
            ("y", "<i4"),
            ("offset", "<u4"),
            ("geneCount", "<u2"),
            ("expCount", "<u2"),
            ("dnbCount", "<u2"),
            ("area", "<u2"),
            ("cellTypeID", "<u2"),
            ("clusterID", "<u2"),
        ],
    )
    cell["id"] = np.arange(n_cells) + 100
    cell["x"], cell["y"] = rng.integers(0, 5000, n_cells), rng.integers(0, 5000, n_cells)
    cell["offset"], cell["geneCount"] = offsets, [len(e) for e in entries]
    cell["expCount"], cell["area"], cell["dnbCount"] = dense.sum(1), rng.integers(50, 90, n_cells), 7
    gene = np.zeros(
        len(genes),
        dtype=[
            ("geneName", "S64"),
            ("offset", "<u4"),
            ("cellCount", "<u4"),
            ("expCount", "<u4"),
            ("maxMIDcount", "<u2"),
        ],
    )
    gene["geneName"] = [g.encode() for g in genes]
    exp = np.array(cell_exp, dtype=[("geneID", "<u4"), ("count", "<u2")])
    with h5py.File(path, "w") as f:
        f.attrs["version"] = np.uint32(2)
        f.attrs["offsetX"], f.attrs["offsetY"] = np.int32(7), np.int32(9)
        cb = f.create_group("cellBin")
        cb.create_dataset("cell", data=cell)
        cb.create_dataset("gene", data=gene)
        cb.create_dataset("cellExp", data=exp)
    return path, dense, cell, genes


def test_gef_cellbin(tmp_path):
    path, dense, cell, genes = write_cellbin_gef(tmp_path / "s.cellbin.gef")
    adata = read_stereo_seq(path, bin_size="cellbin")
    assert list(adata.obs_names) == [str(i) for i in cell["id"]]
    assert list(adata.var_names) == genes
    np.testing.assert_array_equal(adata.X.toarray(), dense)
    np.testing.assert_array_equal(adata.obsm["spatial"], np.column_stack([cell["x"], cell["y"]]))
    np.testing.assert_array_equal(adata.obs["area"], cell["area"])
    np.testing.assert_array_equal(adata.obs["total_counts"], dense.sum(1))
    assert (adata.uns["stereo_seq"]["offset_x"], adata.uns["stereo_seq"]["offset_y"]) == (7, 9)


# --------------------------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------------------------- #
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_stereo_seq(tmp_path / "nope.gem")


def test_unknown_format(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="Unknown Stereo-seq file format"):
        read_stereo_seq(path)
    fake = tmp_path / "broken.gef"
    fake.write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        read_stereo_seq(fake)
    gem = write_gem(tmp_path / "ok.gem", make_lines())
    gef = write_square_gef(tmp_path / "ok.gef", make_lines(), bins=(1,))
    with pytest.raises(ValueError, match="use rmge.io.read_gef"):
        read_gem(gef)
    with pytest.raises(ValueError, match="not an HDF5 file, so not a GEF file"):
        read_gef(gem)
    empty = tmp_path / "empty.gem"
    empty.write_text("#FileFormat=GEMv0.1\n")
    with pytest.raises(ValueError, match="no column-name line"):
        read_stereo_seq(empty)


def test_options_of_the_other_format_are_rejected(tmp_path):
    gef = write_square_gef(tmp_path / "ok.gef", make_lines(), bins=(1,))
    with pytest.raises(TypeError, match=r"\['chunk_size'\] do not apply .* GEF file; GEF files take"):
        read_stereo_seq(gef, chunk_size=10)
    gem = write_gem(tmp_path / "ok.gem", make_lines())
    with pytest.raises(TypeError, match=r"\['block_size'\] do not apply"):
        read_stereo_seq(gem, block_size=10)


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "bad.gem"
    path.write_text("#FileFormat=GEMv0.1\ngeneID\tx\tcount_of_things\nA\t1\t2\n")
    with pytest.raises(ValueError, match=r"\['y', 'MIDCount'\]"):
        read_gem(path)


@pytest.mark.parametrize(
    ("value", "match"),
    [("1.5", "must hold integers, but line 5 holds 1.5"), ("-2", "negative count \\(-2\\) on line 5"), ("", "missing")],
)
def test_bad_counts(tmp_path, value, match):
    path = tmp_path / "bad.gem"
    path.write_text(
        f"#FileFormat=GEMv0.1\n#OffsetX=0\ngeneID\tx\ty\tMIDCount\nA\t1\t2\t3\nB\t4\t5\t{value}\nC\t6\t7\t1\n"
    )
    with pytest.raises(ValueError, match=match):
        read_gem(path, chunk_size=1)


def test_bad_coordinates(tmp_path):
    path = tmp_path / "bad.gem"
    path.write_text("geneID\tx\ty\tMIDCount\nA\t1\tseven\t3\n")
    with pytest.raises(ValueError, match="'y' \\(y coordinate\\) must hold integers, but line 2 holds 'seven'"):
        read_gem(path)


@pytest.mark.parametrize("bad", [0, -50, 2.5, "big", True])
def test_bad_bin_size(tmp_path, bad):
    path = write_gem(tmp_path / "ok.gem", make_lines())
    with pytest.raises(ValueError, match="bin_size"):
        read_stereo_seq(path, bin_size=bad)


def test_gef_bin_size_unavailable_without_bin1(tmp_path):
    path = write_square_gef(tmp_path / "no1.gef", make_lines(), bins=(50, 100))
    with pytest.raises(ValueError, match=r"stores bins \[50, 100\] and no bin1"):
        read_gef(path, bin_size=20)
    assert read_gef(path, bin_size=200).n_obs > 0  # 200 is re-binned from bin100


def test_cellbin_errors(tmp_path):
    gem = write_gem(tmp_path / "plain.gem", make_lines())
    with pytest.raises(ValueError, match="needs a cell column"):
        read_gem(gem, bin_size="cellbin")
    square = write_square_gef(tmp_path / "sq.gef", make_lines(), bins=(1,))
    with pytest.raises(ValueError, match="holds no /cellBin group"):
        read_gef(square, bin_size="cellbin")
    cellbin, *_ = write_cellbin_gef(tmp_path / "c.gef")
    with pytest.raises(ValueError, match="bin_size='cellbin'"):
        read_gef(cellbin, bin_size=50)


def test_public_api():
    assert set(rmge.io.__all__) >= {"read_stereo_seq", "read_gem", "read_gef"}
