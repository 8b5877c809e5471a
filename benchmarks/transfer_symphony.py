"""Label transfer across chemistries: each Symphony PBMC chemistry held out as the query.

Reference = the two other chemistries (labels ``author_cell_type``), query labels hidden from
training and used only for scoring. Peer in the same script: scikit-learn LogisticRegression on
the same log-normalised genes. scANVI's figures (scvi-tools, 100 + 20 epochs, seed 0) are quoted
from ../shared/REFERENCES.md (measured on the same split).

    python benchmarks/transfer_symphony.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from _common import SHARED, machine
from scatlas.data import normalize_log1p
from scatlas.tl._transfer import load_transfer_config, run_transfer

SCANVI = {"3pv1": (0.914, 0.723), "5p": (0.956, 0.813)}


def main() -> None:
    print(f"machine: {machine()}")
    adata = ad.read_h5ad(SHARED / "symphony_pbmc_3tech.h5ad")
    print(f"{'query':6s} {'scatlas acc':>11s} {'macro F1':>9s} {'unknown':>8s} {'ECE before/after':>17s} {'wall s':>7s} {'LR acc':>7s} {'LR F1':>6s} {'scANVI acc/F1':>14s}")
    for b in ("3pv1", "3pv2", "5p"):
        with tempfile.TemporaryDirectory() as tmp:
            ref, query = Path(tmp) / "reference.h5ad", Path(tmp) / f"query_{b}.h5ad"
            adata[adata.obs["batch"] != b].copy().write_h5ad(ref)
            adata[adata.obs["batch"] == b].copy().write_h5ad(query)
            cfg = load_transfer_config({"reference": {"name": "r", "path": ref, "label_key": "author_cell_type"}, "queries": [query], "query_label_key": "author_cell_type"})
            start = time.perf_counter()
            summary = run_transfer(cfg, Path(tmp) / "out", log=lambda _: None).set_index("dataset")
            wall = time.perf_counter() - start
            calibration = pd.read_csv(Path(tmp) / "out" / "calibration.csv").iloc[0]
        row = summary.loc[f"query_{b}"]
        X = normalize_log1p(adata.X)
        y = adata.obs["author_cell_type"].astype(str).to_numpy()
        train, test = (adata.obs["batch"] != b).to_numpy(), (adata.obs["batch"] == b).to_numpy()
        pred = LogisticRegression(max_iter=2000).fit(X[train], y[train]).predict(X[test])
        lr = accuracy_score(y[test], pred), f1_score(y[test], pred, average="macro")
        scanvi = "/".join(f"{v:.3f}" for v in SCANVI[b]) if b in SCANVI else "-"
        print(f"{b:6s} {row['accuracy']:11.3f} {row['macro_f1']:9.3f} {row['unknown_fraction']:8.3f} {calibration['ece_before']:8.4f}/{calibration['ece_after']:.4f} {wall:7.1f} {lr[0]:7.3f} {lr[1]:6.3f} {scanvi:>14s}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
