"""Loader and model training throughput on real cells resampled to N, against scvi-tools SCVI.

Cells: OneK1K PBMCs (7,811 cells × 1,000 genes, ``../shared/data``) drawn with replacement to
``--cells`` (default 1M). For each batch size the script measures, each in its own process:

* ``loader``: scatlas' CSR minibatch loader + on-device densification (no model);
* ``scatlas <model>``: AE (512-132-50, the scMEDAL backbone), scMEDAL-FE and scMEDAL-RE (batch =
  OneK1K donor, 40 batches) trained by scatlas' Lightning engine (``--models``);
* ``scvi-tools SCVI``: ``scvi.model.SCVI`` (defaults) trained on the same cells, same batch size.

Training runs ``--epochs`` epochs over the first ``--train-cells`` cells; throughput = cells / wall
time of the last epoch (steady state: CUDA context, cuBLAS and data placement are set up in the
first). On a GPU, scatlas keeps the CSR matrix on the device and gathers minibatches there; SCVI
uses its own AnnData loader. Prints a table and the ratio ours / SCVI.

    python benchmarks/ae_throughput.py --cells 1000000 --train-cells 200000 --batch-sizes 128 1024 --models ae fe re
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from _common import EpochTimer, isolated, machine, resampled_counts
from scatlas.data import CSRLoader, densify, normalize_log1p
from scatlas.models import build_model
from scatlas.models.base import SplitData, parse_model_config
from scatlas.train import TrainConfig

DATASET = "onek1k_4types_40donors.h5ad"


def loader_run(X: sp.csr_matrix, batch_size: int) -> dict[str, Any]:
    """Two shuffled passes over all cells, densifying each minibatch on the device; the second is timed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loader = CSRLoader(X, np.arange(X.shape[0]), batch_size=batch_size, shuffle=True, device=device)
    for timed in (False, True):
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        for batch in loader:
            total += densify(batch)[0, 0]
        float(total)
        wall = time.perf_counter() - start
    return {"cells": X.shape[0], "wall_s": wall, "cells_per_s": X.shape[0] / wall}


def model_run(X: sp.csr_matrix, batch: np.ndarray, batch_size: int, kind: str, epochs: int) -> dict[str, Any]:
    """``epochs`` epochs of model ``kind`` through scatlas' engine (no validation); the last epoch is timed."""
    n = X.shape[0]
    names = [str(i) for i in range(int(batch.max()) + 1)]
    data = SplitData(X=X, train=np.arange(n), val=np.arange(0), batch=batch, batch_names=names)
    model = build_model(parse_model_config({"type": kind}), TrainConfig(max_epochs=epochs, batch_size=batch_size, patience=0, progress=False))
    history = model.fit(data)
    wall = float(history["epoch_time_s"].iloc[-1])
    return {"cells": n, "wall_s": wall, "cells_per_s": n / wall, "first_epoch_s": float(history["epoch_time_s"].iloc[0])}


def scvi_run(counts: sp.csr_matrix, batch_size: int, epochs: int) -> dict[str, Any]:
    """``epochs`` epochs of scvi-tools SCVI on the raw counts (no validation split); the last epoch is timed."""
    import anndata as ad
    import scvi

    adata = ad.AnnData(counts)
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    timer = EpochTimer()
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=1.0, enable_progress_bar=False, early_stopping=False, callbacks=[timer])
    wall = timer.times[-1]
    return {"cells": adata.n_obs, "wall_s": wall, "cells_per_s": adata.n_obs / wall, "first_epoch_s": timer.times[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--train-cells", type=int, default=200_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--models", nargs="+", default=["ae"], choices=["ae", "fe", "re"])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per model; the last one is timed (steady state)")
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
        results = {kind: isolated(model_run, lognorm[head], donors, bs, kind, args.epochs) for kind in args.models}
        for kind, result in results.items():
            rows.append((f"scatlas {kind.upper()} (Lightning)", bs, result))
        if not args.skip_scvi:
            peer = isolated(scvi_run, counts[head], bs, args.epochs)
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
