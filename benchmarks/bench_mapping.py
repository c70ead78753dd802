"""Time and peak memory of rmge.tl.map_cells on synthetic latent spaces (one configuration per process)."""

import argparse
import json
import resource
import time

import numpy as np

import rmge


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


p = argparse.ArgumentParser()
p.add_argument("--n-spatial", type=int, default=100_000)
p.add_argument("--n-reference", type=int, default=10_000)
p.add_argument("--n-types", type=int, default=15)
p.add_argument("--dims", type=int, default=15)
p.add_argument("--k", type=int, default=5)
p.add_argument("--method", default="nndescent")
p.add_argument("--exact-below", type=int, default=5000)
p.add_argument("--warmup", action="store_true")
a = p.parse_args()

rng = np.random.default_rng(0)
centres = rng.normal(0, 3, (a.n_types, a.dims))
ref_t = rng.integers(0, a.n_types, a.n_reference)
sp_t = rng.integers(0, a.n_types, a.n_spatial)
latent = np.vstack(
    [
        centres[ref_t] + rng.normal(0, 1, (a.n_reference, a.dims)),
        centres[sp_t] + rng.normal(0, 1, (a.n_spatial, a.dims)),
    ]
).astype(np.float32)
labels = np.r_[ref_t, np.full(a.n_spatial, -1)].astype(str)
is_ref = np.r_[np.ones(a.n_reference, bool), np.zeros(a.n_spatial, bool)]
pred = sp_t.astype(str)
del ref_t
base = rss_mb()
out = {"args": vars(a), "rss_after_data_mb": round(base, 1), "latent_mb": round(latent.nbytes / 2**20, 1)}
if a.warmup:
    small = rng.normal(size=(3000, a.dims)).astype(np.float32)
    t = time.time()
    rmge.tl.map_cells(
        small,
        np.r_[np.zeros(2000, int), -np.ones(1000, int)].astype(str),
        np.r_[np.ones(2000, bool), np.zeros(1000, bool)],
        predicted=np.zeros(1000, int).astype(str),
        method="nndescent",
        exact_below=0,
    )
    out["jit_warmup_s"] = round(time.time() - t, 1)
t = time.time()
pairing = rmge.tl.map_cells(latent, labels, is_ref, predicted=pred, k=a.k, method=a.method, exact_below=a.exact_below)
out["time_s"] = round(time.time() - t, 1)
out["peak_rss_mb"] = round(rss_mb(), 1)
out["search"] = sorted(set(pairing.info["search"].values()))
out["n_pairs"] = len(pairing.table)
out["table_mb"] = round(pairing.table.memory_usage(deep=True).sum() / 2**20, 1)
W = pairing.weights
out["weights_mb"] = round((W.data.nbytes + W.indices.nbytes + W.indptr.nbytes) / 2**20, 1)
print(json.dumps(out))
