"""Wall time and peak host memory of ``scatlas transfer`` and ``scatlas annotate train --n-splits 0``
against scikit-learn LogisticRegression and CellTypist, each in a fresh process, on the same splits.

Splits (raw counts written to ``--workdir``, not timed; query labels used only for scoring):

- ``symphony_<chemistry>``: each chemistry (5', 3'v1, 3'v2) held out in turn as the query, the
  other two the reference (``author_cell_type``);
- ``kang_<group>``: stim held out (reference ctrl), then ctrl held out (``author_cell_type``);
- ``onek1k``: reference the first 20 donors, query the other 20 (``cell_type``);
- ``onek1k_<N>`` (``--atlas-sizes``): the cells of the ``onek1k`` reference donors resampled to N
  cells as a CSR ``.h5ad`` (as ``atlas_scale.py`` writes it) as the reference, the ``onek1k`` query
  (the other 20 donors) as the query, so the accuracy is on donors the reference never saw;
  scatlas streams these references (``--stream``);
- ``onek1k_<N>_in_memory`` (``--in-memory-sizes``, default 10,000: the top of issue #15's "up to
  10k cells"): the same kind of reference, which scatlas loads (its default, the linear model).

Every process reads its files, log-normalises (10,000 counts per cell, ``log1p``), fits and, except
``annotate train``, predicts the query; wall time is the whole process, as a user waits for it.

- ``scatlas transfer``: the default classifier (the linear model in memory; with ``--stream`` on the atlas references the MLP,
  whose minibatch size and epochs scale with the reference unless ``--atlas-batch-size`` /
  ``--atlas-epochs`` set them).
- ``scatlas annotate train --n-splits 0``: the final model only, no cross-validation.
- peer ``LogisticRegression``: scikit-learn's defaults, ``max_iter=1000``, on all genes (log-normalised by
  the same five lines of NumPy as ``scatlas.data.normalize_log1p``, so the peer does not import scatlas
  and torch).
- peer ``CellTypist``: ``celltypist.train`` with its defaults (for the atlas references its SGD
  mini-batch mode, ``use_SGD=True, mini_batch=True``, as CellTypist advises for large data), then
  ``celltypist.annotate`` without majority voting. CellTypist needs scikit-learn < 1.7, so it runs in
  its own environment: ``--celltypist-python PATH`` (e.g. a venv with ``pip install celltypist
  "scikit-learn<1.7"``); left out without it.

    python benchmarks/annotation_speed.py --celltypist-python /tmp/ctvenv/bin/python --atlas-sizes 1000000
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import pandas as pd

from _common import CLI_PROGRAM, PEAK_LINE, SHARED, fresh_process, machine
from atlas_scale import DATASET, write_resampled

_LOGISTIC = f"""
import sys, time
import anndata as ad, numpy as np, scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
def normalize_log1p(counts):  # scatlas.data.normalize_log1p's maths, without importing scatlas (and torch) into the peer
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    counts.data *= np.repeat(scale, np.diff(counts.indptr)).astype(np.float32)
    np.log1p(counts.data, out=counts.data)
    return counts
ref, query = ad.read_h5ad(sys.argv[1]), ad.read_h5ad(sys.argv[2])
start = time.perf_counter()
model = LogisticRegression(max_iter=1000).fit(normalize_log1p(ref.X), ref.obs[sys.argv[3]].astype(str).to_numpy())
print("bench: fit_s", time.perf_counter() - start)
pred = model.predict(normalize_log1p(query.X))
print("bench: accuracy", np.mean(pred == query.obs[sys.argv[4]].astype(str).to_numpy()))
{PEAK_LINE}
"""
_CELLTYPIST = f"""
import sys, time
import anndata as ad, numpy as np, scanpy as sc, celltypist
def lognorm(path):
    adata = ad.read_h5ad(path)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata
ref, sgd = lognorm(sys.argv[1]), sys.argv[5] == "sgd"
start = time.perf_counter()
model = celltypist.train(ref, labels=sys.argv[3], use_SGD=sgd, mini_batch=sgd)
print("bench: fit_s", time.perf_counter() - start)
query = lognorm(sys.argv[2])
pred = celltypist.annotate(query, model=model, majority_voting=False).predicted_labels["predicted_labels"]
print("bench: accuracy", np.mean(pred.astype(str).to_numpy() == query.obs[sys.argv[4]].astype(str).to_numpy()))
{PEAK_LINE}
"""


def _onek1k_reference(obs: pd.DataFrame) -> pd.Series:
    return obs["donor_id"].isin(sorted(obs["donor_id"].unique())[:20])


def write_splits(workdir: Path, atlas_sizes: Sequence[int], in_memory_sizes: Sequence[int] = ()) -> list[tuple[str, Path, Path, str]]:
    """(name, reference file, query file, label column) of every split, written once into ``workdir``."""
    splits = []
    held_out = [(f"symphony_{chem}", "symphony_pbmc_3tech.h5ad", "author_cell_type", lambda obs, c=chem: obs["batch"] != c) for chem in ("5p", "3pv1", "3pv2")]
    held_out += [(f"kang_{group}", "kang18_muscat_4samples.h5ad", "author_cell_type", lambda obs, g=group: obs["group_id"] != g) for group in ("stim", "ctrl")]
    for name, file, label, reference in (*held_out, ("onek1k", DATASET, "cell_type", _onek1k_reference)):
        ref, query = workdir / f"{name}_reference.h5ad", workdir / f"{name}_query.h5ad"
        if not query.exists():
            adata = ad.read_h5ad(SHARED / file)
            keep = reference(adata.obs).to_numpy()
            adata[keep].copy().write_h5ad(ref)
            adata[~keep].copy().write_h5ad(query)
        splits.append((name, ref, query, label))
    obs = ad.read_h5ad(SHARED / DATASET, backed="r").obs
    donors = sorted(obs.loc[_onek1k_reference(obs), "donor_id"].astype(str).unique())
    for n, suffix in [*((n, "_in_memory") for n in in_memory_sizes), *((n, "") for n in atlas_sizes)]:
        ref = workdir / f"onek1k_{n}_reference_donors.h5ad"
        if not ref.exists():
            write_resampled(ref, n, counts=True, donors=donors)
        splits.append((f"onek1k_{n}{suffix}", ref, workdir / "onek1k_query.h5ad", "cell_type"))
    return splits


def scatlas_args(command: str, ref: Path, query: Path, label: str, out: Path, atlas: bool, batch_size: int | None, epochs: int | None) -> list[str]:
    """Arguments of ``scatlas transfer`` or ``scatlas annotate train --n-splits 0``."""
    if command == "transfer":
        args = ["transfer", "--reference", str(ref), "--query", str(query), "--label-key", label, "--query-label-key", label]
    else:
        args = ["annotate", "train", str(ref), "--label-key", label, "--n-splits", "0"]
    args += ["--out", str(out), "--overwrite"]
    if not atlas:
        return args
    return args + ["--stream", *(["--batch-size", str(batch_size)] if batch_size else []), *(["--max-epochs", str(epochs)] if epochs else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atlas-sizes", type=int, nargs="*", default=[1_000_000], help="resampled references scatlas streams")
    parser.add_argument("--in-memory-sizes", type=int, nargs="*", default=[10_000], help="resampled references scatlas loads")
    parser.add_argument("--atlas-batch-size", type=int, default=None, help="minibatch of the atlas runs (default: scatlas's own)")
    parser.add_argument("--atlas-epochs", type=int, default=None, help="most epochs of the atlas runs (default: scatlas's own)")
    parser.add_argument("--celltypist-python", default=None, help="python of an environment with celltypist (scikit-learn < 1.7)")
    parser.add_argument("--workdir", default=None, help="where the split .h5ad files go (default: a temporary directory)")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scatlas_annotation_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, ref, query, label in write_splits(workdir, args.atlas_sizes, args.in_memory_sizes):
        atlas = name.startswith("onek1k_") and not name.endswith("_in_memory")
        n_cells = ad.read_h5ad(ref, backed="r").n_obs
        runs = {
            command: (CLI_PROGRAM, scatlas_args(command, ref, query, label, workdir / f"out_{name}_{command.replace(' ', '_')}", atlas,
                                                args.atlas_batch_size, args.atlas_epochs), None)
            for command in ("transfer", "annotate train")
        }
        runs["LogisticRegression (peer)"] = (_LOGISTIC, [str(ref), str(query), label, label], None)
        if args.celltypist_python:
            runs["CellTypist (peer)"] = (_CELLTYPIST, [str(ref), str(query), label, label, "sgd" if atlas else "default"], args.celltypist_python)
        for what, (program, argv, python) in runs.items():
            result = fresh_process(program, argv, python)
            if what == "transfer" and "error" not in result:
                summary = pd.read_csv(workdir / f"out_{name}_transfer" / "summary.csv").set_index("dataset")
                result["accuracy"] = float(summary.loc[query.stem, "accuracy"])
            rows.append({"split": name, "reference cells": n_cells, "what": what, **result})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    lr = table[table["what"] == "LogisticRegression (peer)"].set_index("split")["wall_s"]
    table["wall / LR"] = table["wall_s"] / table["split"].map(lr)
    print(f"\natlas references: --stream, minibatch {args.atlas_batch_size or 'scaled'}, epochs {args.atlas_epochs or 'scaled'}")
    print(table.drop(columns=[c for c in table.columns if c == "error" and table[c].isna().all()]).to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
