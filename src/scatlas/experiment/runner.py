"""The experiment runner: every configured model on every split, written in the DESIGN §5 layout.

The runner knows nothing model-specific beyond :class:`~scatlas.models.base.EmbeddingModel`.
Each split is preprocessed once (HVGs and scaling fitted on its training cells) and
shared by all models. A split's outputs are written to a staging directory and renamed
into place when complete, so an interrupted run never leaves a half-written split;
``resume=True`` skips finished splits and continues unfinished ones from
``last.ckpt``. If a run fails, run directories it created and that hold no finished
split are removed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA as SkPCA

from scatlas._errors import ConfigError
from scatlas._io import check_writable, write_csv, write_npy, write_yaml
from scatlas.data.dataset import CellData, load_dataset
from scatlas.data.preprocess import preprocess_split
from scatlas.data.sources import as_source, read_rows
from scatlas.data.splits import Split, assignment_table, make_splits
from scatlas.experiment.config import ExperimentConfig
from scatlas.experiment.compare import compare_runs
from scatlas.experiment.layout import RunLayout, safe_name
from scatlas.metrics.embedding import embedding_scores
from scatlas.metrics.stats import fold_summary
from scatlas.models.base import REGISTRY, AnyModel, CounterfactualModel, EmbeddingModel, LatentClassifier, ModelConfig, SplitData, build_model
from scatlas.plot.figures import embedding_panels, loss_curves, umap_coordinates
from scatlas.tl._factors import ranked_loadings
from scatlas.train import is_main_process

Log = Callable[[str], None]


@dataclass
class RunResult:
    """What a run produced: one layout per model and the mean test scores table."""

    layouts: dict[str, RunLayout]
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)


def split_data(config: ExperimentConfig, data: CellData, split: Split) -> SplitData:
    """Preprocess ``data`` for ``split`` (HVG + scaling fitted on its training cells)."""
    prep = preprocess_split(data.lognorm, data.var_names, split.train, config.preprocess.n_top_genes, config.preprocess.scale)
    return SplitData(
        X=prep.X,
        train=split.train,
        val=split.val,
        batch=np.asarray(data.batch.codes, dtype=np.int64),
        batch_names=[str(c) for c in data.batch.categories],
        label=np.asarray(data.label.codes, dtype=np.int64) if data.label is not None else None,
        label_names=[str(c) for c in data.label.categories] if data.label is not None else None,
        genes=prep.genes,
    )


def _obs_table(data: CellData, rows: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame({"cell_id": data.cell_ids[rows], "batch": np.asarray(data.batch)[rows]})
    if data.label is not None:
        table["label"] = np.asarray(data.label)[rows]
    return table


def _score_name(part: str, sample_size: int) -> str:
    return f"scores_{part}_samplesize-{sample_size}.csv"


class _SplitRunner:
    """Fit one model on one split and write its outputs."""

    def __init__(self, config: ExperimentConfig, data: CellData, layout: RunLayout, log: Log) -> None:
        self.config, self.data, self.layout, self.log = config, data, layout, log

    def _stage(self, n: int) -> Path:
        stage = self.layout.staging_dir(n)
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        return stage

    def run(self, model: AnyModel, sdata: SplitData, split: Split, resume: bool) -> None:
        if isinstance(model, LatentClassifier):
            if is_main_process():  # no distributed training: other ranks have nothing to do
                self.run_classifier(model, split)
        else:
            self.run_embedding(model, sdata, split, resume)

    def _features(self, source: str, split: Split, part: str) -> np.ndarray:
        if source.startswith("obsm:"):
            return np.asarray(self.data.obsm[source[5:]])[split.part(part)]
        entry = next(m for m in self.config.models if self.config.model_name(m) == source)
        ref = RunLayout(self.layout.root, self.layout.dataset, self.layout.scenario, source, self.layout.run)
        return np.load(ref.split_dir(split.number) / f"{REGISTRY[entry.type].latent_name}_{part}.npy")

    def run_classifier(self, model: LatentClassifier, split: Split) -> None:
        """Classify each part's cells from the latents of the models the classifier names."""
        layout, n = self.layout, split.number
        stage = self._stage(n)
        parts = [p for p in self.config.evaluation.parts if len(split.part(p))]
        if "train" not in parts:
            parts = ["train", *parts]
        sources = type(model).sources(model.config)
        features = {p: np.hstack([self._features(s, split, p) for s in sources]) for p in parts}
        labels = {p: np.asarray(self.data.label, dtype=str)[split.part(p)] for p in parts}
        metrics, predictions = model.fit_predict(features, labels)
        write_csv(metrics, stage / "metrics.csv")
        for part, table in predictions.items():
            table.insert(0, "cell_id", self.data.cell_ids[split.part(part)])
            write_csv(table, stage / f"y_pred_{part}.csv")
        write_yaml(model.params(), layout.models_dir / f"splits_{n}" / "model_params.yaml")
        layout.publish(n)

    def run_embedding(self, model: EmbeddingModel, sdata: SplitData, split: Split, resume: bool) -> None:
        """Fit, then write latents, reconstructions, counterfactuals, scores and figures of every part."""
        cfg, layout, n = self.config, self.layout, split.number
        said = model.size_said(len(sdata.train), sdata.n_genes)
        if said:
            self.log(f"split {n}: {said}")
        history = model.fit(sdata, layout.checkpoint_dir(n), resume=resume)
        if said := model.fit_said():
            self.log(f"split {n}: {said}")
        if not is_main_process():  # other DDP ranks only take part in training; rank 0 writes
            return
        stage = self._stage(n)
        write_yaml(model.params(), layout.models_dir / f"splits_{n}" / "model_params.yaml")
        if hasattr(model, "loadings"):
            W = model.loadings()
            write_npy(W, stage / "W.npy")
            write_csv(ranked_loadings(W, sdata.genes), stage / "gene_loadings.csv")
        if history is not None and len(history):
            write_csv(history, stage / "history.csv")
            if cfg.evaluation.figures:
                loss_curves(history, layout.figures_dir / f"splits_{n}" / "loss.png", f"{layout.model} split {n}")
        for part in cfg.evaluation.parts:
            rows = split.part(part)
            if len(rows) == 0:
                continue
            latent = model.embed(sdata, rows)
            write_csv(_obs_table(self.data, rows), stage / f"obs_{part}.csv")
            write_npy(latent, stage / f"{model.latent_name}_{part}.npy")
            recon = model.reconstruct(sdata, rows) if cfg.evaluation.save_recon else None
            if recon is not None:
                write_npy(recon, stage / f"recon_{part}.npy")
                if part == "test":  # the model's input beside its reconstruction, for genomaps in `scatlas compare`
                    write_npy(read_rows(as_source(sdata.X), rows).toarray().astype(np.float32), stage / "input_test.npy")
            if cfg.evaluation.save_recon and isinstance(model, CounterfactualModel):
                self._counterfactuals(model.counterfactuals(sdata, rows), stage, part)
            labels = np.asarray(self.data.label)[rows] if self.data.label is not None else None
            batch = np.asarray(self.data.batch)[rows]
            scores = embedding_scores(latent, labels, batch, cfg.evaluation.sample_size, seed=cfg.seed)
            write_csv(pd.DataFrame([scores]), stage / _score_name(part, cfg.evaluation.sample_size))
            if cfg.evaluation.figures and part == "test":
                self._figures(latent, labels, batch, n)
        model.save_state(layout.models_dir / f"splits_{n}")  # the weights only (module.pt / model.npz)
        layout.publish(n)
        if not model.train_config.keep_checkpoints:
            shutil.rmtree(layout.checkpoint_dir(n), ignore_errors=True)

    @staticmethod
    def _counterfactuals(recons: dict[str, np.ndarray], stage: Path, part: str) -> None:
        order = []
        for i, (batch, recon) in enumerate(recons.items()):
            name = f"recon_batch_{part}_{safe_name(batch)}.npy"
            write_npy(recon, stage / name)
            order.append({"order": i, "batch": batch, "file": name})
        write_csv(pd.DataFrame(order), stage / f"counterfactual_batches_{part}.csv")

    def _figures(self, latent: np.ndarray, labels: np.ndarray | None, batch: np.ndarray, n: int) -> None:
        colours = {"label": labels, "batch": batch} if labels is not None else {"batch": batch}
        out = self.layout.figures_dir / f"splits_{n}"
        title = f"{self.layout.model} test split {n}"
        if len(latent) > 3:
            embedding_panels(umap_coordinates(latent, seed=self.config.seed), colours, out / "umap_test.png", title)
        if latent.shape[1] >= 2:
            pcs = SkPCA(n_components=2, random_state=0).fit_transform(latent)
            embedding_panels(pcs, colours, out / "pca_test.png", title, axis="PC")


def aggregate(layout: RunLayout, config: ExperimentConfig) -> pd.DataFrame:
    """Write ``all_scores_*``, ``mean_scores_*``, ``history_allfolds.csv``, ``mean_history_allfolds.csv`` and ``avg_loss.png``.

    Returns
    -------
    The mean test scores (long format) of this model.
    """
    size = config.evaluation.sample_size
    test_summary = pd.DataFrame()
    splits = layout.finished_splits()
    for part in config.evaluation.parts:
        frames = []
        for n in splits:
            path = layout.split_dir(n) / _score_name(part, size)
            if path.exists():
                frames.append(pd.read_csv(path).assign(model=layout.model, split=n))
        if not frames:
            continue
        table = pd.concat(frames, ignore_index=True)
        cols = ["model", "split"] + [c for c in table.columns if c not in ("model", "split")]
        write_csv(table[cols], layout.latent_dir / f"all_{_score_name(part, size)}")
        summary = fold_summary(table.drop(columns=["split"]), by=["model"])
        write_csv(summary, layout.latent_dir / f"mean_{_score_name(part, size)}")
        if part == "test":
            test_summary = summary
    _aggregate_classifier(layout, splits)
    histories = [
        pd.read_csv(layout.split_dir(n) / "history.csv").assign(split=n)
        for n in splits
        if (layout.split_dir(n) / "history.csv").exists()
    ]
    if histories:
        history = pd.concat(histories, ignore_index=True)
        write_csv(history, layout.latent_dir / "history_allfolds.csv")
        mean_history = history.drop(columns=["split", "member"], errors="ignore").groupby("epoch", as_index=False).mean()  # an ensemble: its members too
        write_csv(mean_history, layout.latent_dir / "mean_history_allfolds.csv")
        if config.evaluation.figures:
            loss_curves(mean_history, layout.figures_dir / "avg_loss.png", f"{layout.model}: mean over folds")
    return test_summary


def _aggregate_classifier(layout: RunLayout, splits: list[int]) -> None:
    """``metrics_allfolds.csv`` and ``metrics_allfolds_95CI.csv`` of a latent classifier (MEC)."""
    frames = [
        pd.read_csv(layout.split_dir(n) / "metrics.csv").assign(split=n)
        for n in splits
        if (layout.split_dir(n) / "metrics.csv").exists()
    ]
    if not frames:
        return
    table = pd.concat(frames, ignore_index=True)
    write_csv(table, layout.latent_dir / "metrics_allfolds.csv")
    write_csv(fold_summary(table.drop(columns=["split"]), by=["part", "classifier"]), layout.latent_dir / "metrics_allfolds_95CI.csv")


def _silent(_: str) -> None:
    """The log of a non-zero DDP rank: rank 0 reports."""


@contextmanager
def _cleanup_on_failure(layouts: list[RunLayout]) -> Iterator[None]:
    """Remove, on error, run directories this call created that hold no finished split."""
    fresh = [layout for layout in layouts if not any(d.exists() for d in layout.run_dirs)]
    try:
        yield
    except BaseException:
        for layout in layouts:
            for stage in layout.latent_dir.glob(".splits_*.partial"):
                shutil.rmtree(stage, ignore_errors=True)
            if layout in fresh and not layout.finished_splits():
                for d in layout.run_dirs:
                    shutil.rmtree(d, ignore_errors=True)
        raise


def run_experiment(
    config: ExperimentConfig,
    output_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
) -> RunResult:
    """Train and evaluate every configured model on every split.

    Parameters
    ----------
    config
        A validated :class:`ExperimentConfig` (see :func:`~scatlas.experiment.config.load_config`).
    output_dir
        Root of the outputs (default ``config.output.dir``).
    resume
        Skip finished splits, continue unfinished ones from their last checkpoint.
    progress
        Show training progress bars.
    log
        Receives one line per step.

    Returns
    -------
    The layouts written and the mean test scores of every model (one row per model × metric);
    on a non-zero rank of a distributed launch (``torchrun``), which only takes part in
    training, the layouts and an empty table.

    Raises
    ------
    InputError, ConfigError
        Before anything is written, for bad data or settings.
    """
    root = Path(output_dir or config.output.dir)
    check_writable(root)
    data = load_dataset(config.dataset, extra_keys=(config.group_key,) if config.split.kind != "kfold" else (), log=log)
    splits = make_splits(config.split, config.group_key, data, log)
    models: list[tuple[ModelConfig, RunLayout]] = [
        (m, RunLayout(root, config.dataset.name, config.scenario, config.model_name(m), config.output.run))
        for m in config.models
    ]
    if not resume:
        existing = [str(lay.latent_dir) for _, lay in models if lay.finished_splits()]
        if existing:
            raise ConfigError(f"run directories already hold results: {existing}; pass --resume or choose another output.run")
    train_config = config.training.to_train_config(config.seed, progress)
    main = is_main_process()  # under torchrun / SLURM every rank runs this; only rank 0 writes or cleans up
    if not main:
        log = _silent
    with _cleanup_on_failure([lay for _, lay in models] if main else []):
        for split in splits:
            todo = [(m, lay) for m, lay in models if not lay.split_done(split.number)]
            if not todo:
                log(f"split {split.number}: done earlier, skipped")
                continue
            sdata = split_data(config, data, split)
            for model_config, layout in todo:
                log(f"split {split.number}/{len(splits)}: {layout.model} ({len(split.train)} train, {len(split.val)} val, {len(split.test)} test cells, {sdata.n_genes} genes)")
                model = build_model(model_config, train_config)
                _SplitRunner(config, data, layout, log).run(model, sdata, split, resume)
        if not main:
            return RunResult({lay.model: lay for _, lay in models}, pd.DataFrame())
        summaries = []
        ran = config.model_copy(update={"dataset": config.dataset.model_copy(update={"input": data.input})})  # `auto` as decided
        for model_config, layout in models:
            summaries.append(aggregate(layout, config))
            write_yaml(ran.model_dump(mode="json"), layout.models_dir / "config.yaml")
            write_csv(assignment_table(splits, data.cell_ids), layout.models_dir / "split_assignment.csv")
    compare_runs([lay for _, lay in models if lay.finished_splits()], umaps=config.evaluation.figures)
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    return RunResult({lay.model: lay for _, lay in models}, summary)
