"""Hierarchical vs ordinary cross-entropy on held-out batches, against scikit-learn's LogisticRegression.

Symphony PBMCs: each chemistry held out in turn (reference = the two others, classes = Cell
Ontology ids); kang18: ctrl → stim and stim → ctrl (``author_cell_type``). Each row is one
``scatlas.tl.transfer`` (the default preset) with ``loss`` ce or hce, scored on the query: exact
accuracy and macro F1 of the finest-class call, the share of CD14 monocytes called CD16
monocytes, the accuracy of the hierarchical calls (right when the call is the truth or an
ancestor of it) and how often they are exact, and the wall time; LogisticRegression (max_iter 2000) on the same log-normalised genes
is the peer. ``--relabel`` adds the case HCE exists for: half of the reference cells, drawn at
random, relabelled to their Cell Ontology parent, marked as a second source (``dataset_key``);
``coarse_finest`` is then the share of finest-class calls that are a label only that source uses.
``--relabel unlabelled`` relabels to the deepest ancestor that is not itself one of the reference's
labels (the Cell Ontology parent of a CD16 monocyte is "CD14-positive monocyte", a fine label of
the reference; a coarser study would call it "monocyte").

    python benchmarks/hce_transfer.py [--relabel [parent|unlabelled]] [--skip-kang]
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

import scatlas as sa
from _common import SHARED, machine
from scatlas.data import normalize_log1p
from scatlas.ontology import CellOntology

CD14, CD16 = "CL:0001054", "CL:0002396"


def parent(term: str, ontology: CellOntology, avoid: frozenset[str] = frozenset()) -> str:
    """The deepest ancestor of a term (its most specific parent) outside ``avoid``."""
    return max((a for a in ontology.ancestors(term) if a not in avoid), key=lambda a: (len(ontology.ancestors(a)), a))


def lr_peer(adata: ad.AnnData, train: np.ndarray, test: np.ndarray, key: str) -> tuple[float, float, float]:
    start = time.perf_counter()
    X = normalize_log1p(adata.X)
    y = adata.obs[key].astype(str).to_numpy()
    pred = LogisticRegression(max_iter=2000).fit(X[train], y[train]).predict(X[test])
    return accuracy_score(y[test], pred), f1_score(y[test], pred, average="macro"), time.perf_counter() - start


def score(query: ad.AnnData, key: str, truth_key: str, ontology: CellOntology | None = None, coarse: set[str] | None = None) -> dict[str, float]:
    truth = query.obs[truth_key].astype(str).to_numpy()
    pred = query.obs[f"{key}_pred"].astype(str).to_numpy()
    cd14 = truth == CD14
    row = {"accuracy": accuracy_score(truth, pred), "macro_f1": f1_score(truth, pred, average="macro"),
           "cd14_called_cd16": float((pred[cd14] == CD16).mean()) if cd14.any() else float("nan")}
    if coarse:  # finest-class calls that are a label only the relabelled source uses
        row["coarse_finest"] = float(np.isin(pred, sorted(coarse)).mean())
    if ontology is not None and f"{key}_pred_hierarchical" in query.obs:  # right when the call is the truth or an ancestor of it
        calls = query.obs[f"{key}_pred_hierarchical"].astype(str).to_numpy()
        row["call_accuracy"] = float(np.mean([c == t or c in ontology.ancestors(t) for c, t in zip(calls, truth, strict=True)]))
        row["call_exact"] = float((calls == truth).mean())
    return row


def run(adata: ad.AnnData, train: np.ndarray, test: np.ndarray, name: str, label_key: str, ontology_key: str | None, relabel: str | None,
        ontology: CellOntology) -> list[dict]:
    reference, query = adata[train].copy(), adata[test].copy()
    truth_key = ontology_key or label_key
    dataset_key, coarse_only = None, None
    if relabel:
        rng = np.random.default_rng(0)
        coarse = rng.random(reference.n_obs) < 0.5
        ids = reference.obs[ontology_key].astype(str).to_numpy().copy()
        avoid = frozenset(ids) if relabel == "unlabelled" else frozenset()
        ids[coarse] = [parent(t, ontology, avoid) for t in ids[coarse]]
        reference.obs[ontology_key] = ids
        reference.obs[label_key] = [ontology.label(t) for t in ids]
        reference.obs["source"] = np.where(coarse, "coarse", "fine")
        coarse_only = set(ids[coarse]) - set(ids[~coarse])
        dataset_key = "source"
    rows = []
    for loss in ("ce", "hce") if ontology_key else ("ce",):
        q = query.copy()
        start = time.perf_counter()
        sa.tl.transfer(reference, q, label_key=label_key, ontology_key=ontology_key, loss=loss, dataset_key=dataset_key, log=lambda _: None)
        wall = time.perf_counter() - start
        rows.append({"split": name, "model": f"scatlas default {loss}", **score(q, truth_key, truth_key, ontology if ontology_key else None, coarse_only), "wall_s": wall})
    acc, f1, wall = lr_peer(adata, train, test, truth_key)
    rows.append({"split": name, "model": "LogisticRegression", "accuracy": acc, "macro_f1": f1, "cd14_called_cd16": float("nan"), "wall_s": wall})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relabel", nargs="?", const="parent", choices=["parent", "unlabelled"], default=None)
    parser.add_argument("--skip-kang", action="store_true")
    args = parser.parse_args()
    print(machine())
    ontology = CellOntology()
    rows = []
    symphony = ad.read_h5ad(SHARED / "symphony_pbmc_3tech.h5ad")
    for b in ("3pv1", "3pv2", "5p"):
        held = (symphony.obs["batch"] == b).to_numpy()
        rows += run(symphony, ~held, held, f"symphony → {b}", "cell_type", "cell_type_ontology_term_id", args.relabel, ontology)
        print(pd.DataFrame(rows[-3:]).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    if not args.skip_kang and not args.relabel:
        kang = ad.read_h5ad(SHARED / "kang18_muscat_4samples.h5ad")
        for a, b in (("ctrl", "stim"), ("stim", "ctrl")):
            train = (kang.obs["group_id"] == a).to_numpy()
            rows += run(kang, train, ~train, f"kang {a} → {b}", "author_cell_type", None, None, ontology)
            print(pd.DataFrame(rows[-2:]).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    table = pd.DataFrame(rows)
    table["data"] = table["split"].str.split(" ").str[0]
    print("\nmean per dataset:")
    print(table.groupby(["data", "model"], sort=False)[[c for c in ("accuracy", "macro_f1", "cd14_called_cd16", "coarse_finest", "call_accuracy", "call_exact", "wall_s") if c in table]].mean().to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
