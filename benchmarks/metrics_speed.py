"""The benchmark metric set: scatlas vs scib-metrics on the same embedding and kNN graph.

Real OneK1K PBMCs (log-normalised, 30-d PCA) resampled to ``--cells``; both sides get the same
exact kNN graph (k = 90); timed per metric (imports excluded, scib-metrics' first call includes
JAX compilation as a user sees it). Graph construction is timed on its own: ours (``knn``: GPU
brute force, else exact scikit-learn / pynndescent) against scib-metrics' pynndescent helper.
Prints seconds and ratio.

    python benchmarks/metrics_speed.py --cells 10000 40000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.decomposition import PCA

from _common import machine, resampled_counts
from scatlas.data import normalize_log1p
from scatlas.metrics import integration as I
from scatlas.metrics import kmeans_ari_nmi, silhouette_batch, silhouette_label


def main() -> None:
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[10000])
    args = parser.parse_args()
    print(f"machine: {machine()}")
    for n in args.cells:
        adata = resampled_counts("onek1k_4types_40donors.h5ad", n)
        X = normalize_log1p(adata.X).toarray()
        Z = PCA(30, random_state=0).fit_transform(X) + np.random.default_rng(0).normal(0, 1e-3, (n, 30))
        labels, batch = adata.obs["cell_type"].astype(str).to_numpy(), adata.obs["donor_id"].astype(str).to_numpy()
        start = time.perf_counter()
        graph = I.knn(Z, 90)
        graph_s = time.perf_counter() - start
        start = time.perf_counter()
        scib_metrics.nearest_neighbors.pynndescent(Z, n_neighbors=90, random_state=0, n_jobs=-1)
        scib_graph_s = time.perf_counter() - start
        ref = NeighborsResults(indices=graph.indices, distances=graph.distances)
        pairs = {
            "Silhouette label": (lambda: silhouette_label(Z, labels), lambda: scib_metrics.silhouette_label(Z, labels)),
            "Silhouette batch": (lambda: silhouette_batch(Z, labels, batch), lambda: scib_metrics.silhouette_batch(Z, labels, batch)),
            "cLISI": (lambda: I.clisi(graph, labels), lambda: scib_metrics.clisi_knn(ref, labels)),
            "iLISI": (lambda: I.ilisi(graph, batch), lambda: scib_metrics.ilisi_knn(ref, batch)),
            "KBET": (lambda: I.kbet_per_label(graph.first(50), batch, labels),
                     lambda: scib_metrics.kbet_per_label(ref.subset_neighbors(50), batch, labels)),
            "Graph connectivity": (lambda: I.graph_connectivity(graph, labels), lambda: scib_metrics.graph_connectivity(ref, labels)),
            "PCR comparison": (lambda: I.pcr_comparison(X[:, :500], Z, batch), lambda: scib_metrics.pcr_comparison(X[:, :500], Z, batch, categorical=True)),
            "Leiden NMI/ARI (sweep)": (lambda: I.leiden_sweep(graph.first(15), labels),
                                       lambda: scib_metrics.nmi_ari_cluster_labels_leiden(ref.subset_neighbors(15), labels, optimize_resolution=True)),
            "KMeans NMI/ARI": (lambda: kmeans_ari_nmi(Z, labels), lambda: scib_metrics.nmi_ari_cluster_labels_kmeans(Z, labels)),
        }
        print(f"\n{n:,} cells × 30 dims, 40 donors, 4 cell types")
        print(f"{'metric':20s} {'scatlas s':>10s} {'scib-metrics s':>15s} {'ratio':>7s}")
        total = [0.0, 0.0]
        for name, fns in pairs.items():
            times = []
            for fn in fns:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            total[0] += times[0]
            total[1] += times[1]
            print(f"{name:20s} {times[0]:10.2f} {times[1]:15.2f} {times[1] / times[0]:6.1f}×")
        print(f"{'all':20s} {total[0]:10.2f} {total[1]:15.2f} {total[1] / total[0]:6.1f}×")
        print(f"{'kNN graph (k = 90)':20s} {graph_s:10.2f} {scib_graph_s:15.2f} {scib_graph_s / graph_s:6.1f}×  (ours: {'GPU brute force' if torch.cuda.is_available() else 'scikit-learn exact' if n <= 100_000 else 'pynndescent'}; scib-metrics: pynndescent)")
        print(f"{'all + graph':20s} {total[0] + graph_s:10.2f} {total[1] + scib_graph_s:15.2f} {(total[1] + scib_graph_s) / (total[0] + graph_s):6.1f}×")


if __name__ == "__main__":
    main()
