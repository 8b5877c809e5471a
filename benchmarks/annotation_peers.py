"""Accuracy of the default classifier against CellTypist and LogisticRegression on every held-out split.

Ten splits of the shared data, each a reference and a query from batches the reference never saw
(labels of the query used only for scoring):

- symphony: each chemistry (3'v1, 3'v2, 5') held out in turn (``author_cell_type``);
- kang ctrl ↔ stim: issue #15's kang line, ctrl as the reference and stim as the query, and the
  reverse (``author_cell_type``);
- kang by donor: donor 101's ctrl and stim cells as the reference, donor 107's as the query, and
  the reverse;
- onek1k: the first 20 donors as the reference, the other 20 as the query (``cell_type``);
- cellbench: CEL-seq2 → Drop-seq and the reverse (``cell_line``).

Per split: cells right with ``scatlas.tl.transfer``'s default (its finest-class call), with
CellTypist (``celltypist.train`` with its defaults on the same log-normalised reference, then
``celltypist.annotate`` without majority voting) and with scikit-learn's LogisticRegression
(max_iter 2000), and the paired comparison of scatlas and CellTypist: the cells only one of them
gets right and McNemar's exact p. The last row pools every split. CellTypist needs
scikit-learn < 1.7, so it runs in its own environment (``--celltypist-python``, e.g. a venv with
``pip install celltypist "scikit-learn<1.7"``); left out without it.

    python benchmarks/annotation_peers.py --celltypist-python /tmp/ctvenv/bin/python
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression

import scatlas as sa
from _common import SHARED, machine
from scatlas.data import normalize_log1p

_CELLTYPIST = """
import sys
import anndata as ad, scanpy as sc, celltypist
def lognorm(path):
    adata = ad.read_h5ad(path)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata
model = celltypist.train(lognorm(sys.argv[1]), labels=sys.argv[3])
calls = celltypist.annotate(lognorm(sys.argv[2]), model=model, majority_voting=False).predicted_labels
calls["predicted_labels"].astype(str).to_csv(sys.argv[4])
"""

Split = tuple[str, str, str, Callable[[pd.DataFrame], np.ndarray]]


def splits() -> list[Split]:
    """(name, shared file, label column, reference mask of ``obs``) of every held-out split."""
    out: list[Split] = [(f"symphony → {c}", "symphony_pbmc_3tech.h5ad", "author_cell_type", lambda obs, c=c: obs["batch"].to_numpy() != c)
                        for c in ("3pv1", "3pv2", "5p")]
    out += [(f"kang {g} → other", "kang18_muscat_4samples.h5ad", "author_cell_type", lambda obs, g=g: obs["group_id"].to_numpy() == g)
            for g in ("ctrl", "stim")]
    out += [(f"kang-donor {d} → other", "kang18_muscat_4samples.h5ad", "author_cell_type",
             lambda obs, d=d: obs["sample_id"].astype(str).str.endswith(d).to_numpy()) for d in ("101", "107")]
    out.append(("onek1k 20 → 20 donors", "onek1k_4types_40donors.h5ad", "cell_type",
                lambda obs: obs["donor_id"].isin(sorted(obs["donor_id"].unique())[:20]).to_numpy()))
    return out + [(f"cellbench {b} → other", "cellbench_3cl_celseq2_dropseq.h5ad", "cell_line", lambda obs, b=b: obs["batch"].to_numpy() == b)
                  for b in ("CELseq2", "Dropseq")]


def celltypist_calls(reference: ad.AnnData, query: ad.AnnData, label: str, python: str) -> np.ndarray:
    """CellTypist's call for every query cell, trained and run in its own environment."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / name for name in ("reference.h5ad", "query.h5ad", "calls.csv")]
        ad.AnnData(reference.X, obs=reference.obs[[label]], var=reference.var[[]]).write_h5ad(paths[0])
        ad.AnnData(query.X, obs=query.obs[[]], var=query.var[[]]).write_h5ad(paths[1])
        subprocess.run([python, "-c", _CELLTYPIST, str(paths[0]), str(paths[1]), label, str(paths[2])], check=True, capture_output=True)
        return pd.read_csv(paths[2], index_col=0).iloc[:, 0].astype(str).reindex(query.obs_names).to_numpy()


def paired(right: np.ndarray, peer_right: np.ndarray) -> dict[str, float]:
    """Cells right only by scatlas, only by the peer, and McNemar's exact p of the difference."""
    only, only_peer = int((right & ~peer_right).sum()), int((~right & peer_right).sum())
    p = binomtest(only, only + only_peer).pvalue if only + only_peer else 1.0
    return {"only_scatlas": only, "only_celltypist": only_peer, "mcnemar_p": p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--celltypist-python", default=None, help="python of an environment with celltypist (scikit-learn < 1.7)")
    args = parser.parse_args()
    print(machine())
    rows = []
    for name, file, label, reference_mask in splits():
        adata = ad.read_h5ad(SHARED / file)
        in_reference = reference_mask(adata.obs)
        reference, query = adata[in_reference].copy(), adata[~in_reference].copy()
        truth = query.obs[label].astype(str).to_numpy()
        sa.tl.transfer(reference, query, label_key=label, seed=0, log=lambda _: None)
        right = query.obs[f"{label}_pred"].astype(str).to_numpy() == truth
        lr = LogisticRegression(max_iter=2000).fit(normalize_log1p(reference.X), reference.obs[label].astype(str).to_numpy())
        row: dict[str, float | str] = {"split": name, "cells": len(truth), "scatlas": int(right.sum()),
                                       "LogisticRegression": int((lr.predict(normalize_log1p(query.X)) == truth).sum())}
        if args.celltypist_python:
            peer_right = celltypist_calls(reference, query, label, args.celltypist_python) == truth
            row |= {"CellTypist": int(peer_right.sum()), **paired(right, peer_right)}
        rows.append(row)
        print(name, "done", flush=True)
    table = pd.DataFrame(rows)
    pooled = table.drop(columns=["split", "mcnemar_p"], errors="ignore").sum()
    if args.celltypist_python:
        pooled["mcnemar_p"] = binomtest(int(pooled["only_scatlas"]), int(pooled["only_scatlas"] + pooled["only_celltypist"])).pvalue
    table = pd.concat([table, pd.DataFrame([{"split": "pooled", **pooled.to_dict()}])], ignore_index=True)
    counts = [c for c in table if c not in ("split", "mcnemar_p")]
    table[counts] = table[counts].astype(int)
    for peer in ("scatlas", "LogisticRegression", "CellTypist"):
        if peer in table:
            table[f"{peer} accuracy"] = table[peer] / table["cells"]
    if "mcnemar_p" in table:
        table["mcnemar_p"] = table["mcnemar_p"].map(lambda p: f"{p:.2g}")
    print("\ncells right per held-out split (accuracy); only_*: cells right by one of scatlas and CellTypist, not the other")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
