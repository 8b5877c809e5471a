"""average_precision + mean_average_precision: scatlas vs copairs on the same profiles.

Profiles: the real LINCS Cell Painting wells (``../shared/data``), 454 features, resampled with
Gaussian jitter to N profiles laid out as copairs' own benchmark describes (100 features kept,
4 replicates per compound, positives required on other plates). Prints wall time and the ratio.

    python benchmarks/retrieval_speed.py --sizes 2000 10000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from _common import SHARED, isolated, machine

RULES = (["compound"], ["plate"], [], ["compound"])


def profiles(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    wells = pd.read_csv(SHARED / "lincs_SQ00015054_well_profiles.csv.gz")
    feats = wells.drop(columns=wells.filter(like="Metadata_").columns).to_numpy()[:, :100]
    rng = np.random.default_rng(seed)
    n_compounds = n // 4
    base = feats[rng.integers(0, len(feats), n_compounds)]
    X = np.repeat(base, 4, axis=0) + rng.normal(0, 0.5, (n_compounds * 4, feats.shape[1]))
    meta = pd.DataFrame({"compound": np.repeat([f"c{i}" for i in range(n_compounds)], 4), "plate": np.tile([f"p{i}" for i in range(4)], n_compounds)})
    return meta, X


def run(impl: str, n: int) -> dict:
    import copairs.map as cm

    from scatlas.metrics import retrieval

    meta, X = profiles(n)
    start = time.perf_counter()  # imports excluded
    if impl == "copairs":
        ap = cm.average_precision(meta, X, *RULES, progress_bar=False)
        m = cm.mean_average_precision(ap, ["compound"], null_size=1000, threshold=0.05, seed=0, progress_bar=False)
    else:
        ap = retrieval.average_precision(meta, X, *RULES)
        m = retrieval.mean_average_precision(ap, ["compound"], null_size=1000, threshold=0.05, seed=0)
    return {"wall_s": time.perf_counter() - start, "map": float(m["mean_average_precision"].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"{'profiles':>9s} {'copairs s':>10s} {'scatlas s':>10s} {'speed-up':>9s} {'mAP equal':>10s} {'peak RSS GB c/s':>16s}")
    for n in args.sizes:
        ref, ours = isolated(run, "copairs", n), isolated(run, "scatlas", n)
        same = abs(ref["map"] - ours["map"]) < 1e-9
        print(f"{n:9d} {ref['wall_s']:10.2f} {ours['wall_s']:10.2f} {ref['wall_s'] / ours['wall_s']:8.1f}× {str(same):>10s} {ref['peak_rss_gb']:7.2f}/{ours['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
