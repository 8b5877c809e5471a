"""Metric core: pure functions on arrays (DESIGN §7), each tested against a reference implementation."""

from scatlas.metrics.annotation import annotation_tables, corrected_predictions, hierarchical_correct
from scatlas.metrics.calibration import expected_calibration_error, fit_temperature
from scatlas.metrics.classification import classification_scores, classify_embedding
from scatlas.metrics.clustering import calinski_harabasz, davies_bouldin, kmeans_ari_nmi, leiden_agreement, leiden_ari_nmi
from scatlas.metrics.embedding import embedding_scores
from scatlas.metrics.silhouette import bras, isolated_label_score, isolated_labels, silhouette_batch, silhouette_label, silhouette_samples, silhouette_score
from scatlas.metrics.stats import confidence_interval, fold_summary

__all__ = [
    "bras",
    "isolated_label_score",
    "isolated_labels",
    "annotation_tables",
    "corrected_predictions",
    "hierarchical_correct",
    "calinski_harabasz",
    "classification_scores",
    "classify_embedding",
    "confidence_interval",
    "davies_bouldin",
    "expected_calibration_error",
    "fit_temperature",
    "embedding_scores",
    "fold_summary",
    "kmeans_ari_nmi",
    "leiden_agreement",
    "leiden_ari_nmi",
    "silhouette_batch",
    "silhouette_label",
    "silhouette_samples",
    "silhouette_score",
]
