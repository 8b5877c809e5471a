"""`scatlas run`, `demo` and `validate` as a user runs them: layout, scores, resume, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import silhouette_score
from typer.testing import CliRunner

from scatlas.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _config(tmp_path: Path, data: Path, **overrides) -> Path:
    cfg = yaml.safe_load((REPO / "examples" / "cellbench_5cl.yaml").read_text())
    cfg["dataset"]["path"] = str(data)
    cfg["training"].update(max_epochs=12, patience=5)
    cfg["output"]["dir"] = str(tmp_path / "out")
    for key, value in overrides.items():
        cfg[key] = value
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cellbench5_path):
    tmp = tmp_path_factory.mktemp("run")
    cfg = _config(tmp, cellbench5_path)
    result = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp / "out" / "cellbench_5cl_outputs", cfg, result.output


def test_layout_written(finished_run):
    root, _, output = finished_run
    assert "ASW label" in output
    for model in ("PCA", "AE", "AEC"):
        run = root / "latent_space" / "kfold" / model / "run1"
        latent = "pca" if model == "PCA" else "latent"
        for part in ("train", "val", "test"):
            assert (run / f"all_scores_{part}_samplesize-10000.csv").exists()
            assert (run / f"mean_scores_{part}_samplesize-10000.csv").exists()
            for n in (1, 2, 3):
                split = run / f"splits_{n}"
                obs = pd.read_csv(split / f"obs_{part}.csv")
                assert list(obs.columns) == ["cell_id", "batch", "label"]
                assert np.load(split / f"{latent}_{part}.npy").shape[0] == len(obs)
                assert np.load(split / f"recon_{part}.npy").shape == (len(obs), 2000)
        assert not list(run.glob(".splits_*"))
        figures = root / "figures" / "kfold" / model / "run1"
        assert (figures / "splits_1" / "umap_test.png").exists()
        saved = root / "saved_models" / "kfold" / model / "run1"
        assert (saved / "config.yaml").exists()
        assert not (saved / "splits_1" / "checkpoints").exists()  # a finished split keeps its weights only
        assert (saved / "splits_1" / ("estimator.npz" if model == "PCA" else "module.pt")).exists()
        if model != "PCA":
            assert (run / "history_allfolds.csv").exists() and (figures / "avg_loss.png").exists()
    side_by_side = pd.read_csv(root / "compare_models" / "kfold" / "run1" / "test_allscores.csv")
    assert sorted(side_by_side["model"].unique()) == ["AE", "AEC", "PCA"] and len(side_by_side) == 9
    ci = pd.read_csv(root / "compare_models" / "kfold" / "run1" / "test_scores_10000_95CI.csv")
    assert {"model", "metric", "mean", "ci_low", "ci_high"} <= set(ci.columns)
    assignment = pd.read_csv(root / "saved_models" / "kfold" / "AE" / "run1" / "split_assignment.csv")
    assert len(assignment) == 571 and set(assignment["split_1"]) == {"train", "val", "test"}


def test_scores_equal_sklearn_on_saved_latent(finished_run):
    root, _, _ = finished_run
    for model in ("AE", "AEC", "PCA"):
        run = root / "latent_space" / "kfold" / model / "run1"
        latent = "pca" if model == "PCA" else "latent"
        for n in (1, 2, 3):
            split = run / f"splits_{n}"
            obs = pd.read_csv(split / "obs_test.csv")
            z = np.load(split / f"{latent}_test.npy")
            scores = pd.read_csv(split / "scores_test_samplesize-10000.csv").iloc[0]
            assert scores["silhouette_label"] == pytest.approx(silhouette_score(z, obs["label"]), abs=1e-5)
            assert scores["silhouette_batch"] == pytest.approx(silhouette_score(z, obs["batch"]), abs=1e-5)
        mean = pd.read_csv(run / "mean_scores_test_samplesize-10000.csv").set_index("metric")
        # the five cell lines separate in every latent
        assert mean.loc["silhouette_label", "mean"] > 0.3


def test_resume_skips_finished_and_refuses_overwrite(finished_run):
    root, cfg, _ = finished_run
    result = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert result.exit_code == 2 and "--resume" in result.output
    run = root / "latent_space" / "kfold" / "AE" / "run1"
    kept = (run / "splits_1" / "latent_test.npy").stat().st_mtime_ns
    import shutil

    shutil.rmtree(run / "splits_2")
    result = runner.invoke(app, ["run", str(cfg), "--quiet", "--resume"])
    assert result.exit_code == 0, result.output
    assert "split 1: done earlier, skipped" in result.output
    assert (run / "splits_1" / "latent_test.npy").stat().st_mtime_ns == kept
    assert (run / "splits_2" / "latent_test.npy").exists()
    assert "split 2/3: PCA" not in result.output  # only the model missing split 2 reran


def _bad_file(tmp_path: Path, src: Path, mutate) -> Path:
    adata = ad.read_h5ad(src)
    adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
    mutate(adata)
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    return path


def _nan(a):
    a.X = a.X.toarray()
    a.X[0, 0] = np.nan


def _negative(a):
    a.X.data[:10] = -3


def _one_class(a):
    a.obs["cell_line"] = "H838"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_nan, "NaN or infinite values"),
        (_negative, "negative values"),
        (_one_class, "obs column 'cell_line' has 1 distinct value"),
    ],
)
def test_bad_input_one_line_error_no_run_dir(tmp_path, cellbench5_path, mutate, message):
    data = _bad_file(tmp_path, cellbench5_path, mutate)
    cfg = _config(tmp_path, data)
    result = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0] and "bad.h5ad" in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_key_and_bad_config(tmp_path, cellbench5_path):
    cfg = yaml.safe_load(_config(tmp_path, cellbench5_path).read_text())
    cfg["dataset"]["batch_key"] = "plate"
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "obs column 'plate' not found" in result.output
    cfg["dataset"]["batch_key"] = "batch"
    cfg["models"] = [{"type": "vae"}]
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "unknown model type 'vae'" in result.output and "'aec'" in result.output
    cfg["models"] = [{"type": "ae", "latent_dim": -1}]
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "latent_dim" in result.output
    # the model list's own checks: each a line naming the model and what to change
    unlabelled = {**cfg["dataset"], "label_key": None}
    for models, dataset, said in [([{"type": "pca"}, {"type": "pca"}], cfg["dataset"], "models: names must be unique, repeated: ['PCA'] (set `name:`)"),
                                  ([{"type": "ae", "training": {"max_epoch": 3}}], cfg["dataset"],
                                   "models: AE: training: max_epoch: unknown setting; did you mean 'max_epochs'?"),
                                  ([{"type": "aec"}], unlabelled, "models ['AEC'] need labels: set dataset.label_key"),
                                  ([], cfg["dataset"], "models: give a non-empty list of models (available types: ['ae', 'aec',")]:
        path.write_text(yaml.safe_dump({**cfg, "dataset": dataset, "models": models}))
        result = runner.invoke(app, ["run", str(path)], terminal_width=400)
        assert result.exit_code == 2 and said in result.output, (said, result.output)
    for parts, said in [([], "evaluation.parts: List should have at least 1 item"), (["test", "test"], "['test', 'test']: each part at most once")]:
        path.write_text(yaml.safe_dump({**cfg, "models": [{"type": "pca"}], "evaluation": {"parts": parts}}))  # [] ran, scoring nothing
        result = runner.invoke(app, ["run", str(path)], terminal_width=400)
        assert result.exit_code == 2 and said in result.output, (said, result.output)
    assert not (tmp_path / "out").exists()


def test_what_a_line_quotes_prints_as_it_is(tmp_path):
    """Log lines and errors are not read as Rich markup: '[all]' (a source) survives, '[/x]' in a path neither vanishes nor breaks the error."""
    from conftest import data_path

    kang = str(data_path("kang18_muscat_4samples.h5ad"))
    trained = runner.invoke(app, ["annotate", "train", kang, "--label-key", "cell_type", "--ontology-key", "cell_type_ontology_term_id", "--n-splits", "0",
                                  "--out", str(tmp_path / "ann")], terminal_width=400)
    assert trained.exit_code == 0, trained.output
    assert "labels nest in the Cell Ontology: [all] 'CD14-positive monocyte' excludes 'CD14-low, CD16-positive monocyte'" in trained.output
    odd = tmp_path / "[/x] [bold]cells.h5ad"
    missing = runner.invoke(app, ["validate", str(odd)], terminal_width=400)
    assert missing.exit_code == 2 and f"error: {odd}: file not found" in missing.output


def test_validate_command(cepo_path, cellbench5_path):
    ok = runner.invoke(app, ["validate", str(cellbench5_path), "--batch-key", "batch", "--label-key", "cell_line"])
    assert ok.exit_code == 0 and "OK (909 cells" in ok.output
    bad = runner.invoke(app, ["validate", str(cepo_path), "--batch-key", "batch"])
    assert bad.exit_code == 2 and "non-integer" in bad.output


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "demo", "validate", "models"):
        assert command in result.output
    from scatlas import __version__

    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output == f"scatlas {__version__}\n"  # for bug reports, as other tools' --version


def test_every_help_fits_an_80_column_terminal():
    """No option name is cut short ("--query-label-k…") and no paragraph breaks mid-sentence in 80 columns (piped output, a small window)."""
    import typer

    root = typer.main.get_command(app)
    groups = {name: command for name, command in root.commands.items() if hasattr(command, "commands")}  # annotate
    commands = [([name], command) for name, command in root.commands.items() if name not in groups]
    commands += [([name, sub], command) for name, group in groups.items() for sub, command in group.commands.items()]
    assert len(commands) >= 12
    for args, command in commands:
        shown = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80"}, terminal_width=80).output
        assert "…" not in shown, args
        for parameter in command.params:
            for name in [*parameter.opts, *parameter.secondary_opts]:
                assert not name.startswith("-") or name in shown, (args, name)
        prose = shown.split("╭")[0]  # the command's description, above its tables
        assert not any(line.rstrip().endswith((" after a", " name +")) for line in prose.splitlines()), (args, prose)
    negative = runner.invoke(app, ["embed", "data.h5ad", "--out", "out", "--checkpoint-interval", "-1"])  # refused as a range would be
    assert negative.exit_code == 2 and "is negative" in negative.output


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_every_example_config_is_valid(example, monkeypatch):
    """Each shipped example parses, its dataset passes validation and its splits can be made."""
    from scatlas.data.dataset import load_dataset
    from scatlas.experiment import load_config
    from scatlas.data.splits import make_splits

    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "examples" / example)
    data = load_dataset(cfg.dataset, extra_keys=(cfg.group_key,) if cfg.split.kind != "kfold" else ())
    splits = make_splits(cfg.split, cfg.group_key, data)
    assert len(splits) >= 2 and all(len(s.train) and len(s.test) for s in splits)


def render_in_chromium(page: Path) -> tuple[str, str]:
    """DOM and console output of ``page`` loaded by headless Chromium (fails when Chromium is missing)."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0", f"--user-data-dir={page.parent / '.chromium'}"]
    done = subprocess.run([browser, *flags, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


def test_run_report_renders_in_chromium(finished_run):
    root, _, _ = finished_run
    page = root / "compare_models" / "kfold" / "run1" / "report.html"
    dom, console_log = render_in_chromium(page)
    assert "Test cells: mean ± 95% CI half-width over folds" in dom and "<table" in dom
    assert "ASW label (raw) ↑" in dom and "k-means ARI ↑" in dom and "↑ higher is better" in dom  # readable names, direction
    headline = dom.split("<tbody>")[1].split("</tbody>")[0]
    assert headline.split("<td>")[1].startswith("PCA") and " ± " in headline  # the reference first, mean ± CI
    assert dom.count("data:image/png;base64") >= 3
    assert "Uncaught" not in console_log
    sections = re.findall(r"<section>(.*?)</section>", dom, flags=re.S)
    assert sections and all(re.search(r"<table|<img|<p", body) for body in sections)  # no empty sections


def test_report_leaves_out_empty_sections_and_explains_empty_columns(tmp_path):
    from scatlas.report import Section, write_report

    table = pd.DataFrame({"model": ["PCA", "AE"], "kmeans_ari": [0.5, 0.7], "silhouette_batch_scib": [np.nan, np.nan]})
    page = write_report(tmp_path / "r.html", "t", [Section("Scores", [table], nan_reasons={"silhouette_batch_scib": "one batch only"}),
                                                  Section("Figures", [], [tmp_path / "absent.png"])])
    text = page.read_text()
    assert "Figures" not in text and "ASW batch (scib, 1 = mixed) ↑: one batch only." in text


def test_compare_command_over_run_outputs(finished_run):
    root, _, _ = finished_run
    result = runner.invoke(app, ["compare", str(root.parent)])
    assert result.exit_code == 0, result.output
    out = root / "compare_models" / "kfold" / "run1"
    for name in ("test_allscores.csv", "test_scores_10000_95CI.csv", "test_10000.csv", "test_scores_10000_min_silhouette_batch.csv",
                 "test_scores_10000_max_silhouette_batch.csv", "umap_models.png", "umap_coordinates.csv", "report.html"):
        assert (out / name).exists(), name
    wide = pd.read_csv(out / "test_10000.csv")
    assert {"model", "metric", "mean", "sem", "sd"} <= set(wide.columns)
    lowest = pd.read_csv(out / "test_scores_10000_min_silhouette_batch.csv").set_index("model")
    allscores = pd.read_csv(out / "test_allscores.csv")
    assert lowest.loc["AE", "silhouette_batch"] == allscores[allscores["model"] == "AE"]["silhouette_batch"].min()
    coords = pd.read_csv(out / "umap_coordinates.csv")
    assert set(coords["model"]) == {"PCA", "AE", "AEC"} and {"umap1", "umap2", "label", "batch"} <= set(coords.columns)
    empty = runner.invoke(app, ["compare", str(root.parent / "nothing")])
    assert empty.exit_code == 2 and "no scatlas run outputs" in empty.output
    from scatlas.experiment.compare import discover

    assert root.name.endswith("_outputs") and discover(root) == discover(root.parent)  # given one dataset's folder: its runs (it was refused)


def test_run_under_torchrun_two_cpu_ranks(tmp_path, cellbench5_path):
    """`torchrun --nproc_per_node 2 -m scatlas run` (DDP, gloo): both ranks train, rank 0 alone writes whole outputs."""
    import os
    import subprocess
    import sys

    cfg = yaml.safe_load(_config(tmp_path, cellbench5_path).read_text())
    cfg["preprocess"]["n_top_genes"] = 300
    cfg["training"].update(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp")
    cfg["models"] = [{"type": "ae", "latent_dim": 10}]
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scatlas", "run", str(path), "--quiet"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "out" / "cellbench_5cl_outputs" / "latent_space" / "kfold" / "AE" / "run1"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["splits_1", "splits_2", "splits_3"]  # no staging left behind
    assert not list(run.glob(".*"))
    for split in ("splits_1", "splits_2", "splits_3"):
        obs = pd.read_csv(run / split / "obs_test.csv")
        assert np.load(run / split / "latent_test.npy").shape == (len(obs), 10)  # every test cell, not one rank's share
        history = pd.read_csv(run / split / "history.csv")
        assert len(history) == 2
    assert (run / "mean_scores_test_samplesize-10000.csv").exists()


def test_run_streams_the_dataset_from_disk(tmp_path, cellbench5_path):
    """`dataset.stream: true`: every split trains and is scored from the file, X never loaded; the latents equal the loaded run's."""
    cfg = yaml.safe_load(_config(tmp_path, cellbench5_path).read_text())
    cfg["preprocess"].update(n_top_genes=300, scale="maxabs")
    cfg["training"].update(max_epochs=2)
    cfg["models"] = [{"type": "ae", "latent_dim": 10}]
    for name, stream in (("loaded", False), ("streamed", True)):
        cfg["dataset"]["stream"] = stream
        cfg["output"]["dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = runner.invoke(app, ["run", str(path), "--quiet"])
        assert result.exit_code == 0, result.output
    runs = [tmp_path / name / "cellbench_5cl_outputs" / "latent_space" / "kfold" / "AE" / "run1" for name in ("loaded", "streamed")]
    for split in ("splits_1", "splits_2", "splits_3"):
        np.testing.assert_allclose(*(np.load(run / split / "latent_test.npy") for run in runs), rtol=1e-5, atol=1e-6)
    cfg["models"] = [{"type": "pca", "n_components": 5}]  # an in-memory model: one line saying so, exit 2
    cfg["output"]["dir"] = str(tmp_path / "pca")
    (tmp_path / "pca.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["run", str(tmp_path / "pca.yaml"), "--quiet"])
    assert result.exit_code == 2 and "needs the matrix in memory" in result.output
