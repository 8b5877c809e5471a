"""Loader and model training throughput on real cells resampled to N, against scvi-tools SCVI.

Cells: OneK1K PBMCs (7,811 cells × 1,000 genes, ``../shared/data``) drawn with replacement to
``--cells`` (default 1M). For each batch size the script measures, each in its own process:

* ``loader``: scatlas' CSR minibatch loader + on-device densification (no model);
* ``scatlas <model>``: AE (512-132-50, the scMEDAL backbone), scMEDAL-FE and scMEDAL-RE (batch =
  OneK1K donor, 40 batches) trained by scatlas' Lightning engine (``--models``);
* ``scvi-tools SCVI``: ``scvi.model.SCVI`` (defaults) trained on the same cells, same batch size.

Training is timed on ``--train-cells`` cells (one epoch over a prefix of the data) to bound the
run; throughput = cells / wall time of the epoch. Prints a table and the ratio ours / SCVI.

    python benchmarks/ae_throughput.py --cells 1000000 --train-cells 200000 --batch-sizes 128 1024 --models ae fe re
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from _common import isolated, machine, resampled_counts
from scatlas.data import CSRLoader, densify, normalize_log1p
from scatlas.models import build_model
from scatlas.models.base import SplitData, parse_model_config
from scatlas.train import TrainConfig

DATASET = "onek1k_4types_40donors.h5ad"


def loader_run(X: sp.csr_matrix, batch_size: int) -> dict[str, Any]:
    """Iterate once over all cells, densifying each batch on the device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = CSRLoader(X, np.arange(X.shape[0]), batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    total = 0.0
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        total += float(densify(batch).sum()) if device.type == "cpu" else 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"cells": X.shape[0], "wall_s": wall, "cells_per_s": X.shape[0] / wall}


def model_run(X: sp.csr_matrix, batch: np.ndarray, batch_size: int, kind: str) -> dict[str, Any]:
    """One epoch of training of model ``kind`` through scatlas' engine (no validation)."""
    n = X.shape[0]
    names = [str(i) for i in range(int(batch.max()) + 1)]
    data = SplitData(X=X, train=np.arange(n), val=np.arange(0), batch=batch, batch_names=names)
    model = build_model(parse_model_config({"type": kind}), TrainConfig(max_epochs=1, batch_size=batch_size, patience=0, progress=False))
    start = time.perf_counter()
    model.fit(data)
    wall = time.perf_counter() - start
    return {"cells": n, "wall_s": wall, "cells_per_s": n / wall}


def scvi_run(counts: sp.csr_matrix, batch_size: int) -> dict[str, Any]:
    """One epoch of scvi-tools SCVI on the raw counts (no validation split)."""
    import anndata as ad
    import scvi

    adata = ad.AnnData(counts)
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    start = time.perf_counter()
    model.train(max_epochs=1, batch_size=batch_size, train_size=1.0, enable_progress_bar=False, early_stopping=False)
    wall = time.perf_counter() - start
    return {"cells": adata.n_obs, "wall_s": wall, "cells_per_s": adata.n_obs / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--train-cells", type=int, default=200_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--models", nargs="+", default=["ae"], choices=["ae", "fe", "re"])
    parser.add_argument("--skip-scvi", action="store_true")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    adata = resampled_counts(DATASET, args.cells)
    counts = sp.csr_matrix(adata.X)
    lognorm = normalize_log1p(counts)
    print(f"data: {DATASET} resampled to {counts.shape[0]:,} cells × {counts.shape[1]:,} genes, {counts.nnz / counts.shape[0]:.0f} non-zeros per cell")
    head = slice(0, min(args.train_cells, args.cells))
    donors = adata.obs["donor_id"].astype("category").cat.codes.to_numpy().astype(np.int64)[head]
    rows = []
    for bs in args.batch_sizes:
        rows.append(("scatlas loader (all cells)", bs, isolated(loader_run, lognorm, bs)))
        results = {kind: isolated(model_run, lognorm[head], donors, bs, kind) for kind in args.models}
        for kind, result in results.items():
            rows.append((f"scatlas {kind.upper()} (Lightning)", bs, result))
        if not args.skip_scvi:
            peer = isolated(scvi_run, counts[head], bs)
            rows.append(("scvi-tools SCVI", bs, peer))
            if "cells_per_s" in peer:
                for kind, result in results.items():
                    if "cells_per_s" in result:
                        rows.append((f"ratio {kind.upper()} / SCVI", bs, {"ratio": result["cells_per_s"] / peer["cells_per_s"]}))
    print(f"{'what':28s} {'batch':>6s} {'cells':>10s} {'wall s':>8s} {'cells/s':>11s} {'peak RSS GB':>12s} {'peak GPU GB':>12s}")
    for name, bs, r in rows:
        if "error" in r:
            print(f"{name:28s} {bs:6d} error: {r['error']}")
        elif "ratio" in r:
            print(f"{name:28s} {bs:6d} {'':>10s} {'':>8s} {r['ratio']:10.1f}×")
        else:
            print(f"{name:28s} {bs:6d} {r['cells']:10,d} {r['wall_s']:8.1f} {r['cells_per_s']:11,.0f} {r['peak_rss_gb']:12.2f} {r.get('peak_gpu_gb', float('nan')):12.2f}")


if __name__ == "__main__":
    main()
