"""Which defaults should ``tl.embed`` give? Each candidate fitted on all cells of every multi-batch shared dataset.

For every dataset: ``tl.embed`` with the default settings (no labels given to any model), then
``tl.benchmark`` (scib-metrics' metric set, PCA of the log-normalised HVGs as the unintegrated
reference). Compares the published scMEDAL-FE encoder objective (−CE of the adversary,
``encoder_objective=negative_ce``) with the confusion objective (now the default), beside PCA and
AE. Prints one Bio / Batch / Total row per dataset × model, with the training wall time.

    python benchmarks/embed_defaults.py [--max-epochs 100] [--datasets symphony kang]
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import pandas as pd

import scatlas as sa
from _common import SHARED, machine

DATASETS = {
    "symphony": ("symphony_pbmc_3tech.h5ad", "batch", "cell_type", None),
    "cellbench_5cl_plates": ("cellbench_5cl_celseq2_3plates.h5ad", "batch", "cell_line", ("demuxlet_cls", "SNG")),
    "cellbench_3cl_platforms": ("cellbench_3cl_celseq2_dropseq.h5ad", "batch", "cell_line", None),
    "kang18_samples": ("kang18_muscat_4samples.h5ad", "sample_id", "author_cell_type", None),
    "onek1k_donors": ("onek1k_4types_40donors.h5ad", "donor_id", "cell_type", None),
}
CANDIDATES = {
    "pca": ("pca", {}),
    "ae": ("ae", {}),
    "fe (published: negative_ce)": ("fe", {"encoder_objective": "negative_ce"}),
    "fe (default: confusion)": ("fe", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    args = parser.parse_args()
    print(machine())
    rows = []
    for name in args.datasets:
        file, batch_key, label_key, keep = DATASETS[name]
        adata = ad.read_h5ad(SHARED / file)
        if keep:
            adata = adata[adata.obs[keep[0]] == keep[1]].copy()
        keys = []
        for label, (model, options) in CANDIDATES.items():
            key = f"X_{len(keys)}"
            start = time.perf_counter()
            sa.tl.embed(adata, model, batch_key=batch_key, key_added=key, max_epochs=args.max_epochs, **options)
            rows.append({"dataset": name, "model": label, "key": key, "train_s": time.perf_counter() - start})
            keys.append(key)
        table = sa.tl.benchmark(adata, keys, label_key=label_key, batch_key=batch_key)
        for row in rows:
            if row["dataset"] == name:
                scores = table.set_index("Embedding").loc[row["key"]]
                row.update({c: float(scores[c]) for c in ("Bio conservation", "Batch correction", "Total", "iLISI", "KBET")})
        print(pd.DataFrame([r for r in rows if r["dataset"] == name]).drop(columns="key").to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    table = pd.DataFrame(rows).drop(columns="key")
    print("\nmean over datasets:")
    print(table.groupby("model", sort=False)[["Bio conservation", "Batch correction", "Total", "train_s"]].mean().to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
