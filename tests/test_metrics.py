"""Metric core against reference implementations (scikit-learn, scib-metrics, scipy) on real cells."""

from __future__ import annotations

import numpy as np
import pytest
import scib_metrics
from scipy import stats
from sklearn import metrics as skm

from scatlas import metrics as sm
from scatlas.metrics.annotation import overall_metrics, per_class_metrics


def test_silhouette_equals_sklearn_in_chunks(symphony_pca):
    X, labels, batch = symphony_pca
    for y in (labels, batch):
        ours = sm.silhouette_samples(X, y, chunk_size=97)  # many chunks, ragged last one
        np.testing.assert_allclose(ours, skm.silhouette_samples(X, y), atol=1e-5)
        assert abs(sm.silhouette_score(X, y, chunk_size=128) - skm.silhouette_score(X, y)) < 1e-5


def test_silhouette_singleton_cluster_and_errors(symphony_pca):
    X, labels, _ = symphony_pca
    y = labels.copy()
    y[0] = "singleton"
    np.testing.assert_allclose(sm.silhouette_samples(X, y), skm.silhouette_samples(X, y), atol=1e-5)
    assert sm.silhouette_samples(X, y)[0] == 0.0
    with pytest.raises(ValueError, match="number of labels"):
        sm.silhouette_samples(X, np.zeros(len(X)))


def test_scib_silhouettes_match_scib_metrics(symphony_pca):
    X, labels, batch = symphony_pca
    assert sm.silhouette_label(X, labels) == pytest.approx(scib_metrics.silhouette_label(X, labels), abs=1e-5)
    assert sm.silhouette_batch(X, labels, batch) == pytest.approx(scib_metrics.silhouette_batch(X, labels, batch), abs=1e-5)


def test_db_ch_match_sklearn(symphony_pca):
    X, labels, _ = symphony_pca
    assert sm.davies_bouldin(X, labels) == pytest.approx(skm.davies_bouldin_score(X, labels))
    assert sm.calinski_harabasz(X, labels) == pytest.approx(skm.calinski_harabasz_score(X, labels))


def test_clusterings_recover_cell_types(symphony_pca):
    X, labels, batch = symphony_pca
    km = sm.kmeans_ari_nmi(X, labels, seed=0)
    assert km == sm.kmeans_ari_nmi(X, labels, seed=0)  # seeded
    assert km["kmeans_nmi"] > 0.5
    leiden = sm.leiden_ari_nmi(X, labels, resolutions=(0.5, 1.0), seed=0)
    assert leiden["leiden_nmi"] > 0.5 and leiden["leiden_resolution"] in (0.5, 1.0)
    # the chemistry carries less structure than the cell types
    assert sm.kmeans_ari_nmi(X, batch)["kmeans_nmi"] < km["kmeans_nmi"]


def test_classify_embedding_beats_chance(symphony_pca):
    X, labels, _ = symphony_pca
    table = sm.classify_embedding(X, labels, classifiers=("logreg", "knn"), n_splits=3).set_index("classifier")
    assert table.loc["logreg", "macro_f1"] > table.loc["dummy", "macro_f1"] + 0.3
    assert table.loc["knn", "accuracy"] > 0.8
    assert 0.45 < table.loc["dummy", "auroc"] < 0.55


def test_classification_scores_match_sklearn():
    rng = np.random.default_rng(0)
    classes = np.array(["a", "b", "c"])
    proba = rng.dirichlet(np.ones(3), size=200)
    y = classes[rng.integers(0, 3, 200)]
    pred = classes[proba.argmax(1)]
    got = sm.classification_scores(y, pred, proba, classes)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr"))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))


def test_annotation_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    classes = np.array(["B", "CD4 T", "CD8 T", "NK", "pDC"])
    y = classes[rng.integers(0, 4, 300)]  # pDC is never true: it is only predicted
    pred = np.where(rng.random(300) < 0.7, y, classes[rng.integers(0, 5, 300)])
    present = np.unique(y)
    got = overall_metrics(y, pred)
    for average in ("macro", "micro", "weighted"):
        assert got[f"{average}_f1"] == pytest.approx(skm.f1_score(y, pred, labels=present, average=average, zero_division=0), abs=1e-15)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-15)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-15)
    table = per_class_metrics(y, pred)
    expected = skm.precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    assert list(table["label"]) == list(classes)
    for column, values in zip(("precision", "recall", "f1", "support"), expected, strict=True):
        np.testing.assert_allclose(table[column], values, atol=1e-15)
    assert table.set_index("label").loc["pDC", ["precision", "recall", "f1", "support"]].tolist() == [0, 0, 0, 0]
    assert np.isnan(overall_metrics(np.array([], dtype=str), np.array([], dtype=str))["accuracy"])  # scikit-learn refuses no cells


def test_conformal_cutoff_bounds_the_share_of_new_scores_above_it():
    """The k-th smallest of n scores, k = ⌈(n + 1) · level⌉: a new score like them exceeds it with probability at most
    1 − level and at least 1 − level − 1/(n + 1) (here 0.66% at level 0.99 over 150 scores); NumPy's interpolated
    quantile is exceeded 1.6% of the time, above the 1% asked."""
    assert sm.conformal_cutoff(np.arange(1.0, 11.0), 0.9) == 10.0 and sm.conformal_cutoff(np.arange(1.0, 11.0), 0.5) == 6.0
    assert sm.conformal_cutoff(np.arange(1.0, 11.0), 0.95) == np.inf and sm.conformal_cutoff(np.arange(1.0, 100.0), 0.99) == 99.0
    draws = np.random.default_rng(0).standard_normal((40_000, 151))
    scores, new = draws[:, :150], draws[:, 150]
    above = np.mean([n > sm.conformal_cutoff(s, 0.99) for s, n in zip(scores, new)])
    assert 0.0045 < above < 0.0088  # 1 − 150/151 = 0.0066, ± 4 standard errors
    assert np.mean(new > np.quantile(scores, 0.99, axis=1)) > 0.014


def test_confidence_interval_matches_scipy():
    x = [0.61, 0.58, 0.66, 0.70, 0.55]
    mean, low, high = sm.confidence_interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (low, high) == pytest.approx(ref)
    assert mean == pytest.approx(np.mean(x))
    assert np.isnan(sm.confidence_interval([1.0])[1])


def test_fold_summary_long_format():
    import pandas as pd

    table = pd.DataFrame({"model": ["AE"] * 3 + ["PCA"] * 3, "split": [1, 2, 3] * 2, "asw": [0.1, 0.2, 0.3, 0.0, 0.0, 0.3]})
    out = sm.fold_summary(table, by=["model"])
    assert list(out["metric"]) == ["asw", "asw"]
    ae = out[out["model"] == "AE"].iloc[0]
    assert ae["mean"] == pytest.approx(0.2) and ae["sd"] == pytest.approx(0.1) and ae["n"] == 3


def test_embedding_scores_subsample_and_nan(symphony_pca):
    X, labels, batch = symphony_pca
    scores = sm.embedding_scores(X, labels, batch, sample_size=500, seed=1)
    assert scores["n_cells"] == 500
    assert scores["silhouette_label_scib"] == pytest.approx((scores["silhouette_label"] + 1) / 2)
    one_batch = sm.embedding_scores(X[:50], labels[:50], np.array(["b"] * 50))
    assert np.isnan(one_batch["silhouette_batch"])
