"""Novelty score: how well a cell fits the reference type it was assigned to, relative to its peers.

A query cell type that the reference lacks is assigned to its nearest reference type, often with
high confidence once the model has adapted to the spatial data, so a probability threshold does not
find it. What does single it out is its expression profile: it resembles the assigned type's
reference centroid less than the genuine members of that type do. Per-cell similarities of sparse
spatial profiles are noisy, so each cell's similarity is averaged over its nearest neighbours in
expression space (cells of an unseen type neighbour each other), then compared with the other cells
assigned to the same type through a robust z-score (median and median absolute deviation), as
SingleR prunes its labels (Aran et al., 2019, ``pruneScores``).

Written here rather than taken from a library: scikit-learn and pynndescent find the neighbours, but no
package of the field scores how well cells fit an assigned reference centroid in a model's own
standardised space.
"""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData

from rmge._constants import REGISTRY_KEYS

#: Classes with fewer assigned cells than this get a zero score (too few to estimate a spread).
MIN_CELLS_PER_CLASS = 20
_MAD_TO_SD = 1.4826
_EXACT_MAX = 50_000


def _unit_centred(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


@torch.inference_mode()
def _similarities_and_sample(module, loader, codes: np.ndarray, sample: np.ndarray):
    """Cosine similarity of each cell with its assigned centroid, and the profiles of sampled cells."""
    sims, kept = [], []
    centroids = module.centroids
    start = 0
    for tensors in loader:
        x = tensors[REGISTRY_KEYS.X_KEY].to(centroids.device).float()
        g = tensors[REGISTRY_KEYS.BATCH_KEY].to(centroids.device)
        xn = module.normalize(x, g)
        n = xn.shape[0]
        c = torch.as_tensor(codes[start : start + n], device=centroids.device)
        sims.append((_unit_centred(xn) * centroids[c]).sum(-1).cpu())
        local = sample[(sample >= start) & (sample < start + n)] - start
        if len(local):
            kept.append(xn[torch.as_tensor(local, device=xn.device)].cpu())
        start += n
    return torch.cat(sims).numpy().astype(np.float64), torch.cat(kept).numpy()


@torch.inference_mode()
def _principal_components(module, loader, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    dev = module.centroids.device
    mu = torch.as_tensor(mean, device=dev, dtype=torch.float32)
    comp = torch.as_tensor(components, device=dev, dtype=torch.float32)
    out = []
    for tensors in loader:
        x = tensors[REGISTRY_KEYS.X_KEY].to(dev).float()
        g = tensors[REGISTRY_KEYS.BATCH_KEY].to(dev)
        out.append(((module.normalize(x, g) - mu) @ comp.T).cpu())
    return torch.cat(out).numpy()


def _neighbour_mean(pcs: np.ndarray, values: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray:
    """Mean of ``values`` over each cell and its nearest neighbours.

    Exact search (scikit-learn) up to ``_EXACT_MAX`` cells, approximate search (pynndescent, as
    scanpy uses) above.
    """
    n = pcs.shape[0]
    k = min(n_neighbors, n)
    if k < 2:
        return values.copy()
    pcs = np.ascontiguousarray(pcs, dtype=np.float32)
    if n <= _EXACT_MAX:
        from sklearn.neighbors import NearestNeighbors

        idx = NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(pcs, return_distance=False)
    else:
        from pynndescent import NNDescent

        idx = NNDescent(pcs, n_neighbors=k, random_state=seed, low_memory=True).neighbor_graph[0]
    # each row holds the cell itself (distance 0) and its k - 1 neighbours
    return values[idx].mean(1)


def _robust_z(values: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    z = np.zeros_like(values)
    for c in range(n_classes):
        members = codes == c
        if members.sum() < MIN_CELLS_PER_CLASS:
            continue
        v = values[members]
        med = np.median(v)
        mad = np.median(np.abs(v - med)) * _MAD_TO_SD
        if mad > 0:
            z[members] = (v - med) / mad
    return z


def novelty_scores(
    model,
    adata: AnnData,
    indices: np.ndarray,
    codes: np.ndarray,
    n_neighbors: int = 15,
    n_pcs: int = 30,
    max_pca_cells: int = 20_000,
    batch_size: int = 2048,
    seed: int = 0,
) -> np.ndarray:
    """Robust z-score of the neighbourhood-averaged similarity of each cell to its assigned centroid.

    Parameters
    ----------
    model
        A trained :class:`~rmge.RMGEModel`.
    adata
        Validated AnnData of the cells.
    indices
        Rows of ``adata`` scored together (one population: the neighbours and the per-type spread
        are taken among them).
    codes
        Assigned class code of each cell of ``indices``.
    n_neighbors
        Neighbours (including the cell) the similarity is averaged over.
    n_pcs
        Principal components of the standardised profiles the neighbours are searched in.
    max_pca_cells
        Cells sampled to fit the principal components.
    batch_size
        Minibatch size of inference.
    seed
        Seed of the sample and of the neighbour search.

    Returns
    -------
    One score per cell: 0 is typical of its assigned type, negative values fit it worse (in robust
    standard deviations).
    """
    from sklearn.decomposition import PCA

    module = model.module
    module.eval()
    n = len(indices)
    if n == 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, max_pca_cells), replace=False))
    loader = model._make_data_loader(adata=adata, indices=indices, batch_size=batch_size, shuffle=False)
    sims, profiles = _similarities_and_sample(module, loader, codes, sample)
    n_comp = int(min(n_pcs, profiles.shape[0] - 1, profiles.shape[1]))
    if n_comp >= 2:
        pca = PCA(n_components=n_comp, svd_solver="randomized", random_state=seed).fit(profiles)
        loader = model._make_data_loader(adata=adata, indices=indices, batch_size=batch_size, shuffle=False)
        pcs = _principal_components(module, loader, pca.mean_, pca.components_)
        sims = _neighbour_mean(pcs, sims, n_neighbors, seed)
    return _robust_z(sims, codes, module.n_labels)
