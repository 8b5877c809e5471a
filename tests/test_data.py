"""Data layer: normalisation, HVGs, splits, loaders and validation, on the shared real datasets."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from sklearn.model_selection import train_test_split

from scatlas import InputError
from scatlas.data import (
    fit_gene_pca,
    AnnDataCSRSource,
    CSRLoader,
    SomaCSRSource,
    densify,
    gene_moments,
    group_splits,
    highly_variable_genes,
    kfold_splits,
    normalize_log1p,
    preprocess_split,
    read_anndata,
    study_splits,
    validate,
)
from scatlas.data.preprocess import within_class_variance
from scatlas.data.dataset import DatasetConfig, cell_data, load_dataset
from scatlas.data.splits import holdout
from scatlas.data.loaders import _scatter_dense, finish_on_device, host_tensor
from scatlas.data.sources import as_source, read_rows


@pytest.fixture(scope="module")
def cellbench(cellbench5_path):
    return ad.read_h5ad(cellbench5_path)


def test_normalize_log1p_matches_scanpy(cellbench):
    ref = cellbench.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    ours = normalize_log1p(cellbench.X)
    np.testing.assert_allclose(ours.toarray(), ref.X.toarray(), rtol=1e-5, atol=1e-5)


def test_hvg_uses_training_cells_only(cellbench):
    X = normalize_log1p(cellbench.X)
    train = np.arange(0, 600)
    genes = highly_variable_genes(X, train, 500)
    assert len(genes) == 500
    changed = X.tolil()
    changed[700:, :50] = 9.0  # wild values in non-training cells
    assert np.array_equal(highly_variable_genes(changed.tocsr(), train, 500), genes)
    prep = preprocess_split(X, cellbench.var_names.to_numpy(), train, 500, scale="maxabs")
    assert prep.X.shape == (cellbench.n_obs, 500)
    assert prep.X[train].max() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["cellbench_5cl_celseq2_3plates.h5ad", "symphony_pbmc_3tech.h5ad", "zheng17_sorted_pbmc_reference.h5ad", "kang18_muscat_4samples.h5ad"])
def test_hvg_equal_scanpy_in_memory_and_streamed_from_disk(name, tmp_path):
    """scanpy's Seurat genes on the same cells: all cells, a training half (whose zero-variance genes
    are left out first), and streamed in chunks from an on-disk counts file normalised on the fly."""
    from conftest import data_path

    counts = sp.csr_matrix(ad.read_h5ad(data_path(name)).X, dtype=np.float32)
    X = normalize_log1p(counts)

    def scanpy_genes(rows: np.ndarray, genes: np.ndarray) -> np.ndarray:
        ref = ad.AnnData(X[rows][:, genes])
        sc.pp.highly_variable_genes(ref, n_top_genes=500, flavor="seurat")
        return genes[ref.var["highly_variable"].to_numpy()]

    every = np.arange(X.shape[0])
    assert np.array_equal(highly_variable_genes(X, every, 500), scanpy_genes(every, np.arange(X.shape[1])))
    half = np.flatnonzero(np.random.default_rng(0).random(X.shape[0]) < 0.5)
    sub = X[half]
    expressed = np.flatnonzero(np.asarray(sub.power(2).mean(0)).ravel() - np.asarray(sub.mean(0)).ravel() ** 2 > 0)
    genes = highly_variable_genes(X, half, 500)
    assert np.array_equal(genes, scanpy_genes(half, expressed))
    mean, var = gene_moments(X, half[::-1], expm1=True, chunk_size=150)  # chunks merged, rows in any order
    values = np.expm1(sub.toarray()).astype(np.float64)
    np.testing.assert_allclose(mean, values.mean(0), rtol=1e-10)
    np.testing.assert_allclose(var, values.var(0, ddof=1), rtol=1e-8, atol=1e-12)
    path = tmp_path / "counts.h5ad"
    ad.AnnData(X=counts).write_h5ad(path)
    assert np.array_equal(highly_variable_genes(AnnDataCSRSource(path, normalize=True), half, 500, chunk_size=150), genes)


def test_row_range_and_normalisation_in_blocks_equal_scipy_and_scanpy(cellbench):
    """Rows of an in-memory CSR matrix from its arrays equal SciPy's slicing; normalising in place, a block of cells at
    a time, gives the bits of a copy normalised at once and scanpy's values."""
    from scatlas.data.io import row_range

    X = sp.csr_matrix(cellbench.X, dtype=np.float32)
    for start, stop in [(0, 7), (100, 350), (X.shape[0] - 5, X.shape[0] + 10), (40, 40)]:
        part = row_range(X, start, stop)
        assert part.shape == X[start:stop].shape and (part != X[start:stop]).nnz == 0 and part.dtype == np.float32
    assert np.array_equal(row_range(X.toarray(), 3, 9), X[3:9].toarray())  # other matrices are sliced
    whole = normalize_log1p(X)
    blocks = normalize_log1p(X.copy(), copy=False, chunk_size=37)
    assert np.array_equal(whole.data, blocks.data) and np.array_equal(whole.indices, blocks.indices)
    ref = ad.AnnData(X.copy())
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    np.testing.assert_allclose(whole.toarray(), ref.X.toarray(), rtol=1e-5)


def test_within_class_variance_two_passes():
    """The pooled within-class variance equals numpy's on the dense matrix, explicit zeros and an absent class code
    included, also where a large common offset makes sums of squares minus squared sums lose every digit."""
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((300, 40)) < 0.3, rng.gamma(2.0, 1.0, (300, 40)), 0.0)
    dense[:, 5] = 0.0
    dense[:, 6] = 1e6 + rng.normal(0, 1e-3, 300)  # a gene every cell holds at about the same large value
    codes = rng.choice([0, 2, 7], 300)
    X = sp.csr_matrix(dense)
    X.data[0] = 0.0  # an explicit zero
    dense = X.toarray()
    expected = sum(((dense[codes == k] - dense[codes == k].mean(0)) ** 2).sum(0) for k in (0, 2, 7)) / (300 - 3)
    np.testing.assert_allclose(within_class_variance(X, codes), expected, rtol=1e-9, atol=1e-15)
    assert within_class_variance(sp.csr_matrix(dense[:3]), np.arange(3)).tolist() == [0.0] * 40  # n = k


def test_streamed_gene_pca_equals_sklearn_full_pca(tmp_path):
    """One streamed pass (gene scatter in float64, then eigh) gives scikit-learn's exact PCA on OneK1K's HVGs,
    in memory and from an on-disk counts file normalised per chunk, whatever the chunk size."""
    from sklearn.decomposition import PCA

    from conftest import data_path

    path = data_path("onek1k_4types_40donors.h5ad")
    X = normalize_log1p(sp.csr_matrix(ad.read_h5ad(path).X, dtype=np.float32))
    genes = highly_variable_genes(X, np.arange(X.shape[0]), 1000)
    dense = X[:, genes].toarray().astype(np.float64)  # the reference in double precision, as ours
    reference = PCA(30, svd_solver="full").fit(dense)
    pca = fit_gene_pca(X[:, genes], 30)
    np.testing.assert_allclose(pca.explained_variance, reference.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(pca.mean, reference.mean_, rtol=1e-6, atol=1e-9)
    # components up to the last near-degenerate ones: compare the leading 20 exactly, the span of all 30
    np.testing.assert_allclose(pca.components[:20], reference.components_[:20], atol=1e-4)
    np.testing.assert_allclose(np.linalg.svd(pca.components @ reference.components_.T, compute_uv=False), 1, atol=1e-6)
    np.testing.assert_allclose(pca.transform(X[:, genes])[:, :20], reference.transform(dense)[:, :20], atol=1e-3)
    source = AnnDataCSRSource(path, normalize=True).with_genes(genes)
    streamed = fit_gene_pca(source, 30, chunk_size=1000)
    np.testing.assert_allclose(streamed.transform(source, chunk_size=700), pca.transform(X[:, genes]), atol=1e-4)
    rows = np.arange(0, X.shape[0], 2)
    np.testing.assert_allclose(fit_gene_pca(source, 5, rows=rows).explained_variance, PCA(5, svd_solver="full").fit(dense[rows]).explained_variance_, rtol=1e-6)


@pytest.mark.parametrize("scipy_gather", [True, False], ids=["scipy-gather", "tensor-gather"])
def test_loader_batches_densify_to_scipy_rows(cellbench, scipy_gather):
    """Minibatches equal SciPy's rows, gathered by SciPy (CPU chunks) or by tensor ops (the GPU path, run on the CPU)."""
    X = sp.csr_matrix(cellbench.X, dtype=np.float32)
    rows = np.random.default_rng(0).choice(X.shape[0], 77, replace=False)
    loader = CSRLoader(X, rows, batch_size=30, covariates={"batch": np.arange(X.shape[0]) % 3})
    loader._scipy_gather = scipy_gather
    batches = list(loader)
    assert all(np.array_equal(b["batch"].numpy(), b["row"].numpy() % 3) for b in batches)
    assert [len(b["row"]) for b in batches] == [30, 30, 17]
    got = np.concatenate([densify(b).numpy() for b in batches])
    np.testing.assert_array_equal(got, X[rows].toarray())  # unshuffled: the order given
    scattered = [_scatter_dense(b["x_indptr"], b["x_indices"], b["x_data"], b["n_genes"], b["x_nnz"]).numpy() for b in batches]
    np.testing.assert_array_equal(np.concatenate(scattered), got)  # the accelerator's densification
    assert all(b["x_nnz"] == b["x_data"].shape[0] for b in batches)


def test_gene_alignment_reorders_and_sets_absent_genes(cellbench):
    """Shared genes land in the model's column order, absent ones as zero columns; ``absent_at`` is the offset that sets them to given values."""
    from scatlas.data.align import align_genes

    X = sp.csr_matrix(cellbench.X[:50], dtype=np.float32)
    names = cellbench.var_names.to_numpy()
    model_genes = np.concatenate([names[[7, 3, 11]], ["NOT_A_GENE_1", "NOT_A_GENE_2"]])
    alignment = align_genes(cellbench.var, model_genes, min_overlap=0.5)
    assert (alignment.n_shared, alignment.missing) == (3, ["NOT_A_GENE_1", "NOT_A_GENE_2"])
    expected = np.hstack([X[:, [7, 3, 11]].toarray(), np.zeros((50, 2), dtype=np.float32)])
    np.testing.assert_array_equal(alignment.apply(X).toarray(), expected)
    means = np.array([9.0, 9.0, 9.0, 0.5, 2.0], dtype=np.float32)  # only the absent genes' values are used
    expected[:, 3:] = [0.5, 2.0]
    np.testing.assert_array_equal(alignment.apply(X).toarray() + alignment.absent_at(means), expected)
    assert align_genes(cellbench.var, names[[7, 3]]).absent_at(means[:2]) is None


def test_model_inputs_start_where_torch_tensors_do(cellbench):
    """MKL's product can round by where its operand starts in a cache line, and NumPy's buffers start at any 16-byte phase
    the heap gives (it changed between two runs of one seed in CI): densified minibatches and ``host_tensor`` start on 64 bytes."""
    X = sp.csr_matrix(cellbench.X, dtype=np.float32)
    for batch_size in (3, 8, 30):
        loader = CSRLoader(X, np.arange(100), batch_size=batch_size, shuffle=True, seed=0)
        assert all(densify(b).data_ptr() % 64 == 0 for b in loader)
    x = X[:7].toarray()
    weight = torch.from_numpy(np.random.default_rng(0).standard_normal((8, X.shape[1])).astype(np.float32))
    products = set()
    for phase in range(0, 64, 4):  # the same values starting at every 4-byte phase of a cache line
        buffer = np.empty(x.size + 32, dtype=np.float32)
        start = (-buffer.ctypes.data % 64 + phase) // 4
        view = buffer[start : start + x.size].reshape(x.shape)
        view[...] = x
        t = host_tensor(view)
        assert t.data_ptr() % 64 == 0 and np.array_equal(t.numpy(), x)
        assert np.shares_memory(t.numpy(), view) == (phase == 0)  # copied only when needed
        products.add((t @ weight.T).numpy().tobytes())
    assert len(products) == 1


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("genes", [None, np.array([5, 3, 100, 7])], ids=["all-genes", "subset"])
def test_finish_on_device_equals_the_host_path(cellbench, normalize, genes):
    """The accelerator's finish of stored rows (run here on CPU tensors) equals the host's: each cell scaled by its
    total over every stored gene (also when only some genes are kept), then ``log1p``, and the kept genes in order."""
    counts = sp.csr_matrix(cellbench.X[:200], dtype=np.float32)
    counts.data[:] = np.random.default_rng(0).integers(1, 9, counts.nnz)  # whole counts on the real sparsity pattern
    for row in (4, 9):  # two cells without counts stay zero
        counts.data[counts.indptr[row] : counts.indptr[row + 1]] = 0
    counts.eliminate_zeros()
    gene_map = None
    if genes is not None:
        gene_map = torch.full((counts.shape[1],), -1, dtype=torch.int32)
        gene_map[torch.from_numpy(genes)] = torch.arange(len(genes), dtype=torch.int32)
    indptr, indices, data = finish_on_device(torch.from_numpy(counts.indptr.astype(np.int64)), torch.from_numpy(counts.indices),
                                             torch.from_numpy(counts.data), normalize, gene_map)
    n_out = counts.shape[1] if genes is None else len(genes)
    got = sp.csr_matrix((data.numpy(), indices.numpy(), indptr.numpy()), shape=(counts.shape[0], n_out)).toarray()
    kept = counts if genes is None else counts[:, genes]
    expected = normalize_log1p(kept, totals=np.asarray(counts.sum(axis=1), dtype=np.float32).ravel()) if normalize else kept
    assert indptr.dtype == torch.int64 and data.dtype == torch.float32
    np.testing.assert_allclose(got, expected.toarray(), rtol=1e-6)
    assert not got[[4, 9]].any()


@pytest.mark.parametrize("on_device", [False, True], ids=["finished-by-source", "finished-on-device"])
def test_streamed_h5ad_chunks_equal_in_memory(cellbench, tmp_path, monkeypatch, on_device):
    """Streamed, normalised, gene-subset rows equal the in-memory result, whether the source finishes
    each chunk (the CPU path) or the loader does on the device (the GPU path, here run on the CPU)."""
    counts = sp.csr_matrix(cellbench.X, dtype=np.float32)
    path = tmp_path / "cells.h5ad"
    ad.AnnData(X=counts).write_h5ad(path)
    genes = np.array([5, 3, 100, 7])
    source = AnnDataCSRSource(path, normalize=True, genes=genes)
    assert source.shape == (counts.shape[0], 4)
    expected = normalize_log1p(counts)[:, genes].toarray()
    import scatlas.data.loaders as loaders

    finished, finish = [], loaders.finish_on_device
    monkeypatch.setattr(loaders, "finish_on_device", lambda *args: finished.append(len(args[0]) - 1) or finish(*args))
    rows = np.arange(3, counts.shape[0], 2)
    loader = CSRLoader(source, rows, batch_size=50, shuffle=True, chunk_size=128, seed=1, prefetch=2)
    loader._finish_on_device, loader._scipy_gather = on_device, not on_device
    assert len(loader) == sum(-(-min(128, len(rows) - a) // 50) for a in range(0, len(rows), 128))
    seen = [(b["row"].numpy(), densify(b).numpy()) for b in loader]
    got_rows = np.concatenate([r for r, _ in seen])
    assert np.array_equal(np.sort(got_rows), rows)
    assert not np.array_equal(got_rows, rows)
    np.testing.assert_allclose(np.concatenate([x for _, x in seen]), expected[got_rows], rtol=1e-6)
    for n in (60, 600):  # unsorted; sparse (read in several windows) or dense (one window spanning gaps)
        scattered = np.random.default_rng(2).choice(counts.shape[0], n, replace=False)
        loader = CSRLoader(source, scattered, batch_size=25, chunk_size=n // 2)
        loader._finish_on_device, loader._scipy_gather = on_device, not on_device
        np.testing.assert_allclose(np.concatenate([densify(b).numpy() for b in loader]), expected[scattered], rtol=1e-6)
    assert bool(finished) == on_device  # stored windows are finished by the loader only on an accelerator
    zarr_path = tmp_path / "cells.zarr"
    ad.AnnData(X=counts).write_zarr(zarr_path)
    from_zarr = AnnDataCSRSource(zarr_path, normalize=True, genes=genes).read(100, 140).toarray()
    np.testing.assert_allclose(from_zarr, expected[100:140], rtol=1e-6)
    with pytest.raises(InputError, match="layers/'?missing"):
        AnnDataCSRSource(path, layer="missing")


def test_raw_window_reads_equal_h5py(cellbench, tmp_path):
    """Reads around h5py (byte extents + preadv) return what h5py returns, for chunked (AnnData's
    default), contiguous and several-piece layouts; a compressed file falls back to h5py."""
    import h5py

    X = sp.csr_matrix(cellbench.X, dtype=np.float32)
    chunked, contiguous, compressed = tmp_path / "chunked.h5ad", tmp_path / "contiguous.h5ad", tmp_path / "gzip.h5ad"
    ad.AnnData(X=X).write_h5ad(chunked)
    ad.AnnData(X=X).write_h5ad(compressed, compression="gzip")
    ad.AnnData(X=X).write_h5ad(contiguous)
    with h5py.File(contiguous, "a") as f:
        for name in ("data", "indices"):
            values = f["X"][name][:]
            del f["X"][name]
            f["X"].create_dataset(name, data=values)
        assert f["X/data"].chunks is None
    for path, raw in ((chunked, True), (contiguous, True), (compressed, False)):
        source = AnnDataCSRSource(path)
        assert (source._raw_arrays() is not None) == raw, path
        if raw:
            source._raw_arrays()["data"]._piece = 4096  # many pieces, read by the thread pool
        for start, stop in ((0, X.shape[0]), (17, 400), (X.shape[0] - 1, X.shape[0]), (5, 5)):
            window = source.read_window(start, stop)
            expected = X[start:stop]
            assert np.array_equal(window.indptr, expected.indptr) and np.array_equal(window.indices, expected.indices), (path, start)
            assert window.data.dtype == np.float32 and np.array_equal(window.data, expected.data), (path, start)
        handed = []
        window = source.read_window(10, 90, lambda name, n, dtype: handed.append(name) or np.empty(n, dtype))
        assert handed == (["indices", "data"] if raw else [])
        assert np.array_equal(window.data, X[10:90].data)


def test_loader_shards_rows_under_torch_distributed(cellbench, monkeypatch):
    X = sp.csr_matrix(cellbench.X, dtype=np.float32)
    rows = np.arange(101)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        loader = CSRLoader(X, rows, batch_size=16, shuffle=True, chunk_size=20, drop_last=True)
        shards.append(np.concatenate([b["row"].numpy() for b in loader]))
        assert len(loader) == len(list(loader))
    assert len(shards[0]) == len(shards[1])  # equal step counts on every rank
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) <= set(range(50)) and set(shards[1]) <= set(range(50, 100))


def test_loader_epochs_cover_rows_and_are_seeded(cellbench):
    X = sp.csr_matrix(cellbench.X, dtype=np.float32)
    rows = np.arange(10, 510)
    codes = np.arange(X.shape[0]) % 3
    loader = CSRLoader(X, rows, batch_size=64, shuffle=True, covariates={"batch": codes}, seed=3)
    assert len(loader) == 8
    seen = [b["row"].numpy() for b in loader]
    assert np.array_equal(np.sort(np.concatenate(seen)), rows)
    first = seen[0]
    assert not np.array_equal(first, rows[:64])  # shuffled
    assert not np.array_equal(next(iter(loader))["row"].numpy(), first)  # reshuffled next epoch
    again = CSRLoader(X, rows, batch_size=64, shuffle=True, covariates={"batch": codes}, seed=3)
    b = next(iter(again))
    assert np.array_equal(b["row"].numpy(), first)
    assert np.array_equal(b["batch"].numpy(), codes[first])
    assert len(CSRLoader(X, rows, batch_size=64, shuffle=True, drop_last=True)) == 7


def test_kfold_scheme(cellbench):
    strata = (cellbench.obs["batch"].astype(str) + "_" + cellbench.obs["cell_line"].astype(str)).to_numpy()
    splits = kfold_splits(strata, n_splits=3, seed=0)
    for s in splits:
        assert len(np.intersect1d(s.train, s.test)) == 0 and len(np.intersect1d(s.val, s.test)) == 0
        assert len(s.train) + len(s.val) + len(s.test) == len(strata)
    # test parts rotate and tile the data; val of split k is the test of split k+1
    assert np.array_equal(np.sort(np.concatenate([s.test for s in splits])), np.arange(len(strata)))
    assert np.array_equal(splits[0].val, splits[1].test)
    # stratified: every stratum appears in every test part
    for s in splits:
        assert set(strata[s.test]) == set(strata)
    rare, said = strata.copy(), []  # strata smaller than the folds: one line (scikit-learn's two-line warning is not shown), the same folds
    rare[:2] = "X_rare"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = kfold_splits(rare, n_splits=3, seed=0, log=said.append)
    assert said == ["1 of 16 strata (batch × label) hold fewer cells than the 3 folds (smallest: 'X_rare', 2 cells): their cells are tested in only some folds"]
    with pytest.warns(UserWarning, match="^1 of 16 strata"):  # without a log, as a library warns
        assert all(np.array_equal(a.test, b.test) for a, b in zip(kfold_splits(rare, n_splits=3, seed=0), again, strict=True))


def test_group_and_study_splits(cellbench):
    batch = cellbench.obs["batch"].astype(str).to_numpy()
    donors = np.char.add(batch, (np.arange(len(batch)) % 4).astype(str))
    for s in group_splits(donors, n_splits=3, seed=0):
        assert not set(donors[s.train]) & set(donors[s.test])
        assert not set(donors[s.val]) & set(donors[s.test])
    labels = cellbench.obs["cell_line"].astype(str).to_numpy()
    study = study_splits(batch, labels, val_fraction=0.2)
    assert len(study) == 3
    for s in study:
        assert len(set(batch[s.test])) == 1 and set(batch[s.test]).isdisjoint(batch[s.train])
    with pytest.raises(InputError, match="at least n_splits"):
        group_splits(batch, n_splits=5)


def test_holdout_stratifies_by_label_only_when_the_labels_allow_it(cellbench):
    labels = cellbench.obs["cell_line"].astype(str).to_numpy()
    rows = np.arange(len(labels))

    def same(got, expected):
        return all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))

    assert same(holdout(rows, 0.2, 0, labels), train_test_split(rows, test_size=0.2, random_state=0, stratify=labels))
    # the draw is scikit-learn's without importing it: other seeds, sizes, row values, and labels whose shares tie
    ties = np.repeat(np.array(["a", "b", "c", "d", "e", "f", "g"]), [7, 7, 7, 3, 3, 9, 4])
    for seed, size, group in [(1, 0.1, labels), (7, 0.35, labels), (3, 9, ties), (11, 0.25, ties), (0, 0.5, ties)]:
        values = 1000 + 3 * np.arange(len(group))
        assert same(holdout(values, size, seed, group), train_test_split(values, test_size=size, random_state=seed, stratify=group))
        assert same(holdout(values, size, seed), train_test_split(values, test_size=size, random_state=seed))
    plain = train_test_split(rows, test_size=0.2, random_state=0)
    rare = labels.copy()
    rare[0] = "one cell"
    assert same(holdout(rows, 0.2, 0, rare), plain)  # a label with one cell cannot be split
    assert same(holdout(rows, 0.2, 0, labels, min_count=len(rows)), plain)
    # fewer held-out cells than labels: scikit-learn refuses a stratified draw, holdout draws plainly
    assert len(set(labels)) > 3
    assert same(holdout(rows, 3, 0, labels), train_test_split(rows, test_size=3, random_state=0))


def _write(adata: ad.AnnData, tmp_path, name="bad.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def test_validation_names_file_key_and_values(cellbench, tmp_path):
    good = cellbench[:100].copy()
    path = _write(good, tmp_path, "good.h5ad")
    validate(read_anndata(path), batch_key="batch", label_key="cell_line", require_counts=True)

    with pytest.raises(InputError, match=r"good.h5ad: obs column 'donor' not found; available columns: \['batch'"):
        validate(read_anndata(path), batch_key="donor")
    with pytest.raises(InputError, match=r"good.h5ad: obs column 'cell_lines' not found \(did you mean 'cell_line'\?\); available columns"):
        validate(read_anndata(path), batch_key="batch", label_key="cell_lines")
    with pytest.raises(InputError, match=r"good.h5ad: the batch and label columns are both 'cell_line'"):  # every command's check
        validate(read_anndata(path), batch_key="cell_line", label_key="cell_line")

    nan = good.copy()
    nan.X = nan.X.toarray()
    nan.X[3, 5] = np.nan
    with pytest.raises(InputError, match=r"bad.h5ad: .X has NaN or infinite values in 1 cells"):
        validate(read_anndata(_write(nan, tmp_path)), batch_key="batch")

    neg = good.copy()
    neg.X.data[:4] = -1
    with pytest.raises(InputError, match=r"negative values .*batch = 'CELseq2_p1'"):
        validate(read_anndata(_write(neg, tmp_path)), batch_key="batch")

    single = good.copy()
    single.obs["one"] = "x"
    with pytest.raises(InputError, match=r"obs column 'one' has 1 distinct value"):
        validate(read_anndata(_write(single, tmp_path)), label_key="one")

    lonely = good.copy()
    lonely.obs["batch"] = lonely.obs["batch"].astype(str)
    lonely.obs.iloc[0, lonely.obs.columns.get_loc("batch")] = "lonely_plate"
    with pytest.raises(InputError, match=r"fewer than 2 cells: 'lonely_plate' \(1 cells\)"):
        validate(read_anndata(_write(lonely, tmp_path)), batch_key="batch")


def test_non_integer_batch_is_named(cepo_path):
    """Real data: one of the three pancreas studies is not integer counts."""
    with pytest.raises(InputError, match=r"non-integer values .*batch = ") as info:
        validate(read_anndata(cepo_path), batch_key="batch", label_key="cellTypes", require_counts=True)
    adata = ad.read_h5ad(cepo_path)
    X = adata.X.tocsr()
    bad = {b for b in adata.obs["batch"].unique() if np.any(X[(adata.obs["batch"] == b).to_numpy()].data % 1 != 0)}
    assert all(str(b) in str(info.value) for b in bad) and len(bad) == 1
    validate(read_anndata(cepo_path), batch_key="batch", label_key="cellTypes", require_counts=False)
    with pytest.raises(InputError, match=r"\.X mixes kinds of values: 400 cells hold only whole numbers.*batch = 'batch 1', 'batch 4'\), "
                                         r"128 cells non-integer values .*batch = 'batch 5'\)"):
        validate(read_anndata(cepo_path), batch_key="batch", label_key="cellTypes", lognorm=True)


def test_a_matrix_read_as_log_normalised_must_be_one(cepo_path, tmp_path):
    """`input: auto` reads the pancreas file (two studies of counts, one of other values) as log-normalised: every command
    now refuses it in one line naming the batches, where `embed` used to crash in its gene selection; counts read as
    log-normalised are refused by their size; scanpy's log-normalised matrix passes."""
    from typer.testing import CliRunner

    from conftest import data_path
    from scatlas.cli import app

    kang_path = data_path("kang18_muscat_4samples.h5ad")
    runner = CliRunner()
    for command in (["validate", str(cepo_path), "--batch-key", "batch"],
                    ["embed", str(cepo_path), "--batch-key", "batch", "--model", "pca", "--out", str(tmp_path / "cepo_pca.h5ad")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "mixes kinds of values" in result.output and "batch = 'batch 5'" in result.output, result.output
    assert not (tmp_path / "cepo_pca.h5ad").exists()
    result = runner.invoke(app, ["validate", str(kang_path), "--input", "lognorm"])
    assert result.exit_code == 2 and ".X holds values up to 1,891, too large for log-normalised values" in result.output, result.output
    kang = ad.read_h5ad(kang_path)
    sc.pp.normalize_total(kang, target_sum=1e4)
    sc.pp.log1p(kang)
    kang.write_h5ad(tmp_path / "kang_lognorm.h5ad")
    result = runner.invoke(app, ["validate", str(tmp_path / "kang_lognorm.h5ad")])
    assert result.exit_code == 0 and "non-integer values: treated as log-normalised" in result.output and "OK (1556 cells" in result.output


def test_worker_threads_return_results_in_order_raise_a_call_s_error_and_restart_after_a_fork():
    """Workers.run: results in the calls' order, a call's exception re-raised once every call finished; a forked child
    that inherits the pool (whose threads did not survive the fork) starts its own instead of waiting forever."""
    import os
    import time

    from scatlas._threads import Workers

    workers = Workers(3, "test")
    assert workers.run([lambda i=i: (time.sleep(0.01 * (5 - i)), i)[1] for i in range(6)]) == list(range(6))
    finished: list[int] = []

    def fails() -> None:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        workers.run([fails, lambda: finished.append(1) or time.sleep(0.05) or finished.append(2)])
    assert finished == [1, 2]  # the other call had finished before the error was raised
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the inherited pool still runs calls
        os._exit(0 if workers.run([lambda: 7]) == [7] else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the forked child waited on threads it does not have"
    workers.close()


def test_worker_threads_stopped_by_a_signal_start_no_further_call_and_leave_none_running():
    """A signal in the waiting thread: the calls no thread has started are dropped, the started ones finish, and the
    signal's exception is raised with no call still running or starting later (before: every queued call ran first)."""
    import signal
    import time

    from scatlas._threads import Workers

    class Stop(Exception):
        pass

    def stop(*_: object) -> None:
        raise Stop

    workers, log = Workers(1, "test"), []
    previous = signal.signal(signal.SIGALRM, stop)
    try:
        for delay in (0.0001, 0.003, 0.025):
            log.clear()
            with pytest.raises(Stop):  # armed inside: a 0.1 ms timer could fire in pytest.raises' own set-up (seen under coverage)
                signal.setitimer(signal.ITIMER_REAL, delay)
                workers.run([lambda i=i: log.append(("start", i)) or time.sleep(0.01) or log.append(("end", i)) for i in range(50)])
            seen = list(log)
            time.sleep(0.05)
            assert log == seen, "a call ran after run() raised"
            assert len(seen) % 2 == 0 and len(seen) < 20, f"{len(seen) // 2} of 50 calls ran after the signal"
            assert [i for kind, i in seen if kind == "start"] == [i for kind, i in seen if kind == "end"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert workers.run([lambda: 1, lambda: 2]) == [1, 2]  # the pool still works
    workers.close()


def test_parallel_reads_keep_no_buffer_or_source_alive(cellbench5_path, tmp_path, monkeypatch):
    """Once a read split over reader threads returns, the threads hold neither its buffer nor its source: dropped by the
    caller, both are freed and the file closed (the threads kept their last job, 80 MB more peak in `aggregate --stream`)."""
    import gc
    import time
    import weakref

    from scatlas.data.sources import _Extents

    path = tmp_path / "cells.h5ad"  # uncompressed: read around h5py
    ad.AnnData(X=sp.csr_matrix(ad.read_h5ad(cellbench5_path).X, dtype=np.float32)).write_h5ad(path)
    monkeypatch.setattr(_Extents, "_piece", 4096)  # many pieces, so the threads read
    extents = AnnDataCSRSource(path)._raw_arrays()["data"]
    out = np.empty(extents.size, extents.dtype)
    assert len(extents._pieces(0, extents.size)) > 10 and np.isfinite(extents.read(0, extents.size, out)).all()
    freed = [weakref.ref(out), weakref.ref(extents)]
    del out, extents
    deadline = time.monotonic() + 5
    while any(ref() is not None for ref in freed) and time.monotonic() < deadline:  # a thread may still be returning from its job
        gc.collect()
        time.sleep(0.01)
    assert all(ref() is None for ref in freed)


def test_load_dataset_filter_backed_and_layer(cellbench5_path, tmp_path):
    cfg = DatasetConfig(name="cb", path=cellbench5_path, batch_key="batch", label_key="cell_line", filter={"demuxlet_cls": ["SNG"]}, backed=True)
    data = load_dataset(cfg)
    assert data.n_cells == 571
    assert list(data.label.categories) == list(pd.unique(data.obs["cell_line"].astype(str)))
    assert data.strata()[0].startswith(str(data.batch[0]) + "_")
    with pytest.raises(InputError, match=r"filter on obs column 'demuxlet_cls': values \['single'\] do not occur"):
        load_dataset(cfg.model_copy(update={"filter": {"demuxlet_cls": ["single"]}}))
    with pytest.raises(InputError, match=r"layer 'counts' not found; available layers: \[\]"):
        load_dataset(cfg.model_copy(update={"layer": "counts"}))
    with pytest.raises(InputError, match="file not found"):
        load_dataset(cfg.model_copy(update={"path": tmp_path / "nope.h5ad"}))


def test_a_dataset_config_without_input_decides_it_from_the_values(tmp_path):
    """`dataset.input` left out (a `scatlas run` YAML, a DatasetConfig in Python) is `auto`, as the CLI's --input: kang's
    counts and scanpy's log-normalised copy load to the same cells, each with one line saying how it was read, loaded or
    streamed; a YAML without `input` on the log-normalised file passes `scatlas validate` (it was refused as non-integer
    counts)."""
    import yaml
    from typer.testing import CliRunner

    from conftest import data_path
    from scatlas.cli import app

    counts_path, lognorm_path = data_path("kang18_muscat_4samples.h5ad"), tmp_path / "kang_lognorm.h5ad"
    kang = ad.read_h5ad(counts_path)
    sc.pp.normalize_total(kang, target_sum=1e4)
    sc.pp.log1p(kang)
    kang.write_h5ad(lognorm_path)
    for stream in (False, True):
        lines: list[str] = []
        counts, lognorm = (load_dataset(DatasetConfig(name="kang", path=path, batch_key="group_id", stream=stream), log=lines.append)
                           for path in (counts_path, lognorm_path))
        assert (counts.counts, counts.input, lognorm.counts, lognorm.input) == (True, "counts", False, "lognorm")
        decided = [line.rsplit("/", 1)[-1] for line in lines if "treated as" in line]  # the file's name, however its folder is reached
        assert decided == [f"{counts_path.name}: .X holds whole numbers: treated as raw counts (normalised + log1p)",
                           f"{lognorm_path.name}: .X holds non-integer values: treated as log-normalised"], lines
        rows = np.arange(0, counts.n_cells, 7)
        np.testing.assert_allclose(read_rows(as_source(counts.lognorm), rows).toarray(), read_rows(as_source(lognorm.lognorm), rows).toarray(),
                                   rtol=1e-5, atol=1e-6)
    config = tmp_path / "kang.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"name": "kang", "path": str(lognorm_path), "batch_key": "group_id"}, "models": [{"type": "pca"}],
                                      "split": {"n_splits": 3}, "evaluation": {"figures": False}, "output": {"dir": str(tmp_path / "out")}}))
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 0 and "treated as log-normalised" in result.output and "OK (1556 cells" in result.output, result.output
    result = CliRunner().invoke(app, ["run", str(config), "--quiet"])
    assert result.exit_code == 0 and "treated as log-normalised" in result.output, result.output
    recorded = yaml.safe_load(next((tmp_path / "out").rglob("config.yaml")).read_text())
    assert recorded["dataset"]["input"] == "lognorm"  # as decided, so the recorded config reruns the same


def test_unlabelled_cells_are_refused_or_left_out_loaded_and_streamed(cellbench5_path, tmp_path):
    """Cells without a label: refused by default (named); with ``unlabelled: leave_out`` (classifier training) left out with
    one notice, the same cells and rows whether the matrix is loaded or streamed from the file, by config or AnnData."""
    adata = ad.read_h5ad(cellbench5_path)
    adata.obs["cell_line"] = adata.obs["cell_line"].astype(object)
    unlabelled = [2, 50, 51]
    adata.obs.iloc[unlabelled, adata.obs.columns.get_loc("cell_line")] = np.nan
    adata.write_h5ad(tmp_path / "cb.h5ad")
    cfg = DatasetConfig(name="cb", path=tmp_path / "cb.h5ad", batch_key="batch", label_key="cell_line")
    with pytest.raises(InputError, match="obs column 'cell_line' has 3 missing values"):
        load_dataset(cfg, log=lambda _: None)
    lines: list[str] = []
    left = cfg.model_copy(update={"unlabelled": "leave_out"})
    loaded = load_dataset(left, log=lines.append)
    assert f"3 of {adata.n_obs} cells have no label in obs column 'cell_line': left out of training" in lines[0]
    kept = np.delete(np.arange(adata.n_obs), unlabelled)
    kept = kept[np.asarray(adata.X[kept].sum(axis=1)).ravel() > 0]  # all-zero cells go too
    assert list(loaded.obs.index) == list(adata.obs_names[kept]) and loaded.label.notna().all()
    backed = ad.read_h5ad(tmp_path / "cb.h5ad", backed="r")
    for streamed in (load_dataset(left.model_copy(update={"stream": True}), log=lambda _: None),
                     cell_data(backed, label_key="cell_line", batch_key="batch", stream=True, unlabelled="leave_out", log=lambda _: None)):
        assert list(streamed.obs.index) == list(loaded.obs.index)
        np.testing.assert_allclose(streamed.lognorm.read(0, streamed.n_cells).toarray(), loaded.lognorm.toarray(), rtol=1e-6)
    in_memory = cell_data(adata, label_key="cell_line", batch_key="batch", unlabelled="leave_out", log=lambda _: None)
    assert list(in_memory.obs.index) == list(loaded.obs.index) and adata.n_obs == len(adata.obs)  # the AnnData is left whole
    # with a filter, the unlabelled cells are counted among those it keeps (cell 1 is a doublet), loaded and streamed alike
    adata.obs.iloc[1, adata.obs.columns.get_loc("cell_line")] = np.nan
    adata.write_h5ad(tmp_path / "cb2.h5ad")
    lines.clear()
    singlets = left.model_copy(update={"path": tmp_path / "cb2.h5ad", "filter": {"demuxlet_cls": ["SNG"]}})
    loaded, streamed = (load_dataset(singlets.model_copy(update={"stream": stream}), log=lines.append) for stream in (False, True))
    assert lines[0].endswith(f"3 of {int((adata.obs['demuxlet_cls'] == 'SNG').sum())} cells have no label in obs column 'cell_line': "
                             "left out of training (map them as a query to call them)")
    assert list(streamed.obs.index) == list(loaded.obs.index) and not set(adata.obs_names[[1, 2, 50, 51]]) & set(loaded.obs.index)
    np.testing.assert_allclose(streamed.lognorm.read(0, streamed.n_cells).toarray(), loaded.lognorm.toarray(), rtol=1e-6)
    adata.obs["cell_line"] = np.nan
    with pytest.raises(InputError, match="obs column 'cell_line' holds no label"):
        cell_data(adata, label_key="cell_line", unlabelled="leave_out", log=lambda _: None)


def test_read_anndata_leaves_a_zarr_matrix_on_disk(cellbench, cellbench5_path, tmp_path):
    """A `.zarr` store read with `backed=True` keeps X (and CSR layers) on disk as a backed `.h5ad` does; what cannot stay there is named."""
    from scatlas.data import on_disk
    from scatlas.data.dataset import whole_backed

    from scatlas.data.io import get_matrix, get_var

    adata = cellbench.copy()
    adata.X = sp.csr_matrix(adata.X)
    adata.layers["counts"] = adata.X.copy()
    adata.raw = adata[:, ::-1].copy()  # .raw: its own genes (here reversed), read lazily as `layer="raw"`
    adata.write_zarr(tmp_path / "cb.zarr")
    lazy = read_anndata(tmp_path / "cb.zarr", backed=True)
    assert (get_matrix(lazy, "raw")[:7] != adata.raw.X[:7]).nnz == 0
    assert get_var(lazy, "raw").index.equals(adata.var_names[::-1]) and get_var(lazy, None).index.equals(adata.var_names)
    assert on_disk(lazy) and on_disk(read_anndata(cellbench5_path, backed=True))
    assert not on_disk(read_anndata(tmp_path / "cb.zarr")) and not on_disk(lazy[:10])
    assert whole_backed(lazy) == (tmp_path / "cb.zarr").resolve()
    assert (lazy.X[10:20] != adata.X[10:20]).nnz == 0 and (lazy.layers["counts"][:5] != adata.X[:5]).nnz == 0
    pd.testing.assert_frame_equal(lazy.obs, adata.obs)
    with pytest.raises(InputError, match="not a subset of one"):
        whole_backed(lazy[:10])
    adata.X = adata.X.toarray()
    del adata.layers["counts"]
    adata.write_zarr(tmp_path / "dense.zarr")
    with pytest.raises(InputError, match=r"dense.zarr: X is not a CSR matrix"):
        read_anndata(tmp_path / "dense.zarr", backed=True)
    (tmp_path / "cells.txt").write_text("x")
    with pytest.raises(InputError, match=r"cells.txt: expected an .h5ad file or a .zarr store"):
        read_anndata(tmp_path / "cells.txt")


@pytest.mark.parametrize("scale", ["none", "maxabs", "standard"])
def test_streamed_dataset_equals_the_loaded_one(cellbench5_path, tmp_path, scale):
    """`stream: true` leaves X on disk; the filter and the all-zero cells and genes it drops, the HVGs, the scaling
    and every chunk of the model input equal the loaded dataset's."""
    adata = ad.read_h5ad(cellbench5_path)
    X = sp.csr_matrix(adata.X)
    singlets = np.flatnonzero(adata.obs["demuxlet_cls"].astype(str).to_numpy() == "SNG")
    for row in singlets[[0, 5, 9]]:  # three all-zero singlets, dropped with a notice
        X.data[X.indptr[row] : X.indptr[row + 1]] = 0
    genes = np.ones(adata.n_vars, dtype=np.float32)
    genes[[3, 100, 2000]] = 0  # and three all-zero genes
    X = sp.csr_matrix(X @ sp.diags(genes))
    X.eliminate_zeros()
    adata.X = X
    adata.write_h5ad(tmp_path / "cb.h5ad")
    cfg = DatasetConfig(name="cb", path=tmp_path / "cb.h5ad", batch_key="batch", label_key="cell_line", filter={"demuxlet_cls": ["SNG"]})
    loaded = load_dataset(cfg, log=lambda _: None)
    streamed = load_dataset(cfg.model_copy(update={"stream": True}), log=lambda _: None)
    assert sp.issparse(loaded.lognorm) and not sp.issparse(streamed.lognorm)
    assert streamed.n_cells == loaded.n_cells == len(singlets) - 3 and len(streamed.var_names) < adata.n_vars
    pd.testing.assert_frame_equal(streamed.obs, loaded.obs)
    np.testing.assert_array_equal(streamed.var_names, loaded.var_names)
    train = np.arange(0, loaded.n_cells, 2)
    a, b = (preprocess_split(d.lognorm, d.var_names, train, 500, scale) for d in (loaded, streamed))
    np.testing.assert_array_equal(a.genes, b.genes)
    chunks = sp.vstack([b.X.read(lo, min(lo + 97, loaded.n_cells)) for lo in range(0, loaded.n_cells, 97)])
    np.testing.assert_allclose(chunks.toarray(), a.X.toarray(), rtol=1e-5, atol=1e-5)


def test_soma_source_streams_like_the_h5ad(symphony_path, tmp_path):
    import tiledbsoma.io

    adata = ad.read_h5ad(symphony_path)
    uri = tiledbsoma.io.from_anndata(str(tmp_path / "soma"), adata, measurement_name="RNA")
    genes = np.array([0, 17, 400])
    source = SomaCSRSource(uri, normalize=True, genes=genes)
    assert source.shape == (adata.n_obs, 3)
    expected = normalize_log1p(sp.csr_matrix(adata.X, dtype=np.float32))[:, genes].toarray()
    rows = np.arange(adata.n_obs)
    batches = list(CSRLoader(source, rows, batch_size=100, shuffle=True, chunk_size=256, seed=0))
    got_rows = np.concatenate([b["row"].numpy() for b in batches])
    np.testing.assert_allclose(np.concatenate([densify(b).numpy() for b in batches]), expected[got_rows], rtol=1e-6)
    assert np.array_equal(np.sort(got_rows), rows)
    with pytest.raises(InputError, match="no X layer"):
        SomaCSRSource(uri, layer="missing")
