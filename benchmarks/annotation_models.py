"""CE vs HCE for the linear, MLP and TabNet classifiers, and classifier training throughput.

Data: ``zheng17_sorted_pbmc_reference`` (2,140 FACS-sorted PBMCs, 9 Cell Ontology types), 5-fold
stratified cross-validation, 2,000 HVGs chosen per training fold, batch 64 (the scTab defaults of
batch 2,048 and lr 5e-4–5e-3 are made for millions of cells); TabNet with lr 2e-2. Peer: scikit-learn ``LogisticRegression`` on the same
log-normalised genes and folds. Prints accuracy / macro F1 (mean ± 95% CI over folds, exact
and hierarchy-corrected) and training throughput (cells/s) for each model.

Throughput table: the same cells resampled to ``--throughput-cells`` (2,000 HVGs, batch 2,048),
second epoch of each model timed, each run in its own process; peers: scikit-learn's minibatch
learners over the same minibatches (``SGDClassifier`` log loss for linear, ``MLPClassifier``
8 × 128 for MLP; TabNet has no scikit-learn peer).

    python benchmarks/annotation_models.py [--max-epochs 50] [--throughput-cells 200000] [--skip-cv]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from _common import SHARED, isolated, machine, resampled_counts
from scatlas.tl._annotation import load_annotate_config, train_annotator
from scatlas.data import highly_variable_genes, kfold_splits, normalize_log1p
from scatlas.metrics import confidence_interval
from scatlas.models import build_model
from scatlas.models.base import SplitData, parse_model_config
from scatlas.ontology import CellOntology, reachability
from scatlas.train import TrainConfig

DATA = SHARED / "zheng17_sorted_pbmc_reference.h5ad"


def fmt(values: list[float]) -> str:
    mean, low, high = confidence_interval(values)
    return f"{mean:.3f} ± {high - mean:.3f}"


def sklearn_reference() -> tuple[str, str, float]:
    adata = ad.read_h5ad(DATA)
    X = normalize_log1p(adata.X)
    y = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    acc, f1, cells, wall = [], [], 0, 0.0
    for s in kfold_splits(y, 5, seed=0):
        start = time.perf_counter()
        clf = LogisticRegression(max_iter=1000).fit(X[s.train], y[s.train])
        wall += time.perf_counter() - start
        cells += len(s.train)
        pred = clf.predict(X[s.test])
        acc.append(accuracy_score(y[s.test], pred))
        f1.append(f1_score(y[s.test], pred, average="macro"))
    return fmt(acc), fmt(f1), cells / wall


def throughput_run(X: sp.csr_matrix, y: np.ndarray, classes: list[str], R: np.ndarray, model: str, loss: str, batch_size: int) -> dict[str, Any]:
    """Two epochs of a scatlas classifier on all cells; the second is timed."""
    n = X.shape[0]
    data = SplitData(X=X, train=np.arange(n), val=np.arange(0), batch=np.zeros(n, dtype=np.int64), batch_names=["all"],
                     label=y, label_names=classes, reachability=R)
    clf = build_model(parse_model_config({"type": model, "loss": loss}), TrainConfig(max_epochs=2, batch_size=batch_size, patience=0, progress=False))
    wall = float(clf.fit(data)["epoch_time_s"].iloc[-1])
    return {"cells_per_s": n / wall}


def sklearn_throughput(X: sp.csr_matrix, y: np.ndarray, model: str, batch_size: int) -> dict[str, Any]:
    """One epoch of scikit-learn's minibatch peer: SGDClassifier (log loss) for linear, MLPClassifier (8 × 128) for MLP."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.neural_network import MLPClassifier

    clf = SGDClassifier(loss="log_loss") if model == "linear" else MLPClassifier(hidden_layer_sizes=(128,) * 8)
    classes = np.unique(y)
    start = time.perf_counter()
    for a in range(0, X.shape[0], batch_size):
        clf.partial_fit(X[a : a + batch_size], y[a : a + batch_size], classes=classes)
    return {"cells_per_s": X.shape[0] / (time.perf_counter() - start)}


def throughput(n_cells: int, batch_size: int) -> None:
    """Classifier training throughput on zheng17 cells (2,000 HVGs) resampled to ``n_cells``."""
    adata = resampled_counts(DATA.name, n_cells)
    X = normalize_log1p(adata.X)
    X = X[:, highly_variable_genes(X, np.arange(min(n_cells, 20_000)), 2000)]
    labels = adata.obs["cell_type_ontology_term_id"].astype("category")
    classes = [str(c) for c in labels.cat.categories]
    y = labels.cat.codes.to_numpy().astype(np.int64)
    R = reachability(classes, CellOntology())
    print(f"\nthroughput: {n_cells:,} cells × 2,000 genes, batch {batch_size:,} (second epoch timed)")
    print(f"{'model':8s} {'loss':4s} {'scatlas cells/s':>16s} {'scikit-learn peer cells/s':>26s} {'ratio':>7s}")
    for model in ("linear", "mlp", "tabnet"):
        peer = isolated(sklearn_throughput, X, labels.to_numpy().astype(str), model, batch_size) if model != "tabnet" else None
        for loss in ("ce", "hce"):
            ours = isolated(throughput_run, X, y, classes, R, model, loss, batch_size)
            if "error" in ours:
                print(f"{model:8s} {loss:4s} error: {ours['error']}")
                continue
            peer_cps = peer["cells_per_s"] if peer and "cells_per_s" in peer else float("nan")
            print(f"{model:8s} {loss:4s} {ours['cells_per_s']:16,.0f} {peer_cps:26,.0f} {ours['cells_per_s'] / peer_cps:6.1f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--throughput-cells", type=int, default=200_000, help="cells for the throughput table (0: skip)")
    parser.add_argument("--throughput-batch", type=int, default=2048, help="minibatch of the throughput table (scTab's default)")
    parser.add_argument("--skip-cv", action="store_true", help="only the throughput table")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.throughput_cells:
        throughput(args.throughput_cells, args.throughput_batch)
    if args.skip_cv:
        return
    rows = []
    for model in ("linear", "mlp", "tabnet"):
        for loss in ("ce", "hce"):
            cfg = load_annotate_config(
                {
                    "dataset": {"name": "zheng17", "path": DATA, "label_key": "cell_type"},
                    "ontology_key": "cell_type_ontology_term_id",
                    "model": {"type": model, "loss": loss, **({"training": {"lr": 2e-2, "weight_decay": 0.05}} if model == "tabnet" else {})},
                    "split": {"kind": "kfold", "n_splits": 5},
                    "n_top_genes": 2000,
                    "training": {"max_epochs": args.max_epochs, "batch_size": 64, "patience": 5},
                    "final_model": False,
                }
            )
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                train_annotator(cfg, Path(tmp) / "out", log=lambda _: None)
                wall = time.perf_counter() - start
                folds = pd.read_csv(Path(tmp) / "out" / "fold_metrics.csv")
                epochs = sum(len(pd.read_csv(p)) for p in (Path(tmp) / "out").glob("splits_*/history.csv"))
            for evaluation, group in folds.groupby("evaluation", sort=False):
                rows.append((model, loss, evaluation, fmt(group["accuracy"].tolist()), fmt(group["macro_f1"].tolist()), 1284 * epochs / wall))
    acc, f1, cps = sklearn_reference()
    print(f"{'model':8s} {'loss':4s} {'evaluation':13s} {'accuracy':>15s} {'macro F1':>15s} {'train cells/s':>14s}")
    for model, loss, evaluation, a, f, c in rows:
        print(f"{model:8s} {loss:4s} {evaluation:13s} {a:>15s} {f:>15s} {c:14,.0f}")
    print(f"{'sklearn LogisticRegression (peer)':32s} {acc:>15s} {f1:>15s} {cps:14,.0f}")


if __name__ == "__main__":
    main()
