"""Command-line interface: a thin layer over the API (``scatlas --help``)."""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from scatlas._errors import ConfigError, InputError, ScatlasError

app = typer.Typer(
    help="scatlas: batch-aware embeddings, annotation, label transfer and benchmarks for single-cell data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(shown: bool) -> None:
    if shown:
        from scatlas import __version__

        print(f"scatlas {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print scatlas's version and exit.")] = False) -> None:
    pass  # options of the program itself; a command runs after them
# One log line stays one line in a file or a narrow terminal (soft_wrap), and what it quotes prints as it is (no markup:
# a source named [all], a label [CD4] or a path with [/ in it would be read as Rich's style tags).
console = Console(soft_wrap=True, markup=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False)
F = TypeVar("F", bound=Callable[..., Any])
#: The signal that ended the last command run in this process (``None``: none). Lets an embedding
#: process — e.g. a test runner invoking commands in-process — stop on Ctrl-C as well.
last_interrupt: int | None = None


class Interrupted(BaseException):
    """Raised in the main thread on SIGINT / SIGTERM, so that every staged output is removed on the way out.

    A ``BaseException`` that is not ``KeyboardInterrupt``: Lightning turns the latter into a silent
    exit 1, and its own SIGTERM handling ends in ``SystemExit(None)``, i.e. exit 0.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _resume_hint(fn: Callable[..., Any], kwargs: dict[str, Any]) -> str:
    if fn.__name__ == "run":
        return f"; finished splits are kept, resume with: scatlas run {kwargs['config']} --resume"
    if fn.__name__ in _RESUMABLE:
        from scatlas._io import checkpoints_beside, has_checkpoint

        checkpoints = checkpoints_beside(kwargs["out"])
        if has_checkpoint(checkpoints):
            return f"; no output was written, the training checkpoint is kept in {checkpoints}: the same command with --resume continues it"
    return "; no partial output was kept"


_RESUMABLE = ("embed", "nmf", "transfer", "annotate_train", "aggregate")
"""Commands that keep a training checkpoint beside their output (:func:`scatlas._io.resumable_training`)."""

_RESUME_HELP = ("Continue an interrupted run from its training checkpoint (OUT's name + _checkpoints, kept when a run is stopped); "
                "on CPU the result equals an uninterrupted run's. Same data and options.")


_LAUNCHERS = (("WORLD_SIZE", "RANK", "torchrun"), ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "srun"))
"""(processes, this process's rank, launcher) of the launchers that start several copies of a command: torchrun, and
SLURM's ``srun -n N`` (its step variables; a batch script's own ``SLURM_NTASKS`` is one process)."""


def _one_process(command: str) -> None:
    """Refuse a command other than ``run`` started as one of several ranks of a launcher (:data:`_LAUNCHERS`).

    Each rank would repeat the whole command and race the others to write the same outputs; only
    ``scatlas run`` shares the work between ranks and writes from rank 0.
    """
    import os

    if command == "run":
        return
    for size, rank, launcher in _LAUNCHERS:
        world = os.environ.get(size, "1")
        if world.isdigit() and int(world) > 1:
            several = " (several GPUs of one machine: one process with --set devices=N --set strategy=ddp_spawn)" if command == "embed" else ""
            raise ConfigError(f"scatlas {command} runs as one process, but it was started as rank {os.environ.get(rank, '?')} of "
                              f"{size}={world} by a launcher ({launcher}): every rank would repeat it and write the same outputs. "
                              f"Start it without the launcher{several}; `scatlas run` is the command that trains under torchrun / SLURM")


def _user_errors(fn: F) -> F:
    """Print a :class:`ScatlasError` as one line on stderr and exit 2; exit 130 / 143 on SIGINT / SIGTERM with one line.

    A command other than ``run`` started by a distributed launcher is refused first (:func:`_one_process`).
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        received: list[int] = []

        def interrupt(signum: int, _frame: Any) -> None:
            received.append(signum)
            raise Interrupted(signum)

        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            _one_process(fn.__name__.removesuffix("_command").replace("_", " "))
            result = fn(*args, **kwargs)
        except ScatlasError as exc:
            err_console.print(Text.assemble(("error:", "bold red"), " " + " ".join(str(exc).split())), highlight=False)  # one line, whatever a library said
            raise typer.Exit(code=2) from None
        except (Interrupted, SystemExit) as exc:  # Lightning turns a SIGTERM into SystemExit(None), i.e. exit 0
            if not received:
                raise
            result = exc
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if received:  # also when a library swallowed the exception and the command ran on
            global last_interrupt
            last_interrupt = received[0]
            name = signal.Signals(received[0]).name
            err_console.print(Text.assemble(("interrupted", "bold red"), f" by {name}{_resume_hint(fn, kwargs)}"), highlight=False)
            raise typer.Exit(code=128 + received[0])
        return result

    return wrapper  # type: ignore[return-value]


def _print_summary(summary: Any) -> None:
    if summary is None or len(summary) == 0:
        return
    wanted = {
        "silhouette_label": "ASW label",
        "silhouette_batch": "ASW batch",
        "silhouette_batch_scib": "ASW batch (scib)",
        "kmeans_ari": "k-means ARI",
        "kmeans_nmi": "k-means NMI",
    }
    rows = summary[summary["metric"].isin(list(wanted))]
    table = Table(title="test cells: mean ± 95% CI half-width over folds")
    table.add_column("model")
    for title in wanted.values():
        table.add_column(title, justify="right")
    for model, group in rows.groupby("model", sort=False):
        cells = []
        for metric in wanted:
            r = group[group["metric"] == metric]
            half = (r["ci_high"] - r["mean"]).iloc[0] if not r.empty else float("nan")
            cells.append("" if r.empty else f"{r['mean'].iloc[0]:.3f} ± {half:.3f}")
        table.add_row(str(model), *cells)
    console.print(table)


@app.command()
@_user_errors
def run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file (see examples/).")],
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Root of the outputs (default: output.dir of the config).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip finished splits; continue unfinished ones from their last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Train and evaluate every model of CONFIG on every split, writing the standard output layout."""
    from scatlas.experiment import load_config, run_experiment
    from scatlas.experiment.layout import compare_dir

    cfg = load_config(config)
    result = run_experiment(cfg, output_dir=output_dir, resume=resume, progress=not quiet, log=console.print)
    _print_summary(result.summary)
    first = next(iter(result.layouts.values()))
    console.print(f"report: {compare_dir(first.root, first.dataset, first.scenario, first.run) / 'report.html'}")
    for name, layout in result.layouts.items():
        figures = f" (figures: {layout.figures_dir})" if layout.figures_dir.exists() else ""
        console.print(f"{name}: {layout.latent_dir}{figures}")


@app.command()
@_user_errors
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the demo writes its data and results.")] = Path("outputs/demo"),
    epochs: Annotated[int, typer.Option(help="Maximum training epochs per model.")] = 40,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Run PCA, AE and AEC on real PBMCs shipped with scanpy (3 folds) and show where the results are."""
    from scatlas._io import atomic_path
    from scatlas.data.datasets import DEMO_NOTE, demo_pbmc
    from scatlas.experiment import ExperimentConfig, run_experiment

    if epochs < 1:  # before anything is written
        raise ConfigError(f"--epochs: {epochs}; train at least one epoch")
    console.print(DEMO_NOTE)
    data_path = output_dir / "demo_pbmc68k_2batches.h5ad"
    with atomic_path(data_path) as tmp:
        demo_pbmc().write_h5ad(tmp)
    cfg = ExperimentConfig.model_validate(
        {
            "dataset": {"name": "demo_pbmc", "path": str(data_path), "input": "lognorm", "batch_key": "batch", "label_key": "cell_type"},
            "preprocess": {"n_top_genes": None},
            "split": {"kind": "kfold", "n_splits": 3},
            "training": {"max_epochs": epochs, "batch_size": 128, "patience": 8},
            "models": [{"type": "pca"}, {"type": "ae", "hidden": [256, 64], "dropout": 0.1}, {"type": "aec", "hidden": [256, 64], "dropout": 0.1}],
            "evaluation": {"save_recon": False},  # latents, scores, figures and one weights file per split: under 20 MB
            "output": {"dir": str(output_dir), "run": "demo"},
        }
    )
    result = run_experiment(cfg, output_dir=output_dir, resume=True, progress=not quiet, log=console.print)
    _print_summary(result.summary)
    console.print(f"\nReport (open in a browser): {output_dir / 'demo_pbmc_outputs' / 'compare_models' / 'kfold' / 'demo' / 'report.html'}")
    console.print(f"Results: {output_dir / 'demo_pbmc_outputs' / 'latent_space'}")
    console.print(f"Figures: {output_dir / 'demo_pbmc_outputs' / 'figures'} (UMAPs by label and batch, loss curves)")


@app.command()
@_user_errors
def validate(
    data: Annotated[Path, typer.Argument(help=".h5ad file or .zarr store, or an experiment YAML (checks its dataset exactly as `scatlas run` will).")],
    batch_key: Annotated[str | None, typer.Option(help="Batch / donor column.")] = None,
    label_key: Annotated[str | None, typer.Option(help="Cell-type column.")] = None,
    layer: Annotated[str | None, typer.Option(help=_LAYER_HELP)] = None,
    input: Annotated[str, typer.Option(help=_INPUT_HELP)] = "auto",
) -> None:
    """Run the checks every command runs on its data (one code path), and report what is wrong or will be left out."""
    from scatlas.data.dataset import DatasetConfig, read_dataset
    from scatlas.data.io import get_var
    from scatlas.data.validate import one_batch_notice
    from scatlas.settings import parse_settings

    if data.suffix in (".yaml", ".yml"):
        from scatlas.experiment import load_config

        cfg = load_config(data)
        dataset, extra = cfg.dataset, ((cfg.group_key,) if cfg.split.kind != "kfold" else ())
        log: Callable[[str], None] = console.print
    else:
        kind, log = _input_kind(data, layer, input)
        dataset = parse_settings(DatasetConfig, {"name": data.stem, "path": data, "layer": layer, "batch_key": batch_key, "label_key": label_key,
                                                 "input": kind, "backed": True, "unlabelled": "leave_out"})
        extra = ()
    adata, summary = read_dataset(dataset, extra, lambda line: console.print(
        f"notice: {line}, by `annotate train` and `transfer` (`benchmark` scores the labelled cells); `embed` and `run` refuse cells without a label",
        highlight=False))
    for notice in (summary.notice(), one_batch_notice(adata, dataset.batch_key)):
        if notice:
            log(f"notice: {notice}")
    log(f"{dataset.path}: OK ({adata.n_obs} cells × {len(get_var(adata, dataset.layer))} genes)")


annotate_app = typer.Typer(help="Cell-type annotation: train (CE or hierarchical CE over the Cell Ontology), predict, evaluate.", no_args_is_help=True)
app.add_typer(annotate_app, name="annotate")


_LAYER_HELP = "Layer holding the matrix (default .X; 'raw' selects .raw, as scanpy's use_raw, unless a layer has that name)."
_INPUT_HELP = "auto (counts if the matrix holds whole numbers), counts (normalised + log1p here) or lognorm."
_BATCH_HELP = "Cells per minibatch (default: 64, doubled above 65,536 training cells so an epoch is at most 1,024 steps, up to 4,096)."
_GENE_KEY_HELP = ("Query .var column holding the gene names the model uses (e.g. ENSEMBL beside symbols, as scanpy's gene_symbols; "
                  "default: the query's var_names).")
_METHOD_HELP = ("Classifier: linear (default in memory: one-vs-rest logistic regression, full-batch), "
                "mlp (default with --stream) or tabnet.")
_ENSEMBLE_HELP = ("Networks averaged (mlp / tabnet), each with its own seed and early-stopping cells: steadier from seed to seed, "
                  "about that many times the training time.")
_CHECKPOINT_HELP = ("Seconds between a network's training checkpoints for --resume (written at the end of an epoch, and when training ends; "
                    "0: every epoch). Not a setting of the result: a resumed run may use another.")
_Resume = Annotated[bool, typer.Option("--resume", help=_RESUME_HELP)]
"""The ``--resume`` option of the commands in :data:`_RESUMABLE`."""


def _seconds(value: float) -> float:
    """Refuse a negative ``--checkpoint-interval`` as Click refuses a value out of range (a range would widen the help's metavar column)."""
    if value < 0:
        raise typer.BadParameter(f"{value} is negative: give seconds >= 0")
    return value


_CheckpointInterval = Annotated[float, typer.Option(metavar="<seconds>", callback=_seconds, help=_CHECKPOINT_HELP)]
"""Their ``--checkpoint-interval`` option."""
_EPOCHS_HELP = "Most training epochs; early stopping on held-out reference cells decides (default: 100, fewer above 65,536 training cells)."


def _input_kind(data: Path, layer: str | None, input: str) -> tuple[str, Callable[[str], None]]:
    """``input`` as given, or for ``auto`` what ``data``'s matrix holds (as the API's ``input="auto"``); and the command's log.

    The log prints how ``auto`` decided before its first line, so a refusal before the command's
    first step stays one line.
    """
    from scatlas.data.validate import check_input_kind, resolve_input

    if check_input_kind(input) != "auto":
        return input, console.print
    from scatlas.data.io import read_anndata

    counts, decided = resolve_input(read_anndata(data, backed=True), layer, "auto")
    return "counts" if counts else "lognorm", _said_first([decided] if decided else [])


def _said_first(pending: list[str]) -> Callable[[str], None]:
    """A command's log that prints the lines in ``pending`` (and any added later) before its first line: notices wait
    for the command's first step, so that a refusal before it stays one line."""

    def log(line: str) -> None:
        while pending:
            console.print(pending.pop(0))
        console.print(line)

    return log


def _classifier_training(max_epochs: int | None, batch_size: int | None, chunk_size: int | None, checkpoint_interval: float) -> dict[str, float | None]:
    """The classifier's training settings from the CLI: the minibatch size and epochs only where given (else scaled to the reference)."""
    given = {"max_epochs": max_epochs, "batch_size": batch_size}
    return {"chunk_size": chunk_size, "checkpoint_interval_s": checkpoint_interval, **{k: v for k, v in given.items() if v is not None}}


def _filters(values: list[str]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for item in values:
        column, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--filter expects COLUMN=VALUE, got {item!r}")
        filters.setdefault(column, []).append(value)
    return filters


@annotate_app.command("train")
@_user_errors
def annotate_train(
    data: Annotated[Path, typer.Argument(help="Labelled .h5ad file or .zarr store.")],
    label_key: Annotated[str, typer.Option(help="Column of readable cell-type labels.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    ontology_key: Annotated[str | None, typer.Option(help="Column of Cell Ontology ids (classes become CL ids; needed for --loss hce).")] = None,
    dataset_key: Annotated[str | None, typer.Option(help="Column naming each cell's source study: a label's HCE meaning is set per source (default: one source).")] = None,
    model: Annotated[str | None, typer.Option(help=_METHOD_HELP)] = None,
    loss: Annotated[str, typer.Option(help="ce or hce (hierarchical cross-entropy).")] = "ce",
    ensemble: Annotated[int, typer.Option(help=_ENSEMBLE_HELP)] = 1,
    batch_key: Annotated[str | None, typer.Option(help="Batch / donor column (stratifies splits and metrics).")] = None,
    split: Annotated[str, typer.Option(help="kfold, donor or study.")] = "kfold",
    n_splits: Annotated[int, typer.Option(help="Folds for kfold / donor splits (0: no cross-validation, fit the final model only).")] = 5,
    group_key: Annotated[str | None, typer.Option(help="Donor / study column for donor / study splits (default: batch key).")] = None,
    input: Annotated[str, typer.Option(help=_INPUT_HELP)] = "auto",
    layer: Annotated[str | None, typer.Option(help=_LAYER_HELP)] = None,
    filter: Annotated[list[str], typer.Option(help="Keep cells with COLUMN=VALUE (repeatable).")] = [],  # noqa: B006
    n_top_genes: Annotated[int | None, typer.Option(help="HVGs per training split (default: all genes).")] = None,
    max_epochs: Annotated[int | None, typer.Option(help=_EPOCHS_HELP)] = None,
    batch_size: Annotated[int | None, typer.Option(help=_BATCH_HELP)] = None,
    ontology_obo: Annotated[Path | None, typer.Option(help="Cell Ontology .obo file for an is_a-only hierarchy.")] = None,
    label_map: Annotated[Path | None, typer.Option(help="CSV (author label, CL id) mapping --label-key values to Cell Ontology ids.")] = None,
    final: Annotated[bool, typer.Option(help="Train the final model on all cells (needed for predict).")] = True,
    stream: Annotated[bool, typer.Option("--stream", help="Never load X: read the (CSR) file in chunks; flat host memory for atlases.")] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Cells per training chunk with --stream (default 100,000).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    resume: _Resume = False,
    checkpoint_interval: _CheckpointInterval = 60.0,
) -> None:
    """Cross-validate a classifier, write exact and hierarchy-aware metrics, save the final model.

    The networks' training checkpoints (one per fold, one for the final model) are kept in OUT's name + _checkpoints until the outputs are written: after a stop, the same command with --resume continues them.
    """
    from scatlas.tl._annotation import METHODS, default_method, load_annotate_config, train_annotator

    if model is not None and model not in METHODS:
        raise ConfigError(f"--model must be one of {sorted(METHODS)}, got {model!r}")
    if n_splits != 0 and n_splits < 3:
        raise ConfigError(f"--n-splits {n_splits}: cross-validation needs at least 3 folds (each tests on one part, validates on the next and "
                          "trains on the rest); 0 fits the final model only")
    method = model or default_method(stream)
    kind, log = _input_kind(data, layer, input)
    cfg = load_annotate_config(
        {
            "dataset": {"name": data.stem, "path": data, "layer": layer, "input": kind, "batch_key": batch_key, "label_key": label_key,
                        "filter": _filters(filter), "stream": stream, "unlabelled": "leave_out"},
            "ontology_key": ontology_key,
            "dataset_key": dataset_key,
            "ontology_obo": ontology_obo,
            "label_map": label_map,
            "model": {**METHODS[method], "loss": loss, "ensemble": ensemble},
            "n_top_genes": n_top_genes,
            "split": {"kind": split, "n_splits": n_splits or 5, "group_key": group_key, "seed": seed},
            "cross_validate": n_splits != 0,
            "training": _classifier_training(max_epochs, batch_size, chunk_size, checkpoint_interval),
            "final_model": final,
            "seed": seed,
        }
    )
    summary = train_annotator(cfg, out, overwrite=overwrite, log=log, resume=resume)
    if summary.empty:
        console.print(f"model for `annotate predict`: {out / 'model'} (no cross-validation)")
        return
    table = Table(title=f"{method} + {loss}: test cells, mean ± 95% CI half-width over folds")
    table.add_column("evaluation")
    metrics = ["accuracy", "macro_f1", "weighted_f1"]
    for metric in metrics:
        table.add_column(metric, justify="right")
    for evaluation, group in summary.groupby("evaluation", sort=False):
        row = group.set_index("metric")
        table.add_row(str(evaluation), *(f"{row.loc[m, 'mean']:.3f} ± {row.loc[m, 'ci_high'] - row.loc[m, 'mean']:.3f}" for m in metrics))
    console.print(table)
    console.print(f"results: {out}  (report: {out / 'report.html'}; model for `annotate predict`: {out / 'model'})")


@annotate_app.command("predict")
@_user_errors
def annotate_predict(
    model_dir: Annotated[Path, typer.Argument(help="Directory written by `annotate train` or `transfer` (or the model folder inside it).")],
    query: Annotated[Path, typer.Argument(help="Query .h5ad or .zarr.")],
    out: Annotated[Path, typer.Option(help="Output .h5ad with predictions in .obs / .obsm.")],
    layer: Annotated[str | None, typer.Option(help="Layer holding the matrix ('raw' as for train; default: the layer the model was trained on where the query has it, else .X).")] = None,
    gene_key: Annotated[str | None, typer.Option(help=_GENE_KEY_HELP)] = None,
    min_overlap: Annotated[float, typer.Option(help="Smallest share of the model's genes the query must have.")] = 0.5,
    stream: Annotated[bool, typer.Option("--stream", help="Never load X: map the query chunk by chunk; OUT holds the results only (no matrix).")] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Query cells mapped at a time with --stream (default 100,000).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
) -> None:
    """Annotate a query with a trained model: genes aligned by name, missing ones set to their reference means (linear) or 0 (networks).

    A `transfer`'s reference model gives the transfer's calls: calibrated confidences and unknown flags too.
    """
    from scatlas.tl._annotation import predict_annotations

    adata = predict_annotations(model_dir, query, out, layer, min_overlap, stream=stream, chunk_size=chunk_size, gene_key=gene_key, overwrite=overwrite,
                                log=console.print)
    key = next(c for c in adata.obs.columns if c.endswith("_pred_label"))
    console.print(adata.obs[key].value_counts().to_string())
    unknown = key.removesuffix("_pred_label") + "_unknown"
    if unknown in adata.obs:  # a transfer's reference model
        console.print(f"unknown (low confidence, far from the reference or no counts): {int(adata.obs[unknown].sum())} of {adata.n_obs} cells")
    console.print(f"predictions: {out}")


@annotate_app.command("evaluate")
@_user_errors
def annotate_evaluate(
    predictions: Annotated[Path, typer.Argument(help=".h5ad with a prediction column (from `annotate predict`).")],
    truth_key: Annotated[str, typer.Option(help="Column with the true labels.")],
    out: Annotated[Path, typer.Option(help="Directory for the metric tables and figures.")],
    pred_key: Annotated[str | None, typer.Option(help="Prediction column (default: the one ending in _pred).")] = None,
) -> None:
    """Exact and (with CL ids) hierarchy-aware metrics of stored predictions."""
    from scatlas.tl._annotation import evaluate_annotations

    overall = evaluate_annotations(predictions, truth_key, out, pred_key, log=console.print)
    console.print(overall.to_string(index=False))


@app.command()
@_user_errors
def transfer(
    reference: Annotated[Path, typer.Option(help="Labelled reference .h5ad or .zarr.")],
    label_key: Annotated[str, typer.Option(help="Reference column with the labels to transfer.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    query: Annotated[list[Path], typer.Option(help="Query .h5ad or .zarr (repeatable).")] = [],  # noqa: B006
    ontology_key: Annotated[str | None, typer.Option(help="Reference column of Cell Ontology ids (enables --loss hce).")] = None,
    dataset_key: Annotated[str | None, typer.Option(help="Reference column naming each cell's source study (sets each label's HCE meaning).")] = None,
    query_label_key: Annotated[str | None, typer.Option(help="Query column with known labels (evaluation mode).")] = None,
    method: Annotated[str | None, typer.Option(help=_METHOD_HELP)] = None,
    loss: Annotated[str, typer.Option(help="ce or hce.")] = "ce",
    ensemble: Annotated[int, typer.Option(help=_ENSEMBLE_HELP)] = 1,
    input: Annotated[str, typer.Option(help="auto (counts if the reference holds whole numbers), counts or lognorm (reference and queries).")] = "auto",
    layer: Annotated[str | None, typer.Option(help=_LAYER_HELP)] = None,
    query_layer: Annotated[str | None, typer.Option(help="Layer holding the queries' matrices ('raw' as for --layer; default: --layer where a query has it, else .X).")] = None,
    query_gene_key: Annotated[str | None, typer.Option(help=_GENE_KEY_HELP)] = None,
    confidence_threshold: Annotated[float, typer.Option(help="Calibrated confidence under which a cell is 'unknown'.")] = 0.5,
    distance_quantile: Annotated[float, typer.Option(help="A cell farther from the reference's class centroids than this conformal quantile of the reference cells' distances (each left out of its own class) is 'unknown': at most 1 - this share of cells like the reference's are (1: off).")] = 0.99,
    min_overlap: Annotated[float, typer.Option(help="Smallest share of the model's genes a query must have.")] = 0.5,
    n_top_genes: Annotated[int | None, typer.Option(help="HVGs of the reference's training cells the model keeps (default: all genes).")] = None,
    max_epochs: Annotated[int | None, typer.Option(help=_EPOCHS_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    query_chunk_size: Annotated[int, typer.Option(help="Query cells read from disk and mapped at a time (queries are never loaded whole).")] = 100_000,
    stream: Annotated[bool, typer.Option("--stream", help="Never load the reference's X either: read its (CSR) file in chunks; flat host memory.")] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Reference cells per training chunk with --stream (default 100,000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help=_BATCH_HELP)] = None,
    figures: Annotated[bool, typer.Option("--figures", help="Also draw each confusion matrix as a PNG (the report and confusion_matrix.csv hold them anyway).")] = False,
    resume: _Resume = False,
    checkpoint_interval: _CheckpointInterval = 60.0,
) -> None:
    """Learn a classifier on the reference once, then map each query through it (reference predictions never change).

    A network's training checkpoint is kept in OUT's name + _checkpoints until the outputs are written: after a stop, the same command with --resume continues it.
    """
    from scatlas.tl._annotation import default_method
    from scatlas.tl._transfer import METHODS, load_transfer_config, run_transfer

    if method is not None and method not in METHODS:
        raise ConfigError(f"--method must be one of {sorted(METHODS)}, got {method!r}")
    kind, log = _input_kind(reference, layer, input)
    cfg = load_transfer_config(
        {
            "reference": {"name": reference.stem, "path": reference, "input": kind, "label_key": label_key, "layer": layer,
                          "stream": stream, "unlabelled": "leave_out"},
            "queries": query,
            "query_layer": query_layer,
            "query_gene_key": query_gene_key,
            "ontology_key": ontology_key,
            "dataset_key": dataset_key,
            "query_label_key": query_label_key,
            "model": {**METHODS[method or default_method(stream)], "loss": loss, "ensemble": ensemble},
            "training": _classifier_training(max_epochs, batch_size, chunk_size, checkpoint_interval),
            "confidence_threshold": confidence_threshold,
            "distance_quantile": distance_quantile,
            "min_overlap": min_overlap,
            "n_top_genes": n_top_genes,
            "query_chunk_size": query_chunk_size,
            "seed": seed,
        }
    )
    summary = run_transfer(cfg, out, overwrite=overwrite, log=log, figures=figures, resume=resume)
    columns = [c for c in ("dataset", "n_cells", "accuracy", "balanced_accuracy", "macro_f1", "unknown_fraction") if c in summary]
    console.print(summary[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    console.print(f"results: {out} (report: {out / 'report.html'})")


@app.command()
@_user_errors
def aggregate(
    out: Annotated[Path, typer.Option(help="Output directory.")],
    data: Annotated[Path | None, typer.Argument(help="Per-cell .h5ad / .zarr or CSV/parquet table (omit with --toy).")] = None,
    sample_key: Annotated[str | None, typer.Option(help="Sample (well) column, or several joined by commas (e.g. donor_id,cell_type).")] = None,
    label_key: Annotated[str | None, typer.Option(help="Label to retrieve (compound, cell type).")] = None,
    batch_key: Annotated[str | None, typer.Option(help="Batch (plate / donor): positives from other batches; batches are held out.")] = None,
    group_key: Annotated[str | None, typer.Option(help="Group label (e.g. mechanism of action) for a second retrieval task.")] = None,
    cells_per_sample: Annotated[int | None, typer.Option(help="Without a sample key: split each label × batch into samples of this many cells.")] = None,
    features: Annotated[str | None, typer.Option(help=".h5ad features: an obsm key or pca:<k> (default .X).")] = None,
    layer: Annotated[str | None, typer.Option(help="Layer holding the matrix of pca:<k> or of the features (default .X; 'raw' selects .raw).")] = None,
    input: Annotated[str, typer.Option(help="What the matrix of pca:<k> holds: " + _INPUT_HELP)] = "auto",
    cells_per_view: Annotated[int | None, typer.Option(help="Mean cells per training view (default: the median sample size, 1,500 from 1,000 up).")] = None,
    normalize: Annotated[str, typer.Option(help="Per-batch normalisation: standard, mad or none.")] = "standard",
    sphering: Annotated[bool, typer.Option("--sphering", help="ZCA-whiten the features.")] = False,
    seeds: Annotated[int, typer.Option(help="Number of training seeds (CI over seeds).")] = 3,
    width: Annotated[int, typer.Option(help="Per-cell encoder and profile width.")] = 2048,
    max_epochs: Annotated[int, typer.Option()] = 100,
    toy: Annotated[str | None, typer.Option(help="Run the built-in check instead of DATA: 'covariance'.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Never load an .h5ad's / .zarr's X: an obsm key is read alone, pca:<k> from streamed passes.")] = False,
    chunk_size: Annotated[int, typer.Option(help="Cells read at a time by the streamed passes (--stream).")] = 65_536,
    resume: _Resume = False,
    checkpoint_interval: _CheckpointInterval = 60.0,
) -> None:
    """Learn a set model that turns each sample's cells into one profile; compare with mean and median by mAP.

    Each seed's training checkpoint is kept in OUT's name + _checkpoints until the outputs are written: after a stop, the same command with --resume continues it (finished seeds are reloaded).
    """
    from scatlas._io import check_output_dir, checkpoints_beside, resumable_training
    from scatlas.tl._aggregation import joined_samples, load_aggregate_config, make_samples, read_cells, run_aggregation, toy_covariance

    settings: dict[str, Any] = {"normalize": normalize, "sphering": sphering, "seeds": list(range(seeds)), "width": width, "out_width": width,
                                "max_epochs": max_epochs, "features": features, "layer": layer, "input": input, "group_key": group_key, "chunk_size": chunk_size,
                                "checkpoint_interval_s": checkpoint_interval,
                                **({"cells_mean": cells_per_view} if cells_per_view is not None else {})}
    if toy is not None and toy != "covariance":
        raise ConfigError(f"--toy: unknown check {toy!r}; available: covariance")
    if toy is None and (data is None or label_key is None or (sample_key is None and cells_per_sample is None)):
        raise ConfigError("aggregate: give DATA, --label-key and --sample-key (or --cells-per-sample), or --toy covariance")
    if sample_key is not None and cells_per_sample is not None:
        raise ConfigError("aggregate: give --sample-key (the samples are in the data) or --cells-per-sample (samples drawn from each label × batch), "
                          "not both")
    for option, value, least in (("--cells-per-sample", cells_per_sample, "a sample holds at least one cell"),
                                 ("--cells-per-view", cells_per_view, "a view holds at least one cell"), ("--seeds", seeds, "train at least one seed")):
        if value is not None and value < 1:
            raise ConfigError(f"{option}: {value}; {least}")
    check_output_dir(out, overwrite, (data,) if data is not None else ())
    notices: list[str] = []
    with resumable_training(checkpoints_beside(out), resume, overwrite, console.print) as checkpoints:
        if toy is not None:
            cells = toy_covariance()
            settings.update(sample_key="sample", label_key="label", batch_key="replicate", normalize="none", cells_mean=400, cells_sd=100, cells_min=100,
                            labels_per_batch=10)
            console.print("toy: 10 classes with zero mean and rotated covariances, 4 replicate sets of 800 points; set 'replicate' held out")
        else:
            assert data is not None and label_key is not None
            combined = sample_key is None or "," in sample_key
            settings.update(sample_key="scatlas_sample" if combined else sample_key, label_key=label_key, batch_key=batch_key)
            cells = read_cells(data, load_aggregate_config({**settings, "sample_key": label_key}), stream=stream, log=notices.append)
            columns = sample_key.split(",") if sample_key else []
            missing = [c for c in columns if c not in cells.obs.columns]
            if missing:
                from scatlas._describe import did_you_mean

                raise InputError(f"{data}: --sample-key columns {missing} not found{did_you_mean(missing[0], cells.obs.columns)}; "
                                 f"available: {list(cells.obs.columns)[:30]}")
            if sample_key is None:
                assert cells_per_sample is not None
                cells.obs["scatlas_sample"] = make_samples(cells.obs, [k for k in (label_key, batch_key) if k], cells_per_sample, notices.append)
            elif combined:  # e.g. --sample-key donor_id,cell_type
                cells.obs["scatlas_sample"] = joined_samples(cells.obs, columns)
        summary = run_aggregation(cells, load_aggregate_config(settings), out, overwrite=overwrite, log=_said_first(notices), checkpoint_dir=checkpoints,
                                  resume=resume).summary
    shown = summary[summary["metric"].isin(["map", "precision_at_r"])]
    table = Table(title="held-out queries: mean ± 95% CI half-width over seeds")
    for column in ("task", "method", "metric", "mean", "± CI"):
        table.add_column(column)
    for _, r in shown.iterrows():
        half = r["ci_high"] - r["mean"]
        table.add_row(r["task"], r["method"], r["metric"], f"{r['mean']:.3f}", "" if half != half else f"{half:.3f}")
    console.print(table)
    console.print(f"results: {out} (report: {out / 'report.html'})")


def _with_set(flags: dict[str, tuple[Any, Any]], options: dict[str, Any]) -> dict[str, Any]:
    """The command's own options (``name: (value, default)``), each taken from ``--set name=...`` when given there instead
    (removed from ``options``); given both ways with two values, refused."""
    values = {}
    for name, (value, default) in flags.items():
        if name in options:
            chosen = options.pop(name)
            if value != default and value != chosen:
                raise ConfigError(f"--{name.replace('_', '-')} {value} and --set {name}={chosen}: give it once")
            value = chosen
        values[name] = value
    return values


def _option_values(values: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each value parsed as YAML (``latent_dim=30``, ``hidden=[256,64]``)."""
    import yaml

    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. latent_dim=30")
        options[key] = yaml.safe_load(value)
    return options


@app.command()
@_user_errors
def embed(
    data: Annotated[Path, typer.Argument(help=".h5ad or .zarr with raw counts or log-normalised values.")],
    out: Annotated[Path, typer.Option(help="Results-only .h5ad (the input's obs, latent in .obsm, W in .varm for factor models; no X); the model is saved beside it in OUT_model/.")],
    model: Annotated[str | None, typer.Option(help="pca, ae, aec, fe, fec, re, nmf, aenmf or cond_aenmf (`scatlas models`); "
                                               "default: fe with a --batch-key of several batches (it removes them), else ae.", show_default=False)] = None,
    batch_key: Annotated[str | None, typer.Option(help="Batch / donor column.")] = None,
    label_key: Annotated[str | None, typer.Option(help="Cell-type column (aec, fec need it).")] = None,
    layer: Annotated[str | None, typer.Option(help=_LAYER_HELP)] = None,
    input: Annotated[str, typer.Option(help=_INPUT_HELP)] = "auto",
    key_added: Annotated[str | None, typer.Option(help=".obsm key (default X_<model>).")] = None,
    n_top_genes: Annotated[int, typer.Option(help="Highly variable genes (0 = all genes).")] = 2000,
    max_epochs: Annotated[int | None, typer.Option(help="Upper bound on epochs (default 100, early stopping on 10% held-out cells; fe / fec: at least 3,000 minibatches on small data).")] = None,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same latent on CPU.")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Model or training option KEY=VALUE (repeatable), e.g. --set latent_dim=30 --set batch_size=512.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT and model directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Never load X: read the (CSR) file in chunks; flat host memory for atlases.")] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Cells per streamed chunk (default 100,000 with --stream).")] = None,
    resume: _Resume = False,
    checkpoint_interval: _CheckpointInterval = 60.0,
) -> None:
    """Fit one embedding model on all cells of DATA (scatlas.tl.embed); write the latent and the saved model.

    While a network trains, its checkpoint is kept in OUT's name + _checkpoints (removed when the outputs are written): after a stop (Ctrl-C, a scheduler's SIGTERM, kill -9), the same command with --resume continues it.
    """
    from scatlas._io import atomic_path, check_output_dir, check_output_file, checkpoints_beside, resumable_training
    from scatlas.data import read_anndata
    from scatlas.tl._embed import embed as fit_embedding, results_anndata

    model_dir = out.with_name(f"{out.stem}_model")
    check_output_file(out, ".h5ad", overwrite, inputs=(data,))
    check_output_dir(model_dir, overwrite, (data,))
    with resumable_training(checkpoints_beside(out), resume, overwrite, console.print) as checkpoints:
        adata = read_anndata(data, backed=stream)
        options = {"checkpoint_interval_s": checkpoint_interval, **_option_values(set_ or [])}  # --set checkpoint_interval_s=... as well
        if chunk_size is not None:
            options["chunk_size"] = chunk_size
        flags = _with_set({"batch_key": (batch_key, None), "label_key": (label_key, None), "layer": (layer, None), "input": (input, "auto"),
                           "key_added": (key_added, None), "n_top_genes": (n_top_genes, 2000), "max_epochs": (max_epochs, None), "seed": (seed, 0)}, options)
        flags["n_top_genes"] = flags["n_top_genes"] or None
        result = fit_embedding(adata, model, progress=not quiet, log=console.print, checkpoint_dir=checkpoints, resume=resume, **flags, **options)
        with atomic_path(out) as tmp:  # OUT appears only once the model is saved too
            results_anndata(adata).write_h5ad(tmp)
            result.save(model_dir, overwrite=overwrite)
    latent = adata.obsm[result.key]
    console.print(f"{result.name}: {latent.shape[0]} cells × {latent.shape[1]} dimensions in .obsm[{result.key!r}], {len(result.history)} epochs; "
                  f"{len(result.prep.genes)} genes")
    console.print(f"results: {out}; model: {model_dir} (scatlas.load_model)")


def _blank_missing(table: Any) -> Any:
    """``table`` as text: scores to 3 decimals, whole-number columns whole, a blank where a row has no value."""
    import pandas as pd

    def shown(column: pd.Series) -> pd.Series:
        whole = pd.api.types.is_integer_dtype(column)
        return column.map(lambda v: "" if pd.isna(v) else str(int(v)) if whole else f"{v:.3f}" if isinstance(v, float) else str(v))

    return table.apply(shown)


@app.command()
@_user_errors
def nmf(
    data: Annotated[Path, typer.Argument(help=".h5ad or .zarr with counts (or --input lognorm).")],
    out: Annotated[Path, typer.Option(help="Results-only .h5ad (the input's obs, H in .obsm, W in .varm; no X); tables are written beside it.")],
    model: Annotated[str, typer.Option(help="nmf, aenmf or cond_aenmf.")] = "aenmf",
    rank: Annotated[int, typer.Option(help="Number of factors K.")] = 20,
    batch_key: Annotated[str | None, typer.Option(help="Donor / batch column (conditions cond_aenmf; benchmark by donor).")] = None,
    label_key: Annotated[str | None, typer.Option(help="Cell-type column (invariance penalty; benchmark by cell type).")] = None,
    input: Annotated[str, typer.Option(help=_INPUT_HELP)] = "auto",
    layer: Annotated[str | None, typer.Option(help=_LAYER_HELP)] = None,
    n_top_genes: Annotated[int, typer.Option(help="Highly variable genes used.")] = 2000,
    max_epochs: Annotated[int | None, typer.Option(help="Most training epochs of AE-NMF models (default 100); nmf: scikit-learn's max_iter (default 100).",
                                                   show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Cells per minibatch of AE-NMF models (default 64; thousands for atlases).", show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of AE-NMF models (default 0.01).", show_default=False)] = None,
    benchmark_seeds: Annotated[int, typer.Option(help="Leiden seeds of the benchmark (0 = no benchmark).")] = 10,
    stream: Annotated[bool, typer.Option("--stream", help="Never load X: read the (CSR) file in chunks; flat host memory for atlases.")] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Cells per streamed chunk (default 100,000 with --stream; all cells otherwise).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT and its tables.")] = False,
    resume: _Resume = False,
    checkpoint_interval: _CheckpointInterval = 60.0,
) -> None:
    """Non-negative factors (scikit-learn NMF, AE-NMF, donor-conditioned AE-NMF) with the published benchmarks.

    An AE-NMF's training checkpoint is kept in OUT's name + _checkpoints until the outputs are written: after a stop, the same command with --resume continues it.
    """
    from scatlas.data.dataset import DatasetConfig
    from scatlas.settings import TrainingConfig, parse_settings
    from scatlas.tl._factors import run_factors

    kind, log = _input_kind(data, layer, input)
    dataset = parse_settings(DatasetConfig, {"name": data.stem, "path": data, "input": kind, "layer": layer, "batch_key": batch_key,
                                             "label_key": label_key})
    given = {k: v for k, v in {"max_epochs": max_epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    entry: dict[str, Any] = {"type": model, "rank": rank}
    if model == "nmf":  # scikit-learn's NMF: --max-epochs is its max_iter; the others only when given, so that it can say they do not apply
        if "max_epochs" in given:
            entry["max_iter"] = given.pop("max_epochs")
        epochs = given
    else:
        epochs = {"max_epochs": 100, "batch_size": 64, "patience": 10, "lr": 1e-2, **given}
    training = parse_settings(TrainingConfig, {**epochs, **({"chunk_size": chunk_size} if chunk_size is not None else {}),
                                               "checkpoint_interval_s": checkpoint_interval})
    tables = run_factors(dataset, entry, training, out, n_top_genes, benchmark_seeds, log=log, stream=stream, overwrite=overwrite,
                         resume=resume)
    for name, table in tables.items():
        console.print(f"benchmark by {name}:")
        console.print(_blank_missing(table).to_string(index=False))
    console.print(f"results: {out}")


@app.command("benchmark")
@_user_errors
def benchmark_command(
    data: Annotated[Path, typer.Argument(help=".h5ad or .zarr with the embeddings in .obsm.")],
    embedding: Annotated[list[str], typer.Option(help=".obsm key to score (repeatable).")],
    label_key: Annotated[str, typer.Option(help="Cell-type column.")],
    batch_key: Annotated[str, typer.Option(help="Batch column.")],
    out: Annotated[Path, typer.Option(help="Output directory (benchmark.csv, benchmark.png, report.html).")] = Path("benchmark"),
    pre_key: Annotated[str | None, typer.Option(help=".obsm key of the unintegrated reference for PCR comparison (default: PCA of X).")] = None,
    n_neighbors: Annotated[int, typer.Option(help="k of the shared kNN graph.")] = 90,
    graph: Annotated[list[str] | None, typer.Option(help="Precomputed kNN distances for an embedding: EMBEDDING=OBSP_KEY (repeatable).")] = None,
    input: Annotated[str, typer.Option(help="What the matrix of the default PCA holds: " + _INPUT_HELP)] = "auto",
    layer: Annotated[str | None, typer.Option(help=_LAYER_HELP + " For the default PCA.")] = None,
    exact: Annotated[bool | None, typer.Option("--exact/--estimate", help="Exact silhouettes and KBET, or estimated from a cell sample "
                                               "(default: exact up to 100,000 cells, estimated above).", show_default=False)] = None,
    sample_size: Annotated[int, typer.Option(min=1000, help="Cells sampled by the estimators (split equally over labels).")] = 50_000,
) -> None:
    """Score embeddings with scib-metrics' metric set (one shared kNN graph per embedding); prints each metric's time."""
    from scatlas._io import check_writable
    from scatlas.tl._benchmark import benchmark, write_benchmark
    from scatlas.data import read_anndata

    adata = read_anndata(data)
    pairs = [g.split("=", 1) for g in graph or []]
    if any(len(p) != 2 for p in pairs):
        raise InputError(f"--graph takes EMBEDDING=OBSP_KEY, got {graph}")
    check_writable(out)  # its files are written into OUT, nothing else in it is touched
    notices: list[str] = []

    def notice(line: str) -> None:
        notices.append(line)
        console.print(f"notice: {line}", highlight=False)

    table = benchmark(adata, embedding, label_key, batch_key, pre_key, n_neighbors, input, layer, graphs=dict(pairs), log=notice, exact=exact,
                      sample_size=sample_size, progress=lambda line: console.print(f"  {line}", highlight=False))
    write_benchmark(table, out, data.stem, notices)
    console.print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    console.print(f"results: {out / 'benchmark.csv'} (report: {out / 'report.html'})")


@app.command()
@_user_errors
def compare(
    output_dir: Annotated[Path, typer.Argument(help="Root of `scatlas run` outputs (holds <dataset>_outputs/).")] = Path("outputs"),
    umaps: Annotated[bool, typer.Option(help="Side-by-side UMAPs of the models' test latents.")] = True,
    genomaps: Annotated[bool, typer.Option("--genomaps", help="Genomaps of inputs, reconstructions and RE counterfactuals (split 1).")] = False,
    genomap_label: Annotated[list[str] | None, typer.Option(help="Label whose cells' genomaps are drawn (repeatable; default: the 3 most frequent).")] = None,
) -> None:
    """Compare every model of each dataset / scenario / run found under OUTPUT_DIR (tables, UMAPs, report)."""
    from scatlas.experiment.compare import compare_runs, discover

    for (dataset, scenario, run), layouts in discover(output_dir).items():
        out = compare_runs(layouts, umaps=umaps, genomaps=genomaps, genomap_labels=genomap_label)
        console.print(f"{dataset} / {scenario} / {run}: {len(layouts)} models -> {out}/report.html")


@app.command("models")
def list_models() -> None:
    """List the model types an experiment config can use."""
    from scatlas.models import REGISTRY

    table = Table(title="model types (`type:` in an experiment config)", show_lines=False)
    table.add_column("type", style="bold")
    table.add_column("what")
    for name, cls in sorted(REGISTRY.items()):
        table.add_row(name, (cls.__doc__ or "").strip().splitlines()[0].replace("``", ""))
    console.print(table)


PROGRAM_GC_THRESHOLD = (50_000, 10, 10)
"""The cyclic collector's thresholds in the ``scatlas`` program (Python's default: ``(700, 10, 10)``)."""


def main(args: list[str] | None = None) -> None:
    """Run the ``scatlas`` program: its console script and ``python -m scatlas`` (``args``: the command line, default ``sys.argv``).

    Two settings of Python's cyclic garbage collector, for the program only (:data:`app`, which
    tests and embedding processes call, leaves the collector as it is): a young generation of
    :data:`PROGRAM_GC_THRESHOLD` objects, as loading torch, anndata and SciPy otherwise runs about
    670 collections that free almost nothing, and, on the way out, everything still alive is
    frozen so that the interpreter's exit does not traverse it once more. Measured on 2 cores, a
    `transfer` of a 750-cell reference: 3.2 s → 2.55 s (0.25 s and 0.35 s), the same outputs to
    the byte. Cyclic garbage is still collected, in larger batches (the streamed commands' flat
    host memory is tested through this function).
    """
    gc.set_threshold(*PROGRAM_GC_THRESHOLD)
    try:
        app(args)
    finally:
        gc.freeze()
