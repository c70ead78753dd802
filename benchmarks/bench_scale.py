"""Scale benchmark of rmge: a full job on synthetic Stereo-seq-like data of growing size.

Each size runs in its own process: ``setup_anndata``, model set-up, ``train()`` to the default
stopping point, ``predict``, ``get_latent_representation`` and writing an h5ad. Reported: wall
seconds per phase, training throughput (cells per second counting both domains' cells of every
step), prediction throughput, peak resident memory, and the in-memory size of the input sparse
matrix. A plain PyTorch loop doing the same linear encoder/decoder step measures the limit the
training throughput is compared with.

Data: ``--n-reference`` reference cells with about 2,000-5,000 counts each and 10^4-10^6 spatial
bins with about 100-500 counts each (Stereo-seq bin50-like), 2,000 genes, 30 cell types with
type-specific gene programs and a per-gene platform shift. Counts are drawn token by token
(multinomial, alias sampling) one row block at a time and stored as CSR, never densified; the
matrices are cached under ``--cache``.

Examples
--------
python benchmarks/bench_scale.py                                   # 10^4, 10^5, 10^6 bins, 1 thread
python benchmarks/bench_scale.py --sizes 10000,100000 --threads 2
python benchmarks/bench_scale.py --report-only                     # rebuild docs/scale.md from records
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_GENES = 2_000
N_CLASSES = 30
BATCH = 256


# ----------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Current resident memory of this process (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# ----------------------------------------------------------------------------- data
def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table of a discrete distribution (O(1) sampling)."""
    n = len(p)
    q = np.asarray(p, dtype=np.float64) * n
    prob = np.ones(n)
    alias = np.arange(n)
    small = [i for i in range(n) if q[i] < 1.0]
    large = [i for i in range(n) if q[i] >= 1.0]
    while small and large:
        s, big = small.pop(), large.pop()
        prob[s] = q[s]
        alias[s] = big
        q[big] = q[big] + q[s] - 1.0
        (small if q[big] < 1.0 else large).append(big)
    return prob, alias


def _sample_block(tables, codes: np.ndarray, lib: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial counts of a row block (class codes, library sizes) as CSR arrays, without a dense array."""
    n = len(codes)
    keys = []
    for k in np.unique(codes):
        rows = np.flatnonzero(codes == k)
        r = np.repeat(rows.astype(np.int64), lib[rows])
        prob, alias = tables[k]
        g = rng.integers(0, N_GENES, len(r))
        g = np.where(rng.random(len(r)) < prob[g], g, alias[g])
        keys.append(r * N_GENES + g)
    key = np.sort(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.r_[starts, len(key)])
    uk = key[starts]
    indptr = np.searchsorted(uk // N_GENES, np.arange(n + 1))
    return counts.astype(np.float32), (uk % N_GENES).astype(np.int32), indptr


def generate(n_reference: int, n_spatial: int, out: Path, seed: int = 0, block: int = 20_000) -> None:
    """Write reference + spatial counts (CSR arrays) and labels of one size under ``out``."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.0, N_GENES)
    program = np.tile(base, (N_CLASSES, 1)) * rng.lognormal(0.0, 0.2, (N_CLASSES, N_GENES))
    n_markers = 25
    for k in range(N_CLASSES):
        markers = rng.choice(N_GENES, n_markers, replace=False)
        program[k, markers] *= 5.0 * rng.lognormal(0.0, 0.25, n_markers)
    capture = rng.lognormal(0.0, 0.5, N_GENES)
    profiles = {
        "reference": program / program.sum(1, keepdims=True),
        "spatial": (program * capture) / (program * capture).sum(1, keepdims=True),
    }
    tables = {dom: [_alias_table(p) for p in prof] for dom, prof in profiles.items()}
    data, indices, indptrs, codes_all = [], [], [np.zeros(1, dtype=np.int64)], []
    nnz = 0
    for dom, n, median, lo, hi in (
        ("reference", n_reference, 3_200, 2_000, 5_000),
        ("spatial", n_spatial, 250, 100, 500),
    ):
        weights = 0.5 / N_CLASSES + 0.5 * rng.dirichlet(np.ones(N_CLASSES))
        codes = rng.choice(N_CLASSES, n, p=weights / weights.sum())
        lib = np.clip(np.round(rng.lognormal(np.log(median), 0.35, n)), lo, hi).astype(np.int64)
        for start in range(0, n, block):
            d, i, p = _sample_block(tables[dom], codes[start : start + block], lib[start : start + block], rng)
            data.append(d)
            indices.append(i)
            indptrs.append(p[1:] + nnz)
            nnz += len(d)
        codes_all.append(codes)
    out.mkdir(parents=True, exist_ok=True)
    idx_dtype = np.int32 if nnz < 2**31 else np.int64
    np.save(out / "data.npy", np.concatenate(data))
    del data
    np.save(out / "indices.npy", np.concatenate(indices).astype(idx_dtype))
    del indices
    np.save(out / "indptr.npy", np.concatenate(indptrs).astype(idx_dtype))
    np.savez(out / "obs.npz", codes=np.concatenate(codes_all), n_reference=n_reference, n_spatial=n_spatial)
    (out / "done").write_text("ok")


def load(path: Path):
    """AnnData of a generated size (CSR X, obs ``domain``, ``cell_type`` on reference cells, ``truth``)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    data = np.load(path / "data.npy")
    indices = np.load(path / "indices.npy")
    indptr = np.load(path / "indptr.npy")
    obs = np.load(path / "obs.npz")
    n_ref, n_sp = int(obs["n_reference"]), int(obs["n_spatial"])
    X = sp.csr_matrix((data, indices, indptr), shape=(n_ref + n_sp, N_GENES), copy=False)
    names = np.asarray([f"type_{k:02d}" for k in range(N_CLASSES)], dtype=object)
    truth = names[obs["codes"]]
    domain = np.r_[np.repeat("reference", n_ref), np.repeat("spatial", n_sp)]
    label = pd.Categorical(np.where(domain == "reference", truth, None), categories=list(names))
    obs_df = pd.DataFrame(
        {"domain": pd.Categorical(domain), "cell_type": label, "truth": pd.Categorical(truth)},
        index=pd.RangeIndex(n_ref + n_sp).astype(str),
    )
    var = pd.DataFrame(index=[f"gene_{g:04d}" for g in range(N_GENES)])
    return ad.AnnData(X=X, obs=obs_df, var=var)


def input_bytes(X) -> int:
    """In-memory size of a CSR matrix: data + indices + indptr."""
    return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)


# ----------------------------------------------------------------------------- children
def job(path: Path, out_json: Path, threads: int, train_kwargs: dict, tmp: Path) -> None:
    """The full rmge job of one size, in this process."""
    import torch

    torch.set_num_threads(threads)
    import anndata as ad
    import scvi
    from lightning.pytorch.callbacks import Callback

    import rmge

    scvi.settings.seed = 0
    rec: dict = {"threads": threads}
    t = time.perf_counter()
    adata = load(path)
    rec["load_s"] = time.perf_counter() - t
    rec["n_cells"] = adata.n_obs
    rec["n_reference"] = int((adata.obs["domain"] == "reference").sum())
    rec["n_spatial"] = adata.n_obs - rec["n_reference"]
    rec["nnz"] = int(adata.X.nnz)
    rec["input_mb"] = input_bytes(adata.X) / 2**20
    rec["rss_after_load_mb"] = rss_mb()
    phases: dict = {}
    cpu: dict = {}
    peaks: dict = {}

    def phase(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        phases[name] = time.perf_counter() - t0
        cpu[name] = time.process_time() - c0
        peaks[name] = peak_rss_mb()
        print(f"{name}: {phases[name]:.1f} s (CPU {cpu[name]:.1f} s), peak RSS {peaks[name]:.0f} MiB", flush=True)
        return value

    phase("setup_anndata", lambda: rmge.RMGEModel.setup_anndata(adata, labels_key="cell_type", domain_key="domain"))
    model = phase("model_init", lambda: rmge.RMGEModel(adata))

    class StepTimer(Callback):
        """Wall time of training steps alone (data loading included, validation excluded)."""

        def __init__(self):
            self.steps = 0
            self.seconds = 0.0
            self._t = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self._t is None:
                self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps += 1

        def on_validation_start(self, trainer, pl_module):
            if self._t is not None:
                self.seconds += time.perf_counter() - self._t
                self._t = None

        def on_train_end(self, trainer, pl_module):
            self.on_validation_start(trainer, pl_module)

    timer = StepTimer()
    kwargs = {"enable_progress_bar": False, "accelerator": "cpu", "callbacks": [timer], "calibrate": False}
    kwargs.update(train_kwargs)
    phase("train", lambda: model.train(**kwargs))
    phase("calibrate", model.calibrate)
    rec["train_steps"] = timer.steps
    rec["train_epochs"] = int(model.trainer.current_epoch)
    rec["train_cells"] = rec["train_steps"] * 2 * BATCH
    rec["train_throughput"] = rec["train_cells"] / phases["train"]
    rec["train_throughput_cpu"] = rec["train_cells"] / cpu["train"]
    rec["step_throughput"] = timer.steps * 2 * BATCH / max(timer.seconds, 1e-9)
    labels = phase("predict", model.predict)
    rec["predict_throughput"] = adata.n_obs / phases["predict"]
    rec["predict_throughput_cpu"] = adata.n_obs / cpu["predict"]
    # the spatial bins alone (what a chip's prediction costs; reference cells hold five times more counts)
    spatial_rows = np.flatnonzero((adata.obs["domain"] == "spatial").to_numpy())
    phase("predict_spatial", lambda: model.predict(indices=spatial_rows))
    rec["predict_spatial_throughput"] = len(spatial_rows) / phases["predict_spatial"]
    rec["predict_spatial_throughput_cpu"] = len(spatial_rows) / cpu["predict_spatial"]
    latent = phase("latent", model.get_latent_representation)
    is_sp = (adata.obs["domain"] == "spatial").to_numpy()
    rec["spatial_accuracy"] = float((labels[is_sp] == adata.obs["truth"].to_numpy()[is_sp].astype(str)).mean())

    def write():
        adata.obs["rmge_prediction"] = labels
        adata.obsm["X_rmge"] = latent
        target = tmp / f"scale_{adata.n_obs}.h5ad"
        adata.write_h5ad(target)
        size = target.stat().st_size
        target.unlink()
        return size

    rec["h5ad_mb"] = phase("write_h5ad", write) / 2**20
    rec["phases_s"] = phases
    rec["phases_cpu_s"] = cpu
    rec["peak_rss_by_phase_mb"] = peaks
    rec["peak_rss_mb"] = peak_rss_mb()
    rec["rss_target_mb"] = 3 * rec["input_mb"] + 2048
    del ad
    out_json.write_text(json.dumps(rec, indent=2))


def limit(path: Path, out_json: Path, threads: int, steps: int) -> None:
    """Plain PyTorch loop of the same linear encoder/decoder step: the throughput limit."""
    import torch

    torch.set_num_threads(threads)
    adata = load(path)
    X = adata.X
    is_ref = (adata.obs["domain"] == "reference").to_numpy()
    ref, spa = np.flatnonzero(is_ref), np.flatnonzero(~is_ref)
    y = torch.as_tensor(adata.obs["truth"].cat.codes.to_numpy().astype(np.int64))
    enc = torch.nn.Linear(N_GENES, N_CLASSES)
    dec = torch.nn.Linear(N_CLASSES, N_GENES)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    rng = np.random.default_rng(0)

    def step():
        r = np.sort(rng.choice(ref, BATCH, replace=False))
        s = np.sort(rng.choice(spa, BATCH, replace=False))
        rows = np.r_[r, s]
        x = torch.from_numpy(X[rows].toarray())
        x = torch.log1p(x * (1e4 / x.sum(1, keepdim=True).clamp(min=1.0)))
        z = enc(x)
        loss = torch.nn.functional.mse_loss(dec(z), x) + torch.nn.functional.cross_entropy(z[:BATCH], y[r])
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(20):
        step()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    cells = steps * 2 * BATCH
    out_json.write_text(
        json.dumps({"threads": threads, "steps": steps, "throughput": cells / seconds, "throughput_cpu": cells / cpu})
    )


# ----------------------------------------------------------------------------- driver
def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=HERE.parent)


def _fmt_size(n: int) -> str:
    exp = int(round(np.log10(n)))
    return f"10^{exp}" if 10**exp == n else f"{n:,}"


def report(records: list[dict], out_md: Path, plot: Path | None) -> None:
    """Write the scale table (markdown) and an optional plot of time and memory against size."""
    columns = [
        "spatial bins", "version", "threads", "input MiB", "peak RSS MiB (target)", "setup s", "init s",
        "train s (steps)", "train s to the default stop", "calibrate s", "predict s", "latent s", "write s",
        "train cells/s (CPU)", "limit cells/s (CPU)", "fraction of limit", "predict cells/s",
        "predict spatial cells/s", "spatial accuracy",
    ]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted(records, key=lambda r: (r.get("label", ""), r["threads"], r["n_spatial"])):
        ph = r["phases_s"]
        lim, lim_cpu = r.get("limit_throughput"), r.get("limit_throughput_cpu")
        cells = [
            _fmt_size(r["n_spatial"]),
            r.get("label", ""),
            str(r["threads"]),
            f"{r['input_mb']:,.0f}",
            f"{r['peak_rss_mb']:,.0f} ({r['rss_target_mb']:,.0f})",
            f"{ph['setup_anndata']:.1f}",
            f"{ph['model_init']:.1f}",
            f"{ph['train']:.0f} ({r['train_steps']:,})",
            "{:,.0f}{}".format(*default_train_seconds(r)[:1], " (projected)" if default_train_seconds(r)[1] else ""),
            f"{ph['calibrate']:.1f}",
            f"{ph['predict']:.1f}",
            f"{ph['latent']:.1f}",
            f"{ph['write_h5ad']:.1f}",
            f"{r['train_throughput']:,.0f} ({r.get('train_throughput_cpu', float('nan')):,.0f})",
            f"{lim:,.0f} ({lim_cpu:,.0f})" if lim else "-",
            f"{r['train_throughput'] / lim:.2f}" if lim else "-",
            f"{r['predict_throughput']:,.0f}",
            f"{r['predict_spatial_throughput']:,.0f}" if "predict_spatial_throughput" in r else "-",
            f"{r['spatial_accuracy']:.3f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    out_md.write_text("\n".join(rows) + "\n")
    if plot is not None and records:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for (label, threads), group in _groups(records).items():
            group = sorted(group, key=lambda r: r["n_spatial"])
            n = [r["n_spatial"] for r in group]
            name = f"{label} ({threads} thread{'s' if threads > 1 else ''})".strip()
            other = [sum(v for k, v in r["phases_s"].items() if k not in ("train", "predict_spatial")) for r in group]
            axes[0].plot(n, other, "o-", label=name)
            axes[1].plot(n, [default_train_seconds(r)[0] for r in group], "o-", label=name)
            axes[2].plot(n, [r["peak_rss_mb"] / 1024 for r in group], "o-", label=name)
        last = sorted(records, key=lambda r: r["n_spatial"])
        axes[2].plot([r["n_spatial"] for r in last], [r["rss_target_mb"] / 1024 for r in last], "k--", label="target")
        titles = ("set-up, init, predict, latent, write", "training to the default stop", "peak memory")
        ylabels = ("seconds", "seconds (before: projected)", "peak RSS (GiB)")
        for ax, title, ylabel in zip(axes, titles, ylabels, strict=True):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("spatial bins (+ 10^5 reference cells)")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)


def default_train_seconds(r: dict) -> tuple[float, bool]:
    """Training seconds to rmge's default stopping point: measured, or projected from the measured throughput.

    Runs capped below the default (``--max-epochs``/``--limit-batches``) are projected with the rule of the
    code they ran: ``clip(round(6000 / s), 20, 200)`` epochs of ``s = min(ceil(max(reference, spatial) /
    256), 300)`` steps; for the runs labelled ``before`` (the code before the epoch cap),
    ``clip(round(6000 / ceil(max(reference, spatial) / 256)), 20, 200)`` epochs of one pass each, a pass
    being ``ceil(max(0.9 reference, spatial) / 256)`` steps (10 % of the reference cells are held out).
    """
    if not r.get("capped"):
        return r["phases_s"]["train"], False
    per_pass = int(np.ceil(max(r["n_reference"], r["n_spatial"]) / BATCH))
    if r.get("label") == "before":
        epochs = int(np.clip(round(6000 / per_pass), 20, 200))
        steps = int(np.ceil(max(0.9 * r["n_reference"], r["n_spatial"]) / BATCH))
    else:
        # the current rule: epochs of at most 300 steps, about 6,000 steps in all
        steps = min(per_pass, 300)
        epochs = int(np.clip(round(6000 / steps), 20, 200))
    return epochs * steps * 2 * BATCH / r["train_throughput"], True


def _groups(records):
    out: dict = {}
    for r in records:
        out.setdefault((r.get("label", ""), r["threads"]), []).append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="spatial bins, comma separated")
    p.add_argument("--n-reference", type=int, default=100_000)
    p.add_argument("--threads", default="1", help="torch threads, comma separated (e.g. 1,2)")
    p.add_argument("--max-epochs", type=int, default=None, help="train(max_epochs=...) (default: rmge's default)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="train(steps_per_epoch=...)")
    p.add_argument("--limit-batches", type=int, default=None, help="Lightning limit_train_batches (steps per epoch)")
    p.add_argument("--limit-steps", type=int, default=300, help="steps of the plain PyTorch loop")
    p.add_argument("--label", default="", help="label of this run in the table (e.g. a version)")
    p.add_argument("--cache", type=Path, default=HERE / ".cache" / "scale")
    p.add_argument("--results", type=Path, default=HERE / "results" / "scale")
    p.add_argument("--out", type=Path, default=None, help="markdown table to write (default: results/scale.md)")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--child", choices=("gen", "job", "limit"), help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n-spatial", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    if a.child == "gen":
        generate(a.n_reference, a.n_spatial, a.path)
        return
    if a.child == "job":
        train_kwargs = {
            k: v
            for k, v in (
                ("max_epochs", a.max_epochs),
                ("steps_per_epoch", a.steps_per_epoch),
                ("limit_train_batches", a.limit_batches),
            )
            if v
        }
        job(a.path, a.json, int(a.threads), train_kwargs, tmp)
        return
    if a.child == "limit":
        limit(a.path, a.json, int(a.threads), a.limit_steps)
        return

    a.results.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    if not a.report_only:
        for n in (int(s) for s in a.sizes.split(",")):
            path = a.cache / f"ref{a.n_reference}_sp{n}"
            if not (path / "done").exists():
                t = time.perf_counter()
                _run([*me, "--child", "gen", "--path", str(path), "--n-reference", str(a.n_reference),
                      "--n-spatial", str(n)])  # fmt: skip
                print(f"generated {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
            for threads in (int(s) for s in a.threads.split(",")):
                stem = f"{a.label or 'rmge'}_t{threads}_sp{n}"
                # the limit loop runs just before and just after the job; their mean is the job's limit
                lim_jsons = [a.results / f"limit_t{threads}_sp{n}_{when}.json" for when in ("before", "after")]
                _run([*me, "--child", "limit", "--path", str(path), "--json", str(lim_jsons[0]), "--threads",
                      str(threads), "--limit-steps", str(a.limit_steps)])  # fmt: skip
                job_json = a.results / f"{stem}.json"
                cmd = [*me, "--child", "job", "--path", str(path), "--json", str(job_json), "--threads", str(threads)]
                for flag, value in (
                    ("--max-epochs", a.max_epochs),
                    ("--steps-per-epoch", a.steps_per_epoch),
                    ("--limit-batches", a.limit_batches),
                ):
                    if value is not None:
                        cmd += [flag, str(value)]
                _run(cmd)
                _run([*me, "--child", "limit", "--path", str(path), "--json", str(lim_jsons[1]), "--threads",
                      str(threads), "--limit-steps", str(a.limit_steps)])  # fmt: skip
                rec = json.loads(job_json.read_text())
                rec["label"] = a.label
                rec["capped"] = any(v is not None for v in (a.max_epochs, a.steps_per_epoch, a.limit_batches))
                lims = [json.loads(f.read_text()) for f in lim_jsons]
                rec["limit_throughput"] = float(np.mean([lim["throughput"] for lim in lims]))
                rec["limit_throughput_cpu"] = float(np.mean([lim["throughput_cpu"] for lim in lims]))
                rec["limit_throughputs"] = [lim["throughput"] for lim in lims]
                job_json.write_text(json.dumps(rec, indent=2))
    records = [json.loads(f.read_text()) for f in sorted(a.results.glob("*_sp*.json")) if "phases_s" in f.read_text()]
    out = a.out or a.results / "scale.md"
    report(records, out, a.plot)
    print(out.read_text())


if __name__ == "__main__":
    main()
