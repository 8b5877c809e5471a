"""Metric core: pure functions on arrays (DESIGN §7), each tested against a reference implementation.

The functions load on first use, each with its module, so that a command that needs only the
annotation metrics does not import scikit-learn (the classifier probes) or igraph (Leiden).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scatlas._lazy import lazy_attributes

if TYPE_CHECKING:
    from scatlas.metrics.annotation import annotation_tables, corrected_predictions, hierarchical_correct
    from scatlas.metrics.calibration import expected_calibration_error, fit_temperature
    from scatlas.metrics.classification import classification_scores, classify_embedding
    from scatlas.metrics.clustering import calinski_harabasz, davies_bouldin, kmeans_ari_nmi, leiden_agreement, leiden_ari_nmi
    from scatlas.metrics.embedding import embedding_scores
    from scatlas.metrics.silhouette import bras, isolated_label_score, isolated_labels, silhouette_batch, silhouette_label, silhouette_samples, silhouette_score
    from scatlas.metrics.stats import confidence_interval, conformal_cutoff, fold_summary

_HOMES = {
    "annotation_tables": "annotation", "corrected_predictions": "annotation", "hierarchical_correct": "annotation",
    "expected_calibration_error": "calibration", "fit_temperature": "calibration",
    "classification_scores": "classification", "classify_embedding": "classification",
    "calinski_harabasz": "clustering", "davies_bouldin": "clustering", "kmeans_ari_nmi": "clustering", "leiden_agreement": "clustering",
    "leiden_ari_nmi": "clustering", "embedding_scores": "embedding",
    "bras": "silhouette", "isolated_label_score": "silhouette", "isolated_labels": "silhouette", "silhouette_batch": "silhouette",
    "silhouette_label": "silhouette", "silhouette_samples": "silhouette", "silhouette_score": "silhouette",
    "confidence_interval": "stats", "conformal_cutoff": "stats", "fold_summary": "stats",
}
__getattr__ = lazy_attributes(__name__, _HOMES)

__all__ = [
    "annotation_tables",
    "bras",
    "calinski_harabasz",
    "classification_scores",
    "classify_embedding",
    "confidence_interval",
    "conformal_cutoff",
    "corrected_predictions",
    "davies_bouldin",
    "embedding_scores",
    "expected_calibration_error",
    "fit_temperature",
    "fold_summary",
    "hierarchical_correct",
    "isolated_label_score",
    "isolated_labels",
    "kmeans_ari_nmi",
    "leiden_agreement",
    "leiden_ari_nmi",
    "silhouette_batch",
    "silhouette_label",
    "silhouette_samples",
    "silhouette_score",
]
