"""Bad input through every CLI command: exit 2, one line naming the file / column / value, nothing written.

Each case builds its bad file from real shared data (mESC cells of scMerge, Kang18 PBMCs), then
checks the exit code, that the output is exactly one ``error:`` line holding the expected words,
and that nothing under the working directory was created or changed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from typer.testing import CliRunner

import scatlas as sa
from scatlas import InputError
from scatlas.cli import app
from scatlas.data import normalize_log1p

runner = CliRunner()
Mutate = Callable[[ad.AnnData], ad.AnnData]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def refused(workdir: Path, args: list[str], *words: str) -> None:
    """``scatlas ARGS`` exits 2 with one ``error:`` line containing ``words`` and leaves ``workdir`` unchanged."""
    before = _snapshot(workdir)
    result = runner.invoke(app, args)
    lines = _lines(result.output)
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert _snapshot(workdir) == before


def _dense(a: ad.AnnData) -> ad.AnnData:
    a.X = a.X.toarray()
    return a


def _set(a: ad.AnnData, value: float) -> ad.AnnData:
    a = _dense(a)
    a.X[3, 5] = value
    return a


def _zero_matrix(a: ad.AnnData) -> ad.AnnData:
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)
    return a


def _repeat(a: ad.AnnData, axis: str) -> ad.AnnData:
    names = (a.obs_names if axis == "obs" else a.var_names).to_numpy().copy()
    names[1] = names[0]
    if axis == "obs":
        a.obs_names = names
    else:
        a.var_names = names
    return a


def _one_cell_batch(a: ad.AnnData) -> ad.AnnData:
    a.obs["batch"] = a.obs["batch"].astype(str)
    a.obs.iloc[0, a.obs.columns.get_loc("batch")] = "lonely"
    return a


def _missing_batch(a: ad.AnnData) -> ad.AnnData:
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[:3, a.obs.columns.get_loc("batch")] = None
    return a


def _one_class(a: ad.AnnData) -> ad.AnnData:
    a.obs["cellTypes"] = "2i"
    return a


MESC: dict[str, Mutate] = {
    "nan": lambda a: _set(a, np.nan),
    "negative": lambda a: _set(a, -2.0),
    "fraction": lambda a: _set(a, 0.5),
    "zeros": _zero_matrix,
    "no_cells": lambda a: a[:0].copy(),
    "dup_cells": lambda a: _repeat(a, "obs"),
    "dup_genes": lambda a: _repeat(a, "var"),
    "one_cell_batch": _one_cell_batch,
    "missing_batch": _missing_batch,
    "one_class": _one_class,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real mESC cells (scMerge, 2 batches) with one defect each; plus a good copy and a corrupt file."""
    from conftest import data_path

    root = tmp_path_factory.mktemp("bad_files")
    good = ad.read_h5ad(data_path("scmerge_mesc_2batches.h5ad"))
    paths = {"good": root / "good.h5ad"}
    good.write_h5ad(paths["good"])
    for name, mutate in MESC.items():
        paths[name] = root / f"{name}.h5ad"
        mutate(good.copy()).write_h5ad(paths[name])
    paths["corrupt"] = root / "corrupt.h5ad"
    paths["corrupt"].write_bytes(b"this is not HDF5")
    kang = ad.read_h5ad(data_path("kang18_muscat_4samples.h5ad"))
    paths["kang"] = root / "kang.h5ad"
    kang.write_h5ad(paths["kang"])
    renamed = kang.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    paths["kang_ensembl"] = root / "kang_ensembl.h5ad"
    renamed.write_h5ad(paths["kang_ensembl"])
    paths["kang_nan"] = root / "kang_nan.h5ad"
    _set(kang.copy(), np.inf).write_h5ad(paths["kang_nan"])
    names_vs_ids = ad.AnnData(obs=pd.DataFrame({"cell_type": kang.obs["cell_type"].astype(str).to_numpy(),
                                                "cell_type_ontology_term_id_pred": kang.obs["cell_type_ontology_term_id"].astype(str).to_numpy()},
                                               index=kang.obs_names))
    paths["names_vs_ids"] = root / "names_vs_ids.h5ad"
    names_vs_ids.write_h5ad(paths["names_vs_ids"])
    cellxgene_like = kang.copy()  # log-normalised values in X, the counts in .raw
    cellxgene_like.raw = kang.copy()
    cellxgene_like.X = cellxgene_like.X.log1p()
    paths["kang_raw"] = root / "kang_raw.h5ad"
    cellxgene_like.write_h5ad(paths["kang_raw"])
    embedded = kang.copy()
    embedded.obsm["X_pca"] = np.random.default_rng(0).normal(size=(kang.n_obs, 10)).astype(np.float32)
    embedded.obsm["X_diverged"] = embedded.obsm["X_pca"].copy()  # e.g. a model whose training diverged
    embedded.obsm["X_diverged"][[3, 8], 1] = np.nan
    paths["kang_embedded"] = root / "kang_embedded.h5ad"
    embedded.write_h5ad(paths["kang_embedded"])
    return paths


@pytest.fixture()
def work(tmp_path: Path, monkeypatch) -> Path:
    """An empty working directory (the commands' outputs go under it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_config(work: Path, data: Path | str, **dataset: object) -> Path:
    config = {
        "dataset": {"name": "mesc", "path": str(data), "batch_key": "batch", "label_key": "cellTypes", **dataset},
        "split": {"kind": "kfold", "n_splits": 3},
        "training": {"max_epochs": 2},
        "models": [{"type": "pca", "n_components": 10}],
        "output": {"dir": str(work / "out")},
    }
    path = work / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


RUN_CASES = [
    ("nan", "NaN or infinite values", {}),
    ("negative", "negative values", {}),
    ("fraction", "non-integer values", {}),
    ("zeros", "holds no non-zero value", {}),
    ("no_cells", "the matrix is empty (0 cells", {}),
    ("dup_cells", "1 cell names repeat", {}),
    ("dup_genes", "1 gene names repeat", {}),
    ("one_cell_batch", "'lonely' (1 cells)", {}),
    ("missing_batch", "obs column 'batch' has 3 missing values", {}),
    ("one_class", "obs column 'cellTypes' has 1 distinct value", {}),
    ("corrupt", "cannot be read as AnnData", {}),
    ("good", "obs column 'donor' not found", {"batch_key": "donor"}),
    ("good", "layer 'counts' not found", {"layer": "counts"}),
    ("good", "values ['9i'] do not occur", {"filter": {"cellTypes": ["9i"]}}),
]


@pytest.mark.parametrize(("name", "message", "dataset"), RUN_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RUN_CASES)])
def test_run_refuses_bad_data(files, work, name, message, dataset):
    refused(work, ["run", str(_run_config(work, files[name], **dataset)), "--quiet"], message, files[name].name)


def test_run_refuses_bad_paths_and_configs(files, work):
    refused(work, ["run", str(work / "absent.yaml")], "absent.yaml")
    (work / "broken.yaml").write_text("dataset: [unclosed\n")
    refused(work, ["run", str(work / "broken.yaml")], "broken.yaml")
    config = _run_config(work, files["good"])
    cfg = yaml.safe_load(config.read_text())
    for models, word in (([{"type": "vae"}], "unknown model type 'vae'"), ([{"type": "ae", "latent_dim": -1}], "latent_dim")):
        config.write_text(yaml.safe_dump({**cfg, "models": models}))
        refused(work, ["run", str(config)], word)
    # a misspelt setting names the one meant, at every level of the file
    config.write_text(yaml.safe_dump({**cfg, "models": [{"type": "ae", "latent": 5}], "training": {"max_epoch": 3},
                                      "dataset": {**cfg["dataset"], "label_ky": "x"}}))
    refused(work, ["run", str(config)], "dataset.label_ky: unknown setting; did you mean 'label_key'?; training.max_epoch: unknown setting; did you mean "
                                        "'max_epochs'?; models: invalid entry for 'ae': latent: unknown setting; did you mean 'latent_dim'?")
    config.write_text(yaml.safe_dump({**cfg, "split": {"xyz": 1}}))
    refused(work, ["run", str(config)], "split.xyz: unknown setting; known: kind, n_splits, group_key, val_fraction, seed")
    refused(work, ["run", str(_run_config(work, work / "absent.h5ad"))], "absent.h5ad: file not found")
    (work / "cells.txt").write_text("x")
    refused(work, ["run", str(_run_config(work, work / "cells.txt"))], "expected an .h5ad file")
    refused(work, ["demo", "--epochs", "0", "-o", "demo"], "--epochs: 0; train at least one epoch")  # was a pydantic traceback, the data written
    (work / "folder.h5ad").mkdir()  # h5py's refusal ran over three lines
    refused(work, ["validate", str(work / "folder.h5ad")], "folder.h5ad: is a directory, not an .h5ad file")


def test_run_refuses_unwritable_outputs(files, work, monkeypatch):
    config = _run_config(work, files["good"])
    (work / "out").write_text("a file where the output directory should be")
    refused(work, ["run", str(config), "--quiet"], "is a file")
    refused(work, ["run", str(config), "--quiet", "-o", str(work / "out" / "below")], "cannot be created", "is a file")
    (work / "out").unlink()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == work else real_access(path, mode))
    refused(work, ["run", str(config), "--quiet"], "no permission to write in", str(work))


def test_validate_runs_the_same_checks(files, work):
    for name, word in (("zeros", "holds no non-zero value"), ("dup_genes", "gene names repeat"), ("no_cells", "is empty"), ("nan", "NaN")):
        refused(work, ["validate", str(files[name])], word, files[name].name)
    refused(work, ["validate", str(files["good"]), "--label-key", "cell_type"], "obs column 'cell_type' not found")
    refused(work, ["validate", str(_run_config(work, files["one_cell_batch"]))], "(1 cells)")


def test_validate_reports_empty_cells_genes_and_one_batch(files, work):
    a = ad.read_h5ad(files["good"])
    a.X = a.X.toarray()
    a.X[:4] = 0
    a.X[:, :7] = 0
    a.obs["one"] = "b1"
    a.obs["label"] = pd.Series(np.where(np.arange(a.n_obs) % 2, "x", "y"), index=a.obs_names).mask(np.arange(a.n_obs) >= a.n_obs - 3)
    a.write_h5ad(work / "sparse_holes.h5ad")
    result = runner.invoke(app, ["validate", str(work / "sparse_holes.h5ad"), "--batch-key", "one", "--label-key", "label"])
    assert result.exit_code == 0, result.output
    assert "4 all-zero cells and 7 all-zero genes (of 197 cells × 1047 genes) are left out of training" in result.output  # of the labelled cells
    assert "holds one batch ('b1')" in result.output
    # cells without a label: what annotate / transfer would do with them, and who refuses them
    assert ("3 of 200 cells have no label in obs column 'label': left out of training (map them as a query to call them), by "
            "`annotate train` and `transfer` (`benchmark` scores the labelled cells); `embed` and `run` refuse cells without a label") in " ".join(result.output.split())


def test_embed_and_nmf_refuse_bad_outputs_and_options(files, work):
    good = str(files["good"])
    refused(work, ["embed", good, "--out", "latent.txt"], "latent.txt", ".h5ad")
    (work / "file").write_text("x")
    refused(work, ["embed", good, "--out", "file/latent.h5ad"], "is a file")
    refused(work, ["embed", good, "--out", "latent.h5ad", "--set", "latent_dim"], "--set 'latent_dim'")
    refused(work, ["embed", good, "--out", "latent.h5ad", "--model", "vae"], "unknown model 'vae'")
    refused(work, ["embed", good, "--out", "latent.h5ad", "--max-epochs", "3", "--set", "max_epochs=2"], "--max-epochs 3 and --set max_epochs=2: give it once")
    refused(work, ["embed", str(files["dup_cells"]), "--out", "latent.h5ad"], "cell names repeat")
    refused(work, ["embed", good, "--out", "latent.h5ad", "--batch-key", "plate"], "obs column 'plate' not found")
    refused(work, ["embed", good, "--out", "latent.h5ad", "--batch-key", "plate", "--stream"], "obs column 'plate' not found")  # no notice before it
    refused(work, ["nmf", good, "--out", "factors.txt"], "factors.txt", ".h5ad")
    refused(work, ["nmf", str(files["negative"]), "--out", "factors.h5ad"], "negative values")
    refused(work, ["nmf", good, "--out", "factors.h5ad", "--benchmark-seeds", "-1"], "benchmark_seeds: -1")  # ran, benchmarking nothing


def test_commands_other_than_run_refuse_a_distributed_launch(files, work, monkeypatch):
    """Started by torchrun (WORLD_SIZE > 1) or `srun -n N` every rank would repeat the command and race to write OUT:
    each refuses before reading anything; `run` (which shares the work), WORLD_SIZE=1 and a SLURM batch script's
    single process are let through."""
    good = str(files["good"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    refused(work, ["embed", good, "--out", "latent.h5ad"], "scatlas embed runs as one process", "rank 1 of WORLD_SIZE=2", "strategy=ddp_spawn", "scatlas run")
    refused(work, ["annotate", "train", good, "--label-key", "cellTypes", "--out", "model"], "scatlas annotate train runs as one process")
    refused(work, ["benchmark", good, "--embedding", "X_pca", "--label-key", "cellTypes", "--batch-key", "batch", "--out", "scores"],
            "scatlas benchmark runs as one process")
    refused(work, ["transfer", "--reference", good, "--query", good, "--label-key", "cellTypes", "--out", "t"], "scatlas transfer runs")
    refused(work, ["run", "missing.yaml"], "missing.yaml")  # past the launcher check, to the config's own refusal
    monkeypatch.setenv("WORLD_SIZE", "1")
    refused(work, ["embed", good, "--out", "latent.txt"], "latent.txt", ".h5ad")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a batch script of 4 tasks running one process: let through
    refused(work, ["embed", good, "--out", "latent.txt"], "latent.txt", ".h5ad")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # srun -n 4: four copies
    monkeypatch.setenv("SLURM_PROCID", "3")
    refused(work, ["embed", good, "--out", "latent.h5ad"], "scatlas embed runs as one process", "rank 3 of SLURM_STEP_NUM_TASKS=4", "(srun)")


def test_outputs_never_replace_the_input_or_a_folder_scatlas_did_not_write(files, work, monkeypatch):
    """`--out` naming the input file is refused (a results-only .h5ad would replace the data), and `--overwrite`
    replaces only a folder scatlas wrote: never `--out .` or a folder holding the user's files."""
    import shutil

    data = work / "cells.h5ad"
    shutil.copy(files["good"], data)
    (work / "empty").mkdir()
    monkeypatch.chdir(work / "empty")  # `--out .` in an empty folder: the staged output cannot be moved onto the current directory
    refused(work, ["transfer", "--reference", str(data), "--label-key", "cellTypes", "--out", "."], ".: is the current directory")
    refused(work, ["annotate", "train", str(data), "--label-key", "cellTypes", "--out", str(work / "empty")], "is the current directory")
    monkeypatch.chdir(work)
    refused(work, ["embed", str(data), "--out", "cells.h5ad", "--overwrite"], "cells.h5ad: is the input file")
    refused(work, ["nmf", str(data), "--out", str(data)], "is the input file")
    refused(work, ["annotate", "train", str(data), "--label-key", "cellTypes", "--out", ".", "--overwrite"], "not a directory scatlas wrote",
            "would delete everything in it")
    transfer = ["transfer", "--reference", str(data), "--label-key", "cellTypes", "--query", str(data)]
    refused(work, [*transfer, "--out", str(work), "--overwrite"], "not a directory scatlas wrote")
    assert runner.invoke(app, [*transfer, "--out", "tr"]).exit_code == 0
    assert runner.invoke(app, [*transfer, "--out", "tr", "--overwrite"]).exit_code == 0  # a folder scatlas wrote is replaced
    refused(work, ["annotate", "predict", "tr", str(data), "--out", str(data), "--overwrite"], "is the input file")
    refused(work, ["annotate", "predict", "trained", str(data), "--out", "pred.h5ad"], "trained: model folder not found")
    assert runner.invoke(app, ["annotate", "predict", "tr", str(data), "--out", "pred.h5ad"]).exit_code == 0
    refused(work, ["annotate", "predict", "tr", str(data), "--out", "pred.h5ad"], "pred.h5ad exists (pass --overwrite")
    assert runner.invoke(app, ["annotate", "predict", "tr", str(data), "--out", "pred.h5ad", "--overwrite"]).exit_code == 0
    # an input kept inside an earlier output: --overwrite would delete it with the folder
    inside = work / "tr" / "cells_copy.h5ad"
    shutil.copy(data, inside)
    refused(work, ["transfer", "--reference", str(inside), "--label-key", "cellTypes", "--query", str(data), "--out", "tr", "--overwrite"],
            "tr: holds the input", "cells_copy.h5ad", "give a new output directory")
    refused(work, [*transfer[:-1], str(inside), "--out", "tr", "--overwrite"], "holds the input")  # a query
    refused(work, ["annotate", "train", str(inside), "--label-key", "cellTypes", "--n-splits", "0", "--out", "tr", "--overwrite"], "holds the input")
    shutil.copytree(work / "tr", work / "tr_model")  # a folder scatlas wrote, where `embed --out tr.h5ad` saves its model
    refused(work, ["embed", str(work / "tr_model" / inside.name), "--out", "tr.h5ad", "--overwrite"], "tr_model: holds the input")
    assert inside.exists()


def test_annotate_refuses_bad_input(files, work):
    kang = str(files["kang"])
    refused(work, ["annotate", "train", kang, "--label-key", "cell_type", "--out", "ann", "--model", "forest"], "--model", "'forest'")
    refused(work, ["annotate", "train", kang, "--label-key", "cell_type", "--out", "ann", "--filter", "sample_id"], "COLUMN=VALUE")
    refused(work, ["annotate", "train", kang, "--label-key", "cell_type", "--out", "ann", "--ensemble", "0"], "model: invalid entry for 'linear': ensemble", "greater than or equal to 1")
    refused(work, ["annotate", "train", kang, "--label-key", "celltype", "--out", "ann"], "obs column 'celltype' not found")
    for folds in ("2", "-1"):  # said as the option, not as the config's split.n_splits
        refused(work, ["annotate", "train", kang, "--label-key", "cell_type", "--out", "ann", "--n-splits", folds],
                f"--n-splits {folds}: cross-validation needs at least 3 folds", "0 fits the final model only")
    refused(work, ["annotate", "train", kang, "--label-key", "cell_type", "--ontology-key", "cl_id", "--out", "ann"], "'cl_id' not found")
    (work / "ann").mkdir()
    (work / "ann" / "keep.txt").write_text("earlier results")
    refused(work, ["annotate", "train", kang, "--label-key", "cell_type", "--out", "ann"], "not empty", "--overwrite")
    refused(work, ["annotate", "predict", str(work / "no_model"), kang, "--out", "pred.h5ad"], "no_model")
    refused(work, ["annotate", "evaluate", str(files["names_vs_ids"]), "--truth-key", "cell_typ", "--out", "ev"], "'cell_typ' not found")
    refused(work, ["annotate", "evaluate", str(files["names_vs_ids"]), "--truth-key", "cell_type", "--out", "ev"], "share no label", "ids with ids")
    refused(work, ["annotate", "evaluate", str(files["names_vs_ids"]), "--truth-key", "cell_type", "--pred-key", "cell_type", "--out", "ev"],
            "the truth and prediction columns are both 'cell_type'")  # scored the truth against itself: 1.0


def test_transfer_refuses_before_training(files, work):
    kang = str(files["kang"])
    base = ["transfer", "--reference", kang, "--label-key", "cell_type", "--out", "tr"]
    refused(work, [*base, "--query", kang, "--method", "forest"], "--method", "'forest'")
    refused(work, [*base, "--query", kang, "--ensemble", "0"], "model: invalid entry for 'linear': ensemble", "greater than or equal to 1")
    refused(work, [*base, "--query", kang, "--ensemble", "3"], "solver 'lbfgs' is deterministic", "use ensemble 1")  # the default linear model
    refused(work, [*base, "--query", kang, "--method", "linear", "--stream"], "solver 'lbfgs' (the linear method) needs the reference in memory", "mlp")
    refused(work, [*base, "--query", str(work / "absent.h5ad")], "absent.h5ad: file not found")
    refused(work, [*base, "--query", str(files["kang_ensembl"])], "kang_ensembl.h5ad", "0 of the model's 1267 genes", ".var['SYMBOL'] holds them",
            "--query-gene-key SYMBOL")
    refused(work, [*base, "--query", str(files["kang_ensembl"]), "--query-gene-key", "symbol"], "kang_ensembl.h5ad", "no gene column 'symbol'", "SYMBOL")
    refused(work, [*base, "--query", str(files["kang_nan"])], "kang_nan.h5ad", "NaN or infinite")
    refused(work, [*base, "--query", kang, "--query-label-key", "truth"], "obs column 'truth' not found")
    refused(work, [*base, "--query", kang, "--query-label-key", "cell_type_ontology_term_id"],  # ids against names: it trained, then scored no cell
            "obs column 'cell_type_ontology_term_id' shares no label with the reference's 'cell_type'", "compare names with names and ids with ids")
    refused(work, ["transfer", "--reference", kang, "--label-key", "celltype", "--out", "tr", "--query", kang], "'celltype' not found")
    lognorm = ad.read_h5ad(kang)  # a log-normalised reference with an all-zero gene (a notice) and a query of counts
    lognorm.X = normalize_log1p(lognorm.X)
    lognorm.X[:, 0] = 0
    lognorm.write_h5ad(Path(kang).with_name("kang_lognorm_reference.h5ad"))
    refused(work, ["transfer", "--reference", str(Path(kang).with_name("kang_lognorm_reference.h5ad")), "--label-key", "cell_type", "--out", "tr",
                   "--query", kang], "kang.h5ad: .X holds values up to", "too large for log-normalised values")
    with pytest.raises(InputError, match="too large for log-normalised values"):  # the API alike, before any line
        sa.tl.transfer(lognorm, ad.read_h5ad(kang), label_key="cell_type", log=pytest.fail)


def test_counts_kept_in_raw_are_pointed_at_and_selected_by_layer_raw(files, work):
    """A CELLxGENE-like file (log-normalised X, counts in .raw): the refusal points at .raw, `--layer raw` selects it;
    `--layer raw` on a file without .raw (or such a layer) is refused by name."""
    kang_raw = str(files["kang_raw"])
    refused(work, ["validate", kang_raw, "--label-key", "cell_type", "--input", "counts"], "kang_raw.h5ad: .X has non-integer values",
            "the file has .raw", "select it with layer 'raw', `--layer raw`")
    result = runner.invoke(app, ["validate", kang_raw, "--label-key", "cell_type", "--layer", "raw"])
    assert result.exit_code == 0 and "kang_raw.h5ad: OK" in result.output, result.output
    refused(work, ["validate", str(files["kang"]), "--label-key", "cell_type", "--layer", "raw"], "kang.h5ad: layer 'raw' not found and there is no .raw")
    for command in (["nmf", str(files["kang"]), "--out", "f.h5ad"], ["transfer", "--reference", kang_raw, "--label-key", "cell_type", "--out", "tr",
                                                                      "--query", str(files["kang"]), "--query-layer", "raw"]):
        refused(work, [*command, "--layer", "raw"], "kang.h5ad: layer 'raw' not found and there is no .raw")
    from scatlas.data import validate

    repeated = ad.read_h5ad(kang_raw)
    raw = repeated.raw.to_adata()
    raw.var_names = [raw.var_names[1], *raw.var_names[1:]]
    repeated.raw = raw
    validate(repeated)  # .var's names are unique: only .raw's repeat
    with pytest.raises(InputError, match=r"1 gene names repeat \('ISG15'\); make them unique first, of \.raw, e\.g\. raw = adata\.raw\.to_adata\(\)"):
        validate(repeated, layer="raw")


def test_counts_kept_in_a_layer_are_named_in_the_refusal(files, work):
    """scanpy's usual file (log-normalised X, the counts in a layer): the refusal names the file's layers; `--layer` selects it."""
    kang = ad.read_h5ad(files["kang"])
    kang.layers["counts"] = kang.X.copy()
    kang.X = kang.X.log1p()
    path = work / "kang_layers.h5ad"
    kang.write_h5ad(path)
    refused(work, ["validate", str(path), "--label-key", "cell_type", "--input", "counts"], "kang_layers.h5ad: .X has non-integer values",
            "pass `layer` (this file has layers ['counts']) or `input: lognorm`")
    result = runner.invoke(app, ["validate", str(path), "--label-key", "cell_type", "--layer", "counts"])
    assert result.exit_code == 0 and "kang_layers.h5ad: OK" in result.output, result.output


def test_transfer_and_annotate_api_refuse_a_model_that_is_not_a_classifier_or_clashes_with_method(files):
    from scatlas._errors import ConfigError
    from scatlas.models.autoencoder import AEConfig

    kang = ad.read_h5ad(files["kang"])
    with pytest.raises(ConfigError, match=r"model: 'ae' is not a CellTypeClassifier; available: \['linear', 'mlp', 'tabnet'\]"):
        sa.tl.transfer(kang, kang, label_key="cell_type", model={"type": "ae"}, log=lambda _: None)
    with pytest.raises(ConfigError, match="pass either `model`.*or `method` / `loss` / `ensemble`, not both"):
        sa.tl.transfer(kang, kang, label_key="cell_type", model={"type": "mlp"}, loss="hce", log=lambda _: None)
    with pytest.raises(ConfigError, match="^transfer: confidence: unknown setting; did you mean 'confidence_threshold'\\?; max_epoch: .* 'max_epochs'\\?$"):
        sa.tl.transfer(kang, kang, label_key="cell_type", confidence=0.3, max_epoch=3, log=lambda _: None)  # training settings are keywords too
    with pytest.raises(ConfigError, match="^ae: latent: unknown setting; did you mean 'latent_dim'\\?; max_epoch: .* 'max_epochs'\\?$"):
        sa.tl.embed(kang, "ae", latent=5, max_epoch=3)
    with pytest.raises(ConfigError, match="^nmf: n_components: unknown setting; did you mean 'rank'\\?; n_epochs: .* 'max_epochs'\\?$"):
        sa.tl.embed(kang, "nmf", n_components=5, n_epochs=3)  # scikit-learn's / scvi-tools' names lead to ours
    with pytest.raises(ConfigError, match="^ae: n_latent: unknown setting; did you mean 'latent_dim'\\?; learning_rate: .* 'lr'\\?$"):
        sa.tl.embed(kang, "ae", n_latent=5, learning_rate=0.1)
    with pytest.raises(ConfigError, match=r"^ae: n_layers: unknown setting; did you mean 'hidden' \(the hidden layers' widths, e.g. \[128, 128\]\)\?$"):
        sa.tl.embed(kang, "ae", n_layers=2)  # scvi-tools' n_layers is a count, our hidden the widths
    for wrong, said in [({"seed": -1}, "seed: Input should be greater than or equal to 0"), ({"scale": "zscore"}, "scale: Input should be 'none'"),
                        ({"val_fraction": 1.5}, "val_fraction: Input should be less than 1"), ({"n_top_genes": -3}, "n_top_genes: Input")]:
        with pytest.raises(ConfigError, match=f"^{re.escape(said)}"):  # were a traceback from numpy, a TypeError, a scikit-learn error, a silent run
            sa.tl.embed(kang, "pca", **wrong)
    with pytest.raises(ConfigError, match="^seed: Input should be greater than or equal to 0"):
        sa.tl.transfer(kang, kang, label_key="cell_type", seed=-5, log=lambda _: None)
    with pytest.raises(ConfigError, match="hidden.0: Input should be greater than or equal to 1"):  # was an IndexError from torch
        sa.tl.embed(kang, "ae", hidden=[0])
    assert AEConfig(hidden=128).hidden == [128]  # one width (scvi-tools' n_hidden) is one layer; it was refused as not a list
    with pytest.raises(InputError, match="^reference: obs column 'author_cell_type': unknown or deprecated Cell Ontology ids: 'B cells', 'CD14\\+ Monocytes',"):
        sa.tl.transfer(kang, kang, label_key="cell_type", ontology_key="author_cell_type", log=lambda _: None)  # names, not np.str_('B cells')
    with pytest.raises(ConfigError, match="C: only for solver 'lbfgs'"):
        sa.tl.transfer(kang, kang, label_key="cell_type", model={"type": "linear", "C": 0.1}, log=lambda _: None)
    with pytest.raises(ConfigError, match=r"model: a saved model's folder, an Annotator or a ReferenceModel, not AnnData \(to learn from a labelled reference, sa.tl.transfer"):
        sa.tl.annotate(kang, kang)
    with pytest.raises(ConfigError, match="solver 'lbfgs' needs the reference in memory"):  # a backed reference streams
        kang.write_h5ad(files["kang"].parent / "kang_copy.h5ad")
        sa.tl.transfer(ad.read_h5ad(files["kang"].parent / "kang_copy.h5ad", backed="r"), kang, label_key="cell_type", method="linear", log=lambda _: None)


def test_aggregate_and_benchmark_refuse_bad_input(files, work):
    kang = str(files["kang"])
    refused(work, ["aggregate", kang, "--out", "agg", "--label-key", "cell_type", "--sample-key", "donor"], "--sample-key", "['donor'] not found")
    refused(work, ["aggregate", kang, "--out", "agg", "--label-key", "cell_type", "--sample-key", "sample_id,donor"], "['donor'] not found")
    refused(work, ["aggregate", kang, "--out", "agg", "--label-key", "cell_type", "--sample-key", "sample_idd"], "not found (did you mean 'sample_id'?)")
    refused(work, ["aggregate", kang, "--out", "agg", "--label-key", "sample_id", "--batch-key", "sample_id", "--sample-key", "sample_id,cell_type"],
            "batch_key and label_key are both 'sample_id'")  # was an IndexError
    from conftest import data_path

    lincs = str(data_path("lincs_SQ00015054_well_profiles.csv.gz"))  # 42 DMSO wells have no mechanism of action
    refused(work, ["aggregate", lincs, "--out", "agg", "--label-key", "Metadata_moa", "--sample-key", "Metadata_broad_sample"],
            "column 'Metadata_moa' has 42 missing values (of 384 rows)")
    refused(work, ["aggregate", lincs, "--out", "agg", "--label-key", "Metadata_moa", "--sample-key", "Metadata_broad_sample", "--features", "pca:10"],
            "a table's numeric columns are its features; features, layer and input apply to .h5ad / .zarr files")  # pca:10 was ignored
    refused(work, ["aggregate", kang, "--out", "agg", "--label-key", "cell_type", "--sample-key", "cell_type", "--features", "pca:10"],
            "one training sample", "finer sample key")
    refused(work, ["aggregate", kang, "--out", "agg", "--sample-key", "sample_id"], "--label-key")
    refused(work, ["aggregate", "--out", "agg", "--toy", "spiral"], "unknown check 'spiral'")
    counted = ["aggregate", kang, "--out", "agg", "--label-key", "cell_type", "--batch-key", "sample_id"]  # settings out of range: one line, not a crash
    for extra, said in [(["--seeds", "0"], "--seeds: 0; train at least one seed"),  # was an UnboundLocalError
                        (["--sample-key", "sample_id", "--features", "pca:0"], "'pca:0': pca:<k> takes a whole number of components k >= 1"),
                        (["--sample-key", "sample_id", "--features", "pca:x"], "'pca:x'"),  # was a ValueError
                        (["--cells-per-sample", "0"], "--cells-per-sample: 0"), (["--sample-key", "sample_id", "--cells-per-view", "0"], "--cells-per-view: 0"),
                        (["--sample-key", "sample_id", "--max-epochs", "0"], "max_epochs: Input should be greater than or equal to 1"),
                        (["--sample-key", "sample_id", "--cells-per-sample", "20"], "give --sample-key (the samples are in the data) or --cells-per-sample")]:
        refused(work, counted + (["--sample-key", "sample_id"] if extra[0] == "--seeds" else []) + extra, said)
    embedded = str(files["kang_embedded"])
    kang_names = ad.read_h5ad(files["kang_embedded"], backed="r").obs_names
    refused(work, ["benchmark", embedded, "--embedding", "X_scvi", "--label-key", "cell_type", "--batch-key", "sample_id"], "['X_scvi'] not in .obsm")
    refused(work, ["benchmark", embedded, "--embedding", "X_pca", "--embedding", "X_diverged", "--label-key", "cell_type", "--batch-key", "sample_id"],
            ".obsm['X_diverged'] has NaN or infinite values in 2 cells", kang_names[3], kang_names[8])
    refused(work, ["benchmark", embedded, "--embedding", "X_pca", "--label-key", "cell_type", "--batch-key", "sample_id", "--graph", "X_pca"], "EMBEDDING=OBSP_KEY")
    refused(work, ["benchmark", embedded, "--embedding", "X_pca", "--label-key", "cell_type", "--batch-key", "sample_id", "--graph", "X_umap=d"],
            "graphs given for ['X_umap'], which are not among the embeddings scored ['X_pca']")  # it was ignored
    refused(work, ["benchmark", embedded, "--embedding", "X_pca", "--label-key", "cell_type", "--batch-key", "sample_id", "--pre-key", "X_pcaa"],
            "pre_key 'X_pcaa' (the unintegrated reference of PCR comparison) not in .obsm (did you mean 'X_pca'?)")
    refused(work, ["benchmark", embedded, "--embedding", "X_pca", "--label-key", "celltype", "--batch-key", "sample_id"], "'celltype' not found")
    refused(work, ["benchmark", embedded, "--embedding", "X_pca", "--label-key", "sample_id", "--batch-key", "sample_id"],
            "the batch and label columns are both 'sample_id'")
    refused(work, ["benchmark", str(files["dup_cells"]), "--embedding", "X_pca", "--label-key", "cellTypes", "--batch-key", "batch"], "cell names repeat")
    some_unlabelled = ad.read_h5ad(embedded)  # the notices (cells left out, how X was read) wait for every check: the refusal stays one line
    some_unlabelled.obs["cell_type"] = some_unlabelled.obs["cell_type"].astype(object).where(np.arange(some_unlabelled.n_obs) % 5 > 0, None)
    some_unlabelled.write_h5ad(Path(embedded).with_name("kang_some_unlabelled.h5ad"))
    refused(work, ["benchmark", str(Path(embedded).with_name("kang_some_unlabelled.h5ad")), "--embedding", "X_scvi", "--label-key", "cell_type",
                   "--batch-key", "sample_id"], "['X_scvi'] not in .obsm")
    refused(work, ["aggregate", str(files["nan"]), "--out", "agg", "--label-key", "cellTypes", "--sample-key", "batch"], "nan.h5ad", "NaN or infinite")
    refused(work, ["compare", str(work)], "no scatlas run outputs")


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["validate", "{zeros}"], "holds no non-zero value"),
        (["embed", "{good}", "--out", "latent.txt"], ".h5ad file name"),
        (["run", "{config}", "--quiet"], "NaN or infinite values"),
    ],
)
def test_real_process_exits_2_with_one_line(files, work, args, word):
    values = {k: str(v) for k, v in files.items()} | {"config": str(_run_config(work, files["nan"]))}
    before = _snapshot(work)
    proc = subprocess.run([sys.executable, "-m", "scatlas", *(a.format(**values) for a in args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)
    lines = _lines(proc.stdout + proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], proc.stdout + proc.stderr
    assert _snapshot(work) == before
