"""CE vs HCE for the linear, MLP and TabNet classifiers, and classifier training throughput.

Data: ``zheng17_sorted_pbmc_reference`` (2,140 FACS-sorted PBMCs, 9 Cell Ontology types), 5-fold
stratified cross-validation, 2,000 HVGs chosen per training fold, batch 64 (the scTab defaults of
batch 2,048 and lr 5e-4–5e-3 are made for millions of cells); TabNet with lr 2e-2. Peer: scikit-learn ``LogisticRegression`` on the same
log-normalised genes and folds. Prints accuracy / macro F1 (mean ± 95% CI over folds, exact
and hierarchy-corrected) and training throughput (cells/s) for each model.

    python benchmarks/annotation_models.py [--max-epochs 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from _common import SHARED, machine
from scatlas.annotation import load_annotate_config, train_annotator
from scatlas.data import kfold_splits, normalize_log1p
from scatlas.metrics import confidence_interval

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=30)
    args = parser.parse_args()
    print(f"machine: {machine()}")
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
