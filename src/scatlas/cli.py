"""Command-line interface: a thin layer over the API (``scatlas --help``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from scatlas._errors import ScatlasError

app = typer.Typer(
    help="scatlas: batch-aware embeddings, annotation, label transfer and benchmarks for single-cell data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Print a :class:`ScatlasError` as one line on stderr and exit with code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ScatlasError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

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
    resume: Annotated[bool, typer.Option(help="Skip finished splits; continue unfinished ones from their last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Train and evaluate every model of CONFIG on every split, writing the standard output layout."""
    from scatlas.experiment import load_config, run_experiment

    cfg = load_config(config)
    result = run_experiment(cfg, output_dir=output_dir, resume=resume, progress=not quiet, log=console.print)
    _print_summary(result.summary)
    for name, layout in result.layouts.items():
        figures = f" (figures: {layout.figures_dir})" if layout.figures_dir.exists() else ""
        console.print(f"{name}: {layout.latent_dir}{figures}", soft_wrap=True)


@app.command()
@_user_errors
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the demo writes its data and results.")] = Path("outputs/demo"),
    epochs: Annotated[int, typer.Option(help="Maximum training epochs per model.")] = 40,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Run PCA, AE and AEC on real PBMCs shipped with scanpy (3 folds) and show where the results are."""
    from scatlas._io import atomic_path
    from scatlas.data.datasets import DEMO_NOTE, demo_pbmc
    from scatlas.experiment import ExperimentConfig, run_experiment

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
            "models": [{"type": "pca"}, {"type": "ae", "dropout": 0.1}, {"type": "aec", "dropout": 0.1}],
            "output": {"dir": str(output_dir), "run": "demo"},
        }
    )
    result = run_experiment(cfg, output_dir=output_dir, resume=True, progress=not quiet, log=console.print)
    _print_summary(result.summary)
    console.print(f"\nResults: {output_dir / 'demo_pbmc_outputs' / 'latent_space'}")
    console.print(f"Figures: {output_dir / 'demo_pbmc_outputs' / 'figures'} (UMAPs by label and batch, loss curves)")


@app.command()
@_user_errors
def validate(
    data: Annotated[Path, typer.Argument(help=".h5ad file to check.")],
    batch_key: Annotated[str | None, typer.Option(help="Batch / donor column.")] = None,
    label_key: Annotated[str | None, typer.Option(help="Cell-type column.")] = None,
    layer: Annotated[str | None, typer.Option(help="Layer holding the matrix (default .X).")] = None,
    counts: Annotated[bool, typer.Option("--counts/--lognorm", help="Require raw integer counts.")] = True,
) -> None:
    """Check a dataset the way `scatlas run` will, and report what is wrong."""
    from scatlas.data import read_h5ad
    from scatlas.data import validate as check

    adata = read_h5ad(data, backed=True)
    check(adata, batch_key=batch_key, label_key=label_key, layer=layer, require_counts=counts)
    console.print(f"{data}: OK ({adata.n_obs} cells × {adata.n_vars} genes)")


@app.command("models")
def list_models() -> None:
    """List the model types an experiment config can use."""
    from scatlas.models import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        console.print(f"{name:8s} {(cls.__doc__ or '').strip().splitlines()[0]}")


