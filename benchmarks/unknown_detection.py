"""How often ``transfer``'s default ``unknown`` flags catch a cell type the reference lacks, and how often they flag known types.

Every held-out split of ``transfer_defaults.py`` (symphony: each chemistry the query, the other
two the reference; kang18: ctrl → stim and stim → ctrl). In each, every class with at least 20
reference cells is removed from the reference in turn, ``scatlas.tl.transfer`` runs with its
defaults, and the query is scored:

- ``novel_flagged``: share of the query cells of the removed class called ``unknown`` (what the
  flags are for: the reference cannot name them);
- ``known_flagged``: share of the other query cells called ``unknown`` (false alarms);
- ``novel_low_confidence`` / ``novel_far``: the novel cells flagged for low confidence, and flagged only for their distance.

A removed class with fewer than 10 query cells is skipped.

    python benchmarks/unknown_detection.py
"""

from __future__ import annotations

import numpy as np
import pandas as pd

import scatlas as sa
from _common import machine
from transfer_defaults import splits


def main() -> None:
    print(machine())
    rows = []
    for name, adata, held, label, _ in splits():
        reference_all, query_all = adata[~held], adata[held]
        counts = reference_all.obs[label].astype(str).value_counts()
        for removed in counts.index[counts >= 20]:
            reference = reference_all[reference_all.obs[label].astype(str) != removed].copy()
            query = query_all.copy()
            model = sa.tl.transfer(reference, query, label_key=label, log=lambda _: None)
            truth = query.obs[label].astype(str).to_numpy()
            novel = truth == removed
            if novel.sum() < 10:
                continue
            unknown = query.obs[f"{label}_unknown"].to_numpy()
            proba = query.obsm[f"{label}_proba"]
            low = proba[np.arange(len(proba)), model.annotator.labels.finest(proba)] < model.confidence_threshold
            rows.append({"split": name, "removed": removed, "novel cells": int(novel.sum()), "novel_flagged": unknown[novel].mean(),
                         "known_flagged": unknown[~novel].mean(), "novel_low_confidence": low[novel].mean(),
                         "novel_far": (unknown & ~low)[novel].mean()})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    table["data"] = table["split"].str.split(" ").str[0]
    print("\nmean over removed classes:")
    print(table.groupby("data")[["novel_flagged", "known_flagged", "novel_low_confidence", "novel_far"]].mean().to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
