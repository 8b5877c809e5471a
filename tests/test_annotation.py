"""Ontology, hierarchical CE, classifiers and the annotate workflow on real PBMCs."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch.nn import functional as F
from typer.testing import CliRunner

from scatlas import InputError
from scatlas.settings import TrainingConfig
from scatlas.tl._annotation import Annotator, annotate, load_annotate_config, scaled_training, train_annotator
from scatlas.tl._labels import label_space
from scatlas.cli import app
from scatlas.losses import hierarchical_cross_entropy, one_vs_rest_cross_entropy
from scatlas.metrics.annotation import annotation_tables, corrected_predictions, hierarchical_correct
from scatlas.nn.tabnet import entmax15, sparsemax
from scatlas.metrics.calibration import softmax
from scatlas.ontology import CellOntology, coarse_exclusions, fine_classes, map_author_labels, nested_label_pairs, reachability, source_reachability

runner = CliRunner()
CD4_SUBSETS = ["CL:0000492", "CL:0000792", "CL:0000895", "CL:0000897"]  # helper, Treg, naive CD4, memory CD4
CD4_PARENT = "CL:0000624"  # CD4-positive, alpha-beta T cell


@pytest.fixture(scope="module")
def ontology():
    return CellOntology()


@pytest.fixture(scope="module")
def zheng(tmp_path_factory):
    from conftest import data_path

    return data_path("zheng17_sorted_pbmc_reference.h5ad")


def test_reachability_equals_ancestor_lists(ontology, zheng, symphony_path):
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    for path in (zheng, symphony_path):
        ids = sorted(ad.read_h5ad(path, backed="r").obs["cell_type_ontology_term_id"].astype(str).unique())
        R = reachability(ids, ontology)
        expected = np.array([[1.0 if i == j or a in parser.get_term_ancestors(b) else 0.0 for j, b in enumerate(ids)] for i, a in enumerate(ids)])
        np.testing.assert_array_equal(R, expected)
    ids = sorted(ad.read_h5ad(symphony_path, backed="r").obs["cell_type_ontology_term_id"].astype(str).unique())
    R = reachability(ids, ontology)
    assert R[ids.index("CL:0001054"), ids.index("CL:0002396")] == 1  # CD16 monocyte under CD14-positive monocyte
    assert R[ids.index("CL:0002396"), ids.index("CL:0001054")] == 0
    with_parent = reachability([CD4_PARENT, *CD4_SUBSETS], ontology)
    assert with_parent[0].sum() == 5 and with_parent[1:, 0].sum() == 0


def test_unknown_ids_and_author_mapping(ontology, tmp_path):
    with pytest.raises(InputError, match=r"unknown or deprecated Cell Ontology ids: 'CL:9999999', 'T cell'"):
        reachability(["CL:0000624", "CL:9999999", "T cell"], ontology)
    table = tmp_path / "map.csv"
    pd.DataFrame({"author": ["T_CD4", "B"], "cl": ["CL:0000624", "CL:0000236"]}).to_csv(table, index=False)
    assert list(map_author_labels(["B", "T_CD4", "B"], table, ontology)) == ["CL:0000236", "CL:0000624", "CL:0000236"]
    with pytest.raises(InputError, match=r"no Cell Ontology id for labels \['NK'\]"):
        map_author_labels(["NK"], table, ontology)


def test_obo_is_a_only(tmp_path):
    obo = tmp_path / "cl.obo"
    obo.write_text(
        "data-version: test\n\n[Term]\nid: CL:1\nname: cell\n\n[Term]\nid: CL:2\nname: T cell\nis_a: CL:1 ! cell\n"
        "relationship: part_of CL:9\n\n[Term]\nid: CL:3\nname: CD4 T cell\nis_a: CL:2 ! T cell\n"
    )
    onto = CellOntology.from_obo(obo)
    assert onto.ancestors("CL:3") == {"CL:1", "CL:2"} and onto.relations == "is_a"
    np.testing.assert_array_equal(reachability(["CL:2", "CL:3"], onto), [[1, 1], [0, 1]])


def test_hce_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))  # softmax = (0.5, 0.3, 0.2)
    R = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # class 1 is a child of class 0
    # target 0 (parent): q = 0.5 + 0.3 = 0.8
    assert hierarchical_cross_entropy(logits, torch.tensor([0]), R).item() == pytest.approx(-np.log(0.8), abs=1e-6)
    # target 1 (leaf): plain CE
    assert hierarchical_cross_entropy(logits, torch.tensor([1]), R).item() == pytest.approx(-np.log(0.3), abs=1e-6)
    # weighted mean over a batch, as nll_loss
    w = torch.tensor([2.0, 1.0, 1.0])
    got = hierarchical_cross_entropy(logits.repeat(2, 1), torch.tensor([0, 2]), R, weight=w).item()
    assert got == pytest.approx((2 * -np.log(0.8) + -np.log(0.2)) / 3, abs=1e-6)
    z = torch.randn(6, 3)
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    assert hierarchical_cross_entropy(z, t, torch.eye(3), w).item() == F.cross_entropy(z, t, weight=w).item()  # exactly


def test_one_vs_rest_hce_hand_computed():
    z = torch.tensor([[0.0, 1.0, -1.0]])
    s = torch.sigmoid(z)[0].double().numpy()
    R = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # class 1 is a child of class 0
    # target 0 (parent): class 0 or class 1 is on, class 2 is off
    parent = -np.log(1 - (1 - s[0]) * (1 - s[1])) - np.log(1 - s[2])
    assert one_vs_rest_cross_entropy(z, torch.tensor([0]), R).item() == pytest.approx(parent, abs=1e-6)
    # target 1 (leaf), or no hierarchy: a binary cross-entropy per class against the one-hot target
    leaf = -np.log(1 - s[0]) - np.log(s[1]) - np.log(1 - s[2])
    assert one_vs_rest_cross_entropy(z, torch.tensor([1]), R).item() == pytest.approx(leaf, abs=1e-6)
    assert one_vs_rest_cross_entropy(z, torch.tensor([1])).item() == pytest.approx(leaf, abs=1e-6)
    # class-weighted mean over a batch, as nll_loss
    w = torch.tensor([2.0, 1.0, 1.0])
    got = one_vs_rest_cross_entropy(z.repeat(2, 1), torch.tensor([0, 1]), R, weight=w).item()
    assert got == pytest.approx((2 * parent + leaf) / 3, abs=1e-6)
    # a flat partition: hierarchical equals ordinary one-vs-rest to the bit, and the gradient stays finite far out
    zz, t = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    assert one_vs_rest_cross_entropy(zz, t, torch.eye(3), w).item() == one_vs_rest_cross_entropy(zz, t, None, w).item()
    far = torch.tensor([[-40.0, -40.0, 40.0]], requires_grad=True)
    one_vs_rest_cross_entropy(far, torch.tensor([0]), R).backward()
    assert torch.isfinite(far.grad).all()


@pytest.mark.parametrize(("output", "gene_scale", "scale_by"), [("ovr", 0.5, "total"), ("softmax", 0.0, "total"), ("ovr", 1.0, "within")])
def test_full_batch_linear_equals_scikit_learn(output, gene_scale, scale_by):
    """``solver: lbfgs`` is L2 logistic regression as scikit-learn fits it (one-vs-rest or multinomial), on kang's ctrl cells, its
    genes divided by a power of their standard deviation over all cells or pooled within classes; deterministic."""
    from conftest import data_path
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from scatlas.data import normalize_log1p
    from scatlas.models import LinearClassifier
    from scatlas.models.base import SplitData
    from scatlas.models.classifiers import LinearConfig
    from scatlas.train import TrainConfig

    kang = ad.read_h5ad(data_path("kang18_muscat_4samples.h5ad"))
    kang = kang[kang.obs["group_id"] == "ctrl"]
    X = normalize_log1p(kang.X).tocsr()
    classes, codes = np.unique(kang.obs["author_cell_type"].astype(str), return_inverse=True)
    n = X.shape[0]
    data = SplitData(X=X, train=np.arange(n - 100), val=np.arange(n - 100, n), batch=np.zeros(n, dtype=np.int64), batch_names=["ctrl"],
                     label=codes, label_names=list(classes))
    def fit(data: SplitData, tol: float = 1e-7, start: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[LinearClassifier, pd.DataFrame]:
        model = LinearClassifier(LinearConfig(solver="lbfgs", output=output, C=0.1, gene_scale=gene_scale, gene_scale_by=scale_by, class_weighted=False,
                                              tol=tol, max_iter=5000),
                                 TrainConfig(progress=False, accelerator="cpu"))
        return model, model.fit(data, start=start)

    (model, history), (again, _) = fit(data), fit(data)
    assert torch.equal(model.module.backbone.head.weight, again.module.backbone.head.weight)
    assert history["train_loss"].is_monotonic_decreasing and len(history) > 10
    if scale_by == "total":  # (the warm start's mechanics; within classes the fewer cells' scales differ more, and it need not save steps)
        # with the default tolerance, started where a fit on fewer cells ended (as the refit on every cell starts): fewer iterations, the same model
        first = fit(replace(data, train=data.train[:-300]), 1e-4)[0]
        (cold, cold_history), (warm, warm_history) = fit(data, 1e-4), fit(data, 1e-4, first.head())
        assert len(warm_history) < len(cold_history)
        np.testing.assert_allclose(warm.predict_proba(data, np.arange(n)), cold.predict_proba(data, np.arange(n)), atol=0.03)  # both within tol of the optimum
        assert (warm.predict_proba(data, np.arange(n)).argmax(1) == cold.predict_proba(data, np.arange(n)).argmax(1)).mean() > 0.995
    dense, y = X[data.train].toarray().astype(np.float64), codes[data.train]  # the early-stopping cells stay out of a full-batch fit
    within = sum(((dense[y == k] - dense[y == k].mean(0)) ** 2).sum(0) for k in np.unique(y)) / (len(y) - len(np.unique(y)))
    sd = dense.std(0, ddof=1) if scale_by == "total" else np.sqrt(within)
    scaled = X.multiply(1 / np.where(sd > 0, sd, 1) ** gene_scale).tocsr().astype(np.float64)  # float64, as our fit: scikit-learn keeps float32 input in float32
    peer = LogisticRegression(C=0.1, tol=1e-8, max_iter=10_000)
    peer = (OneVsRestClassifier(peer) if output == "ovr" else peer).fit(scaled[data.train], codes[data.train])
    ours = model.predict_proba(data, np.arange(n))
    np.testing.assert_allclose(ours, peer.predict_proba(scaled), atol=1e-3)
    assert (ours.argmax(1) == peer.predict(scaled)).mean() > 0.995


def test_full_batch_fit_splits_its_products_over_threads_without_changing_the_model(monkeypatch):
    """From PARALLEL_VALUES stored values the L-BFGS fit's products run on threads over fixed row blocks: X @ V gives
    the bits of one SciPy product, X.T @ G its values to rounding, the same bits whatever the number of threads, and
    the fitted model that of the one-product fit."""
    from conftest import data_path

    from scatlas._threads import Workers
    from scatlas.data import normalize_log1p
    from scatlas.models import LinearClassifier, classifiers
    from scatlas.models.base import SplitData
    from scatlas.models.classifiers import LinearConfig, RowBlocks
    from scatlas.train import TrainConfig

    kang = ad.read_h5ad(data_path("kang18_muscat_4samples.h5ad"))
    X = normalize_log1p(kang.X).tocsr().astype(np.float64)
    rng = np.random.default_rng(0)
    V, G = rng.random((X.shape[1], 8)), rng.random((X.shape[0], 8))
    transposed = []
    for threads in (1, 3):
        monkeypatch.setattr(RowBlocks, "_workers", Workers(threads, "test"))
        blocks = RowBlocks(X)
        np.testing.assert_array_equal(blocks.dot(V), X @ V)
        transposed.append(blocks.tdot(G))
    np.testing.assert_array_equal(transposed[0], transposed[1])
    np.testing.assert_allclose(transposed[0], X.T @ G, rtol=1e-12)
    classes, codes = np.unique(kang.obs["author_cell_type"].astype(str), return_inverse=True)
    data = SplitData(X=X.astype(np.float32), train=np.arange(X.shape[0]), val=np.arange(0), batch=np.zeros(X.shape[0], dtype=np.int64),
                     batch_names=["all"], label=codes, label_names=list(classes))
    fitted = []
    for threshold in (0, 1 << 40):  # every fit on threads, none
        monkeypatch.setattr(classifiers, "PARALLEL_VALUES", threshold)
        model = LinearClassifier(LinearConfig(solver="lbfgs"), TrainConfig(progress=False, accelerator="cpu"))
        model.fit(data)
        fitted.append(model.predict_proba(data, data.train))
    np.testing.assert_allclose(fitted[0], fitted[1], atol=1e-6)
    assert (fitted[0].argmax(1) == fitted[1].argmax(1)).all()


def test_linear_settings_round_trip_and_refuse_what_does_not_apply():
    """A saved model's settings (every field, defaults included) load back; lbfgs-only settings on the adam solver are refused."""
    from scatlas.models.classifiers import LinearConfig

    for config in (LinearConfig(), LinearConfig(solver="lbfgs", output="ovr", C=0.03, gene_scale=0.5)):
        assert LinearConfig.model_validate(config.model_dump(mode="json")) == config
    with pytest.raises(ValueError, match="C, gene_scale_by, tol: only for solver 'lbfgs'"):
        LinearConfig(C=0.1, tol=1e-6, gene_scale_by="within")
    with pytest.raises(ValueError, match="ensemble members would be identical"):
        LinearConfig(solver="lbfgs", ensemble=2)


def test_label_meaning_per_source_hand_computed():
    # classes: 0 monocyte, 1 CD14 monocyte, 2 CD16 monocyte, 3 B cell; in the ontology 1 and 2 descend from 0, and 2 from 1
    R = np.array([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    # source 0 (coarse study) labels monocyte and B; source 1 (fine study) labels CD14, CD16 and B
    codes = np.array([0, 3, 1, 2, 3])
    sources = np.array([0, 0, 1, 1, 1])
    per = source_reachability(R, codes, sources)
    np.testing.assert_array_equal(per[0], R)  # monocyte keeps "monocyte or any descendant" in the coarse study
    np.testing.assert_array_equal(per[1][1], [0, 1, 0, 0])  # CD14 next to labelled CD16 means "CD14, not CD16"
    np.testing.assert_array_equal(per[1][2], [0, 0, 1, 0])
    assert list(fine_classes(R, codes, sources)) == [False, True, True, True]
    assert nested_label_pairs(R, codes, sources) == [(0, 1, 0, False), (0, 2, 0, False), (1, 2, 1, True)]
    # a source labelling monocyte and CD14 (not CD16): monocyte excludes CD14 and, below it, CD16 too
    mixed = np.array([0, 1, 2]), np.array([0, 0, 1])
    np.testing.assert_array_equal(source_reachability(R, *mixed)[0][0], [1, 0, 0, 0])
    assert nested_label_pairs(R, *mixed) == [(0, 1, 0, True), (0, 2, 0, True), (1, 2, 0, False)]
    assert coarse_exclusions(R, source_reachability(R, *mixed), *mixed) == [(0, 0, 1)]  # its CD14 is coarse: CD16 is labelled elsewhere
    assert coarse_exclusions(R, per, codes, sources) == []
    assert list(fine_classes(R, *mixed)) == [False, False, True, True]  # no source separates monocyte or CD14 from the CD16 labelled elsewhere
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.6, 0.1]])).repeat(2, 1)
    target = torch.tensor([0, 1])
    loss = hierarchical_cross_entropy(logits, target, torch.as_tensor(per), source=torch.tensor([0, 1])).item()
    assert loss == pytest.approx((-np.log(0.9) - np.log(0.2)) / 2, abs=1e-6)  # coarse target satisfied by CD16; CD14 not
    # one source with a flat author partition: every label exclusive, HCE is CE to the bit
    flat = source_reachability(R, np.array([1, 2, 3, 1]), np.zeros(4, dtype=np.int64))
    z, t = torch.randn(8, 4), torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])
    assert hierarchical_cross_entropy(z, t, torch.as_tensor(flat), source=torch.zeros(8, dtype=torch.int64)).item() == F.cross_entropy(z, t).item()


def test_symphony_monocytes_nest_and_are_reported(symphony_path, ontology):
    adata = ad.read_h5ad(symphony_path)
    ids = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    lines: list[str] = []
    labels = label_space(ids, adata.obs["cell_type"].astype(str).to_numpy(), ontology, sources=None, log=lines.append)
    cd14, cd16 = labels.classes.index("CL:0001054"), labels.classes.index("CL:0002396")
    assert labels.reachability[cd14, cd16] == 1 and labels.per_source[0, cd14, cd16] == 0  # the ontology nests them; the source separates them
    assert labels.fine.all() and len(lines) == 1 and "excludes" in lines[0] and "CD14-low, CD16-positive monocyte" in lines[0]


def test_hierarchical_metric_credit():
    classes = [CD4_PARENT, "CL:0000897", "CL:0000236"]
    R = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    y_true = np.array([CD4_PARENT, "CL:0000897", "CL:0000236"])
    y_pred = np.array(["CL:0000897", CD4_PARENT, "CL:0000236"])  # child for parent: credit; parent for child: none
    assert list(hierarchical_correct(y_true, y_pred, classes, R)) == [True, False, True]
    assert list(corrected_predictions(y_true, y_pred, classes, R)) == [CD4_PARENT, CD4_PARENT, "CL:0000236"]
    overall = annotation_tables(y_true, y_pred, classes, R)["overall"].set_index("evaluation")
    assert overall.loc["exact", "accuracy"] == pytest.approx(1 / 3) and overall.loc["hierarchical", "accuracy"] == pytest.approx(2 / 3)


def test_sparse_masks():
    x = torch.tensor([[3.0, 1.0, 0.2, -1.0], [0.1, 0.1, 0.1, 0.1]])
    for fn in (sparsemax, entmax15):
        y = fn(x)
        assert torch.allclose(y.sum(1), torch.ones(2), atol=1e-6) and (y >= 0).all()
        assert y[0, 3] == 0  # sparse
        assert torch.allclose(y[1], torch.full((4,), 0.25))
    # sparsemax = Euclidean projection onto the simplex: check against the closed form
    z = x[0].numpy()
    tau = next(t for t in (np.cumsum(np.sort(z)[::-1]) - 1) / np.arange(1, 5) if True)
    srt = np.sort(z)[::-1]
    k = max(i for i in range(1, 5) if 1 + i * srt[i - 1] > srt[:i].sum())
    tau = (srt[:k].sum() - 1) / k
    np.testing.assert_allclose(sparsemax(x)[0].numpy(), np.maximum(z - tau, 0), atol=1e-6)
    # entmax15 solution satisfies y = [(x/2 - tau)_+]^2 with sum 1 (up to the max shift)
    y = entmax15(x)[0].numpy()
    half = (z - z.max()) / 2
    tau = half[y > 0][0] - np.sqrt(y[y > 0][0])
    np.testing.assert_allclose(y, np.maximum(half - tau, 0) ** 2, atol=1e-6)


def _config(path: Path, kind: str, loss: str, **extra):
    values = {
        "dataset": {"name": "z", "path": path, "label_key": "cell_type"},
        "ontology_key": "cell_type_ontology_term_id",
        "model": {"type": kind, "loss": loss},
        "split": {"kind": "kfold", "n_splits": 3},
        "training": {"max_epochs": 12, "batch_size": 256, "patience": 3},
        "final_model": False,
    }
    values.update(extra)
    return load_annotate_config(values)


@pytest.mark.parametrize(("model", "min_accuracy"), [("linear", 0.8), ("mlp", 0.8), ("tabnet", 0.6)])
def test_classifiers_learn_zheng17(zheng, tmp_path, model, min_accuracy):
    entry = {"type": model, "loss": "hce", **({"training": {"lr": 2e-2}} if model == "tabnet" else {})}
    cfg = _config(zheng, model, "hce", model=entry, n_top_genes=2000, training={"max_epochs": 15, "batch_size": 64, "patience": 4})
    summary = train_annotator(cfg, tmp_path / "out", log=lambda _: None).set_index(["evaluation", "metric"])
    assert summary.loc[("exact", "accuracy"), "mean"] > min_accuracy  # 9 classes: chance ≈ 0.11
    history = pd.read_csv(tmp_path / "out" / "splits_1" / "history.csv")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    for name in ("overall_metrics.csv", "per_class_metrics.csv", "detailed_results.parquet", "confusion_matrix.csv", "confusion_matrix.png", "per_class_f1.png",
                 "fold_metrics_95CI.csv", "report.html"):
        assert (tmp_path / "out" / name).exists()
    detail = pd.read_parquet(tmp_path / "out" / "detailed_results.parquet")
    assert len(detail) == 2140 and {"y_true", "y_pred", "correct", "correct_hierarchical", "p_CL:0000236"} <= set(detail.columns)
    np.testing.assert_allclose(detail.filter(like="p_CL").sum(1), 1, atol=1e-5)
    per_class = pd.read_csv(tmp_path / "out" / "per_class_metrics.csv")
    assert set(per_class.loc[per_class["label"] == "CL:0000236", "name"]) == {"B cell"}  # readable name beside the CL id
    if model == "linear":
        from test_runner_cli import render_in_chromium

        dom, console_log = render_in_chromium(tmp_path / "out" / "report.html")
        assert "B cell" in dom and "macro F1 ↑" in dom and "Uncaught" not in console_log
        assert all(re.search(r"<table|<img|<p", body) for body in re.findall(r"<section>(.*?)</section>", dom, flags=re.S))


def test_mixed_fine_and_coarse_labels(zheng, tmp_path):
    adata = ad.read_h5ad(zheng)
    ids = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy().copy()
    rng = np.random.default_rng(0)
    coarse = np.isin(ids, CD4_SUBSETS) & (rng.random(len(ids)) < 0.5)
    ids[coarse] = CD4_PARENT
    adata.obs["cell_type_ontology_term_id"] = ids
    adata.obs["cell_type"] = np.where(coarse, "CD4-positive, alpha-beta T cell", adata.obs["cell_type"].astype(str))
    path = tmp_path / "mixed.h5ad"
    adata.write_h5ad(path)
    train_annotator(_config(path, "mlp", "hce"), tmp_path / "out", log=lambda _: None)
    detail = pd.read_parquet(tmp_path / "out" / "detailed_results.parquet")
    parent = detail[detail["y_true"] == CD4_PARENT]
    # predicting a CD4 subset for a coarse CD4 label earns hierarchical (not exact) credit
    subset_pred = parent["y_pred"].isin(CD4_SUBSETS)
    assert subset_pred.any()
    assert parent.loc[subset_pred, "correct_hierarchical"].all() and not parent.loc[subset_pred, "correct"].any()
    overall = pd.read_csv(tmp_path / "out" / "overall_metrics.csv").set_index("evaluation")
    assert overall.loc["hierarchical", "accuracy"] > overall.loc["exact", "accuracy"]


def test_out_of_distribution_chemistry(symphony_path, tmp_path):
    cfg = _config(
        symphony_path, "linear", "hce",
        dataset={"name": "s", "path": symphony_path, "label_key": "cell_type", "batch_key": "batch"},
        split={"kind": "study", "group_key": "batch"},
        model={"type": "linear", "loss": "hce", "training": {"lr": 5e-3}},
        training={"max_epochs": 30, "batch_size": 64, "patience": 5},
    )
    train_annotator(cfg, tmp_path / "out", log=lambda _: None)
    per_batch = pd.read_csv(tmp_path / "out" / "per_batch_metrics.csv")
    assert set(per_batch["batch"]) == {"3pv1", "3pv2", "5p"}
    fold = pd.read_csv(tmp_path / "out" / "splits_1" / "per_batch_metrics.csv")
    assert fold["batch"].nunique() == 1  # each split tests one held-out chemistry
    assert (pd.read_csv(tmp_path / "out" / "per_class_metrics.csv")["support"] > 0).any()
    assert per_batch[per_batch["evaluation"] == "exact"]["accuracy"].min() > 0.6  # chance ≈ 0.3


def test_cli_train_predict_evaluate(zheng, tmp_path):
    out = tmp_path / "ann"
    result = runner.invoke(app, ["annotate", "train", str(zheng), "--label-key", "cell_type", "--ontology-key", "cell_type_ontology_term_id",
                                 "--loss", "hce", "--n-splits", "3", "--max-epochs", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "linear + hce: test cells" in result.output  # the default method is named (it said "None")
    # the full-batch model ignores the epochs; the saved one is fitted again on every cell once its call threshold is set, and each fold's
    # model on the fold's training and validation cells, so the fold metrics describe how the saved model was made
    assert result.output.count("max_epochs does not apply") == 1 and "refitted on all 2140 cells" in result.output  # said once, not per fold
    tested = [len(pd.read_parquet(out / f"splits_{k}" / "detailed_results.parquet")) for k in (1, 2, 3)]
    assert re.findall(r"split (\d): refitted on its (\d+) training and validation cells", result.output) == [(str(k), str(2140 - n))
                                                                                                          for k, n in enumerate(tested, 1)]
    annotator = Annotator.load(out / "model")
    assert annotator.labels.ontology_version.startswith("CL v")
    used = yaml.safe_load((out / "model" / "annotator.yaml").read_text())["training"]
    assert (used["batch_size"], used["max_epochs"]) == (64, 8)  # a thousand cells: 64 per minibatch; the epochs the user set
    assert "batch_size" not in yaml.safe_load((out / "config.yaml").read_text())["training"]  # decided per fit, not a setting
    # query = the reference with a third of its genes dropped and shuffled columns
    adata = ad.read_h5ad(zheng)
    keep = np.random.default_rng(0).permutation(adata.n_vars)[: int(adata.n_vars * 0.66)]
    query = adata[:, keep].copy()
    query.write_h5ad(tmp_path / "q.h5ad")
    pred = tmp_path / "pred.h5ad"
    result = runner.invoke(app, ["annotate", "predict", str(out), str(tmp_path / "q.h5ad"), "--out", str(pred)])
    assert result.exit_code == 0, result.output
    assert "genes found" in result.output and "missing ones set to their reference means" in result.output  # a linear model
    p = ad.read_h5ad(pred)
    key = "cell_type_ontology_term_id"
    assert {f"{key}_pred", f"{key}_pred_label", f"{key}_pred_score"} <= set(p.obs.columns)
    assert p.obsm[f"{key}_proba"].shape == (p.n_obs, 9)
    assert (p.obs[f"{key}_pred"].astype(str) == p.obs[key].astype(str)).mean() > 0.7
    # streamed: the same calls, 97 cells at a time from the file, in a results-only file
    result = runner.invoke(app, ["annotate", "predict", str(out), str(tmp_path / "q.h5ad"), "--out", str(tmp_path / "s.h5ad"), "--stream", "--chunk-size", "97"])
    assert result.exit_code == 0, result.output
    assert "chunk_size does not apply" not in result.output
    loaded = runner.invoke(app, ["annotate", "predict", str(out), str(tmp_path / "q.h5ad"), "--out", str(tmp_path / "l.h5ad"), "--chunk-size", "97"])
    assert loaded.exit_code == 0 and "chunk_size does not apply (the query was loaded whole; --stream maps it chunk by chunk)" in loaded.output
    streamed = ad.read_h5ad(tmp_path / "s.h5ad")
    assert streamed.X is None and list(streamed.var_names) == list(p.var_names)
    pd.testing.assert_frame_equal(streamed.obs, p.obs)
    np.testing.assert_allclose(streamed.obsm[f"{key}_proba"], p.obsm[f"{key}_proba"], atol=1e-6)  # other minibatch sizes: float rounding
    result = runner.invoke(app, ["annotate", "evaluate", str(pred), "--truth-key", key, "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    full = pd.read_csv(tmp_path / "eval" / "overall_metrics.csv").set_index("evaluation")
    # cells without a true label or without a call are left out and counted, not scored as a label 'nan'
    p.obs[key] = p.obs[key].astype(object)
    p.obs.iloc[:4, p.obs.columns.get_loc(key)] = np.nan
    p.obs[f"{key}_pred"] = p.obs[f"{key}_pred"].astype(object)
    p.obs.iloc[4:6, p.obs.columns.get_loc(f"{key}_pred")] = np.nan
    p.write_h5ad(tmp_path / "partial.h5ad")
    result = runner.invoke(app, ["annotate", "evaluate", str(tmp_path / "partial.h5ad"), "--truth-key", key, "--out", str(tmp_path / "eval_partial")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"4 of {p.n_obs} cells have no true label in obs column '{key}': left out of the evaluation" in said
    assert f"2 of {p.n_obs} cells have no call in obs column '{key}_pred'" in said
    partial = pd.read_csv(tmp_path / "eval_partial" / "overall_metrics.csv").set_index("evaluation")
    assert partial.loc["exact", "n_cells"] == full.loc["exact", "n_cells"] - 6
    assert "nan" not in set(pd.read_csv(tmp_path / "eval_partial" / "per_class_metrics.csv")["label"].astype(str))
    # too few shared genes: a clear error, no output
    result = runner.invoke(app, ["annotate", "predict", str(out), str(tmp_path / "q.h5ad"), "--out", str(tmp_path / "p2.h5ad"), "--min-overlap", "0.9"])
    assert result.exit_code == 2 and "below the minimum 90%" in result.output and not (tmp_path / "p2.h5ad").exists()


def test_models_saved_before_the_full_batch_linear_load_as_they_were_trained(zheng, tmp_path):
    """The ``model`` entry of an ``annotator.yaml`` written before ``output`` / ``solver`` existed (7dd1611): softmax, and Adam for the linear model."""
    import shutil

    from scatlas.models.base import parse_model_config

    old_linear = {"type": "linear", "name": None, "training": {"lr": 0.005, "weight_decay": 0.01}, "loss": "ce", "class_weighted": True, "ensemble": 1}
    assert (parse_model_config(old_linear).solver, parse_model_config(old_linear).output) == ("adam", "softmax")
    out = tmp_path / "new"
    result = runner.invoke(app, ["annotate", "train", str(zheng), "--label-key", "cell_type", "--model", "mlp", "--n-splits", "0", "--max-epochs", "1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    shutil.copytree(out / "model", tmp_path / "old")
    meta = yaml.safe_load((tmp_path / "old" / "annotator.yaml").read_text())
    meta["model"] = {"type": "mlp", "name": None, "training": {"lr": 0.001, "weight_decay": 0.05}, "loss": "ce", "class_weighted": True, "ensemble": 1,
                     "hidden": [256, 128], "dropout": 0.3}  # as 7dd1611 wrote it
    (tmp_path / "old" / "annotator.yaml").write_text(yaml.safe_dump(meta))
    for name in ("new", "old"):
        model = out / "model" if name == "new" else tmp_path / "old"
        result = runner.invoke(app, ["annotate", "predict", str(model), str(zheng), "--out", str(tmp_path / f"{name}.h5ad")])
        assert result.exit_code == 0, result.output
    new, old = (ad.read_h5ad(tmp_path / f"{name}.h5ad") for name in ("new", "old"))
    np.testing.assert_array_equal(old.obsm["cell_type_proba"], new.obsm["cell_type_proba"])


def test_training_scales_with_the_reference_size():
    """64-cell minibatches and 100 epochs up to 65,536 cells; above, epochs of at most 1,024 steps and about 5M cells seen; what the user set stays."""
    sizes = {n: scaled_training(TrainingConfig(), n) for n in (770, 65_536, 100_000, 700_000, 5_000_000)}
    assert {n: (t.batch_size, t.max_epochs) for n, (t, _) in sizes.items()} == {
        770: (64, 100), 65_536: (64, 100), 100_000: (128, 50), 700_000: (1024, 8), 5_000_000: (4096, 2)}
    assert sizes[770][1] is None and "minibatches of 1,024, at most 8 epochs" in sizes[700_000][1]
    mine, said = scaled_training(TrainingConfig(batch_size=32, max_epochs=3), 5_000_000)
    assert (mine.batch_size, mine.max_epochs, said) == (32, 3, None)


def test_cli_train_stream_gives_the_loaded_models(zheng, tmp_path):
    """`annotate train --stream` trains every fold and the final model from the file (X never loaded): the same metrics and calls."""
    args = ["annotate", "train", str(zheng), "--label-key", "cell_type", "--ontology-key", "cell_type_ontology_term_id", "--model", "mlp",
            "--loss", "hce", "--n-splits", "3", "--max-epochs", "3", "--n-top-genes", "1000"]
    for name, extra in (("loaded", []), ("streamed", ["--stream"])):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(*(pd.read_csv(tmp_path / name / "fold_metrics.csv") for name in ("loaded", "streamed")))
    calls = []
    for name in ("loaded", "streamed"):
        query = ad.read_h5ad(zheng)
        annotate(query, tmp_path / name / "model", log=lambda _: None)
        calls.append(query.obs)
    pd.testing.assert_frame_equal(*calls)


def test_hce_requires_ontology(zheng, tmp_path):
    result = runner.invoke(app, ["annotate", "train", str(zheng), "--label-key", "cell_type", "--loss", "hce", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "needs --ontology-key" in result.output


@pytest.mark.parametrize("fn", [sparsemax, entmax15])
def test_mask_gradients_match_finite_differences(fn):
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t), (x,), eps=1e-6, atol=1e-5)
    big = torch.tensor([[50.0, -50.0, 0.0, 1e-3]], requires_grad=True)  # saturated rows stay finite
    fn(big)[0, 0].backward()
    assert torch.isfinite(big.grad).all()


def test_label_map_to_cell_ontology(symphony_path, tmp_path):
    """Author labels mapped to CL ids with a user table, then trained with HCE."""
    table = tmp_path / "map.csv"
    pd.DataFrame({"author": ["B", "DC", "HSC", "MK", "Mono_CD14", "Mono_CD16", "NK", "T_CD4", "T_CD8"],
                  "cl": ["CL:0000236", "CL:0000451", "CL:0000037", "CL:0000556", "CL:0001054", "CL:0002396", "CL:0000623", "CL:0000624", "CL:0000625"]}).to_csv(table, index=False)
    result = runner.invoke(app, ["annotate", "train", str(symphony_path), "--label-key", "author_cell_type", "--label-map", str(table), "--loss", "hce",
                                 "--model", "linear", "--n-splits", "3", "--max-epochs", "5", "--no-final", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    detail = pd.read_parquet(tmp_path / "out" / "detailed_results.parquet")
    assert detail["y_true"].str.startswith("CL:").all() and "correct_hierarchical" in detail
    table.write_text("author,cl\nB,CL:0000236\n")
    result = runner.invoke(app, ["annotate", "train", str(symphony_path), "--label-key", "author_cell_type", "--label-map", str(table), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "no Cell Ontology id for labels" in result.output


def test_a_class_labelled_exactly_by_one_source_stays_a_finest_call():
    # classes 0 CD14 monocyte, 1 CD16 monocyte (a CL descendant of 0); the fine source labels both, the coarse one only 0
    R = np.array([[1, 1], [0, 1]], dtype=np.float32)
    codes, sources = np.array([0, 1, 0]), np.array([0, 0, 1])
    per = source_reachability(R, codes, sources)
    assert per[1, 0, 1] == 1 and per[0, 0, 1] == 0
    assert list(fine_classes(R, codes, sources)) == [True, True]


def test_hierarchical_calls_hand_computed():
    from scatlas.ontology import choose_call_threshold, hierarchical_calls

    R = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 1]], dtype=float)  # 0 monocyte above siblings 1 CD14 and 2 CD16
    depth = np.array([5.0, 6.0, 6.0])
    proba = np.array([[0.05, 0.5, 0.45], [0.0, 0.9, 0.1]])
    assert list(hierarchical_calls(proba, R, depth, 0.8)) == [0, 1]  # unsure cell: "monocyte"; sure cell: CD14
    assert list(hierarchical_calls(proba, R, depth, 0.4)) == [1, 1]
    assert list(hierarchical_calls(np.array([[0.3, 0.3, 0.4]]), R, depth, 1.01)) == [0]  # nothing reaches: the broadest class
    assert choose_call_threshold(proba, np.array([1, 1]), R, depth) == 0.5
    assert choose_call_threshold(proba, np.array([2, 1]), R, depth) == 0.51  # the unsure cell must fall back to its parent
    # a coarsely labelled cell ("monocyte", satisfied by CD14 and CD16): its finer call is right, nothing pushes the threshold up
    coarse = np.array([[True, True, True], [False, True, False]])
    assert choose_call_threshold(np.array([[0.05, 0.9, 0.05], [0.0, 0.9, 0.1]]), np.array([0, 1]), R, depth, precision=1.0) == 0.91  # just above the finer call's 0.9
    assert choose_call_threshold(np.array([[0.05, 0.9, 0.05], [0.0, 0.9, 0.1]]), np.array([0, 1]), R, depth, precision=1.0, satisfies=coarse) == 0.5


def test_calls_may_back_off_to_an_ancestor_two_labels_share(ontology):
    """Flat labels (naive and cytotoxic CD8 T cells, B cells): an unsure CD8 cell is called "CD8-positive, alpha-beta T cell", a term no one labelled."""
    from scatlas.ontology import call_terms, choose_call_threshold, hierarchical_calls

    labels = ["CL:0000236", "CL:0000794", "CL:0000900"]
    terms, reach, depth = call_terms(labels, ontology)
    assert terms[:3] == labels and np.array_equal(reach[:3], reachability(labels, ontology))
    rows = dict(zip(terms, reach.astype(int).tolist(), strict=True))
    assert rows["CL:0000625"] == [0, 1, 1] and rows["CL:0000084"] == [0, 1, 1] and rows["CL:0000542"] == [1, 1, 1]  # CD8 ab T, T cell, lymphocyte
    assert (reach[3:].sum(1) >= 2).all() and all(t.startswith("CL:") for t in terms)  # only ancestors shared by two labels or more
    assert all(depth[i] == len(ontology.ancestors(t)) for i, t in enumerate(terms))
    proba = np.array([[0.05, 0.5, 0.45], [0.02, 0.96, 0.02]])
    assert [terms[i] for i in hierarchical_calls(proba, reach, depth, 0.9)] == ["CL:0000625", "CL:0000794"]
    # the unsure cell is naive: its finest call (cytotoxic) is wrong, the back-off is right, so 0.9 reaches full precision
    assert choose_call_threshold(proba, np.array([2, 1]), reach, depth, precision=1.0) == 0.51


def test_calibration_scores_a_coarse_label_by_the_classes_that_satisfy_it():
    from scatlas.metrics import expected_calibration_error, fit_temperature

    logits = np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    y = np.array([1, 2, 0])
    one_hot = np.eye(3, dtype=bool)[y]
    assert fit_temperature(logits, one_hot) == pytest.approx(fit_temperature(logits, y), rel=1e-6)  # exact labels: plain NLL
    assert expected_calibration_error(softmax(logits), one_hot) == expected_calibration_error(softmax(logits), y)
    # cell 0 labelled "monocyte" (class 0), satisfied by its finer class 1 too: its top class is right
    coarse = one_hot.copy()
    coarse[0] = [True, True, False]
    p = softmax(logits)
    assert expected_calibration_error(p, coarse) == pytest.approx(np.mean(1 - p.max(1)), abs=1e-12)  # all right: |1 − confidence| per bin
    # the likelihood of the coarse label is p0 + p1, so the fitted temperature sharpens (every cell is right)
    assert fit_temperature(logits, coarse) < fit_temperature(logits, y)


def test_transfer_makes_hierarchical_calls_at_the_stated_precision(symphony_path):
    import scatlas as sa

    adata = ad.read_h5ad(symphony_path)
    reference, query = adata[adata.obs["batch"] != "3pv1"].copy(), adata[adata.obs["batch"] == "3pv1"].copy()
    model = sa.tl.transfer(reference, query, label_key="cell_type", ontology_key="cell_type_ontology_term_id", loss="hce", log=lambda _: None,
                           training={"max_epochs": 20, "batch_size": 64})
    labels = model.annotator.labels
    assert 0.5 <= labels.call_threshold <= 0.99
    calls = query.obs["cell_type_ontology_term_id_pred_hierarchical"].astype(str).to_numpy()
    truth = labels.codes(query.obs["cell_type_ontology_term_id"].astype(str).to_numpy())
    correct = labels.calls_right(calls, truth)
    exact = (query.obs["cell_type_ontology_term_id_pred"].astype(str) == query.obs["cell_type_ontology_term_id"].astype(str)).mean()
    assert correct.mean() >= exact  # backing off to an ancestor never loses a right call


def test_transfer_calibrates_a_coarser_source_by_the_classes_that_satisfy_its_labels(symphony_path, ontology):
    import scatlas as sa

    adata = ad.read_h5ad(symphony_path)
    reference, query = adata[adata.obs["batch"] != "3pv1"].copy(), adata[adata.obs["batch"] == "3pv1"].copy()
    ids = reference.obs["cell_type_ontology_term_id"].astype(str).to_numpy().copy()
    fine = set(ids)
    coarse = np.random.default_rng(0).random(len(ids)) < 0.5  # half the reference from a study that labels one level up
    ids[coarse] = [max((a for a in ontology.ancestors(t) if a not in fine), key=lambda a: len(ontology.ancestors(a))) for t in ids[coarse]]
    reference.obs["cell_type_ontology_term_id"] = ids
    reference.obs["cell_type"] = [ontology.label(t) for t in ids]
    reference.obs["study"] = np.where(coarse, "coarse", "fine")
    model = sa.tl.transfer(reference, query, label_key="cell_type", ontology_key="cell_type_ontology_term_id", loss="hce", dataset_key="study",
                           log=lambda _: None, training={"max_epochs": 20, "batch_size": 64})
    # a finer call on a coarsely labelled calibration cell is right: the calls stay fine, the temperature near 1
    assert model.annotator.labels.call_threshold < 0.99 and model.temperature < 1.5
    calls = query.obs["cell_type_ontology_term_id_pred_hierarchical"].astype(str)
    assert (calls == query.obs["cell_type_ontology_term_id"].astype(str)).mean() > 0.7


def test_a_source_relabelled_one_level_up_is_named(ontology):
    # the CL parent of a CD16 monocyte is "CD14-positive monocyte", whose parent is "monocyte": a source relabelled one level up uses both
    values = np.array(["CL:0000576", "CL:0001054", "CL:0001054", "CL:0002396"])
    lines: list[str] = []
    labels = label_space(values, None, ontology, sources=np.array(["coarse", "coarse", "fine", "fine"]), log=lines.append)
    # "monocyte, not CD14-positive" is a class of its own there, as the rule says, but no source separates it from the CD16
    # monocytes below it, so it is never a finest-class call
    monocyte = labels.classes.index("CL:0000576")
    assert labels.per_source[0, monocyte].sum() == 1 and not labels.fine[monocyte] and labels.fine.sum() == 2
    assert labels.finest(np.array([[0.5, 0.3, 0.2]])).tolist() == [labels.classes.index("CL:0001054")]
    assert len(lines) == 2 and "[coarse] 'monocyte' is learnt as a class of its own" in lines[1] and "never a finest-class call" in lines[1]
    lines.clear()
    label_space(values, None, ontology, sources=np.array(["coarse", "fine", "fine", "fine"]), log=lines.append)
    assert not any("class of its own" in line for line in lines)
    label_space(values, None, None, where="ref: ", sources=np.array(["coarse", "fine", "fine", "fine"]), log=lines.append)  # no ontology: sources unused
    assert lines[-1].startswith("ref: flat labels (no ontology key): the sources of the dataset key are not used")
    labels = label_space(np.array(["B cell", "B cell ", "b  cell", "T cell"]), None, None, where="ref: ", log=lines.append)  # likely one type: said, kept
    assert len(labels.classes) == 4 and lines[-1] == ("ref: labels that differ only in spaces or case are kept apart as classes: 'B cell' / 'B cell ' / "
                                                      "'b  cell' (give each type one spelling if they are one)")
