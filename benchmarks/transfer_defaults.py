"""Choosing the classifier preset of ``tl.transfer`` / ``annotate`` by held-out batches, over seeds.

Every held-out split of ``benchmarks/hce_transfer.py`` (symphony: each chemistry in turn; kang18:
ctrl → stim and stim → ctrl), one ``scatlas.tl.transfer`` per split, seed and candidate classifier
setting (``--grid linear``: the full-batch linear model's settings beside the MLP preset); the table gives the mean and the range over seeds of exact accuracy, macro F1 and (on
symphony) the share of CD14 monocytes called CD16 monocytes on the queries. scikit-learn's LogisticRegression on the same genes is the peer (it has no seed).

    python benchmarks/transfer_defaults.py [--seeds 5] [--grid linear|linear_class_weighted|linear_within|dropout|batch_size|batch_lr|weight_decay|hidden|class_weighted|ensemble]
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

import scatlas as sa
from _common import SHARED, machine
from hce_transfer import CD14, CD16, lr_peer


def _mlp(dropout: float, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, hidden: list[int] | None = None,
         class_weighted: bool = True, ensemble: int = 1) -> dict:
    return {"type": "mlp", "hidden": hidden or [256, 128], "dropout": dropout, "class_weighted": class_weighted, "ensemble": ensemble,
            "training": {"lr": lr, "weight_decay": weight_decay, "batch_size": batch_size}}


def _linear(C: float, gene_scale: float, output: str = "ovr", class_weighted: bool = True, scale_by: str = "total") -> dict:
    return {"type": "linear", "solver": "lbfgs", "output": output, "C": C, "gene_scale": gene_scale, "gene_scale_by": scale_by,
            "class_weighted": class_weighted}


GRIDS = {
    # the full-batch linear model (deterministic: one seed is enough): L2 strength and the power of each gene's standard deviation it is divided by
    "linear": {**{f"linear lbfgs ovr, C {c:g}, gene scale {a:g}": _linear(c, a) for c in (0.01, 0.03, 0.1) for a in (0.0, 0.5, 1.0)},
               "linear lbfgs softmax, C 0.03, gene scale 0.5": _linear(0.03, 0.5, "softmax"), "mlp preset": _mlp(0.3)},
    "dropout": {f"mlp 256-128, dropout {d}": _mlp(d) for d in (0.1, 0.3)},
    "batch_size": {f"mlp 256-128, dropout 0.3, batch {b}": _mlp(0.3, b) for b in (64, 256, 1024)},
    # larger minibatches with the learning rate raised with them (fewer, larger steps)
    "batch_lr": {f"mlp 256-128, dropout 0.3, batch {b}, lr {lr:g}": _mlp(0.3, b, lr) for b, lr in ((64, 1e-3), (256, 2e-3), (256, 4e-3), (1024, 4e-3), (1024, 8e-3))},
    "weight_decay": {f"mlp 256-128, dropout 0.3, weight decay {w}": _mlp(0.3, weight_decay=w) for w in (0.01, 0.05, 0.2)},
    # balanced class weights (the preset) or none, as LogisticRegression and CellTypist train
    "class_weighted": {f"mlp 256-128, dropout 0.3, class weights {w}": _mlp(0.3, class_weighted=w) for w in (True, False)},
    "linear_class_weighted": {f"linear lbfgs ovr, C 0.03, gene scale 0.5, class weights {w}": _linear(0.03, 0.5, class_weighted=w) for w in (True, False)},
    # each gene's standard deviation over all cells (the default) or pooled within classes
    "linear_within": {f"linear lbfgs ovr, C {c:g}, gene scale {a:g} by {by}": _linear(c, a, scale_by=by)
                      for c, a, by in ((0.03, 0.5, "total"), (0.03, 0.5, "within"), (0.01, 1.0, "within"), (0.03, 1.0, "within"))},
    # one network, or several, each early-stopping on its own held-out draw, averaged
    "ensemble": {f"mlp 256-128, dropout 0.3, ensemble {k}": _mlp(0.3, ensemble=k) for k in (1, 3, 5)},
    "hidden": {f"mlp {'-'.join(map(str, h))}, dropout 0.3": _mlp(0.3, hidden=h) for h in ([256, 128], [512, 256], [1024], [128, 128, 128])},
}


def splits() -> list[tuple[str, ad.AnnData, np.ndarray, str, str | None]]:
    """(name, data, held-out mask, label key, ontology key) of every held-out split."""
    symphony = ad.read_h5ad(SHARED / "symphony_pbmc_3tech.h5ad")
    kang = ad.read_h5ad(SHARED / "kang18_muscat_4samples.h5ad")
    out = [(f"symphony → {b}", symphony, (symphony.obs["batch"] == b).to_numpy(), "cell_type", "cell_type_ontology_term_id") for b in ("3pv1", "3pv2", "5p")]
    return out + [(f"kang {a} → other", kang, (kang.obs["group_id"] != a).to_numpy(), "author_cell_type", None) for a in ("ctrl", "stim")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="dropout", help="which setting to vary")
    args = parser.parse_args()
    print(machine())
    rows = []
    for name, adata, held, label, ontology in splits():
        key = ontology or label
        for setting, model in GRIDS[args.grid].items():
            for seed in range(args.seeds):
                reference, query = adata[~held].copy(), adata[held].copy()
                start = time.perf_counter()
                sa.tl.transfer(reference, query, label_key=label, ontology_key=ontology, model=model, seed=seed, log=lambda _: None)
                truth, pred = query.obs[key].astype(str).to_numpy(), query.obs[f"{key}_pred"].astype(str).to_numpy()
                cd14 = truth == CD14  # CL ids: symphony only
                rows.append({"split": name, "setting": setting, "seed": seed, "accuracy": accuracy_score(truth, pred),
                             "macro_f1": f1_score(truth, pred, average="macro"), "wall_s": time.perf_counter() - start,
                             "cd14_called_cd16": (pred[cd14] == CD16).mean() if cd14.any() else np.nan})
        acc, f1, _ = lr_peer(adata, np.flatnonzero(~held), np.flatnonzero(held), key)
        rows.append({"split": name, "setting": "LogisticRegression", "seed": 0, "accuracy": acc, "macro_f1": f1, "wall_s": np.nan, "cd14_called_cd16": np.nan})
        print(name, "done", flush=True)
    table = pd.DataFrame(rows)
    table["data"] = table["split"].str.split(" ").str[0]
    per_seed = table.groupby(["data", "setting", "seed"], sort=False)[["accuracy", "macro_f1", "cd14_called_cd16", "wall_s"]].mean()
    summary = per_seed.groupby(["data", "setting"], sort=False).agg(["mean", "min", "max"])
    print(f"\nmean over the held-out splits of each dataset; mean / min / max over {args.seeds} seeds:")
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
