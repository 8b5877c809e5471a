"""Comparison of every model of a scenario/run found in an output tree (``scatlas compare``).

Reads ``latent_space/<scenario>/<model>/<run>/all_scores_<part>_samplesize-<n>.csv`` and writes
``compare_models/<scenario>/<run>/``: ``<part>_allscores.csv`` (one row per model and split),
``<part>_scores_<n>_95CI.csv`` (mean, SD, SEM, t interval), ``<part>_<n>.csv`` (mean / SEM / SD
per model and metric, wide), ``<part>_scores_<n>_{min,max}_silhouette_batch.csv`` (each model's
split with the lowest / highest batch ASW), UMAPs of every model's test latent side by side
(``umap_models.png`` + ``umap_coordinates.csv``) and ``report.html``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from scatlas._errors import InputError
from scatlas._io import write_csv
from scatlas.experiment.layout import RunLayout, compare_dir, safe_name
from scatlas.metrics.stats import fold_summary
from scatlas.plot.figures import umap_coordinates
from scatlas.report.html import Section, mean_ci_table, write_report

_SCORES = re.compile(r"^all_scores_(train|val|test)_samplesize-(\d+)\.csv$")


def discover(root: str | Path) -> dict[tuple[str, str, str], list[RunLayout]]:
    """``(dataset, scenario, run) → layouts`` of every model with aggregated scores under ``root`` (or, given one
    ``<dataset>_outputs`` folder, of that dataset only)."""
    root = Path(root)
    only = None
    if root.name.endswith("_outputs") and (root / "latent_space").is_dir():  # one dataset's folder: its runs
        only, root = root.name.removesuffix("_outputs"), root.parent
    found: dict[tuple[str, str, str], list[RunLayout]] = {}
    for scores in sorted(root.glob(f"{only or '*'}_outputs/latent_space/*/*/*/all_scores_*_samplesize-*.csv")):
        run_dir = scores.parent
        run, model, scenario = run_dir.name, run_dir.parent.name, run_dir.parent.parent.name
        dataset = run_dir.parents[3].name.removesuffix("_outputs")
        layout = RunLayout(root, dataset, scenario, model, run)
        group = found.setdefault((dataset, scenario, run), [])
        if layout not in group:
            group.append(layout)
    if not found:
        where = root / f"{only}_outputs" if only else root
        hint = "; give the folder holding <dataset>_outputs/ (`scatlas run`'s output.dir)" if where.is_dir() and not only else ""
        raise InputError(f"{where}: no scatlas run outputs (<dataset>_outputs/latent_space/<scenario>/<model>/<run>/all_scores_*.csv) found{hint}")
    return found


def _extremes(table: pd.DataFrame, how: str) -> pd.DataFrame:
    if "silhouette_batch" not in table or table["silhouette_batch"].isna().all():
        return table.iloc[0:0]
    pick = table.groupby("model")["silhouette_batch"].idxmin() if how == "min" else table.groupby("model")["silhouette_batch"].idxmax()
    return table.loc[pick.dropna()]


HEADLINE = ("silhouette_label", "silhouette_batch", "silhouette_label_scib", "silhouette_batch_scib", "kmeans_ari", "kmeans_nmi")


def _umaps(layouts: list[RunLayout], out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    from scatlas._io import save_figure

    panels = []
    for lay in layouts:
        split = lay.split_dir(1)
        latents = [p for p in split.glob("*_test.npy") if not p.name.startswith("recon")] if split.is_dir() else []
        obs = split / "obs_test.csv"
        if latents and obs.exists():
            coords = umap_coordinates(np.load(latents[0]))
            panels.append((lay.model, coords, pd.read_csv(obs)))
    if not panels:
        return None
    write_csv(pd.concat([o.assign(model=m, umap1=c[:, 0], umap2=c[:, 1]) for m, c, o in panels], ignore_index=True), out / "umap_coordinates.csv")
    keys = [k for k in ("label", "batch") if k in panels[0][2]]
    fig, axes = plt.subplots(len(keys), len(panels), figsize=(3.2 * len(panels) + 2.0, 3.2 * len(keys)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for i, key in enumerate(keys):
        categories = sorted(set().union(*(o[key].astype(str) for _, _, o in panels)))
        for j, (model, coords, obs) in enumerate(panels):
            values = obs[key].astype(str).to_numpy()
            for c, category in enumerate(categories):  # same colour for a category in every panel
                mask = values == category
                axes[i, j].scatter(coords[mask, 0], coords[mask, 1], color=cmap(c % 20), s=4, linewidths=0, label=category)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].set_title(f"{model} — {key}", fontsize=8)
        axes[i, -1].legend(markerscale=2.5, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5), title=key)
    fig.tight_layout()
    return save_figure(fig, out / "umap_models.png")


def _genomaps(layouts: list[RunLayout], out: Path, labels: list[str] | None, n_labels: int = 3) -> list[Path]:
    """Genomaps of mean test profiles per chosen label: input, reconstruction and counterfactuals, one figure per model (split 1)."""
    from scatlas.plot.genomap import genomap_figure, genomap_layout

    usable = [lay for lay in layouts if all((lay.split_dir(1) / f).exists() for f in ("input_test.npy", "recon_test.npy", "obs_test.csv"))]
    if not usable or "label" not in pd.read_csv(usable[0].split_dir(1) / "obs_test.csv", nrows=1):
        return []
    first = usable[0].split_dir(1)
    observed = pd.read_csv(first / "obs_test.csv")["label"].astype(str)
    chosen = labels or list(observed.value_counts().index[:n_labels])
    missing = sorted(set(chosen) - set(observed))
    if missing:
        raise InputError(f"genomap labels {missing} not among the test cells' labels {sorted(set(observed))}")
    layout = genomap_layout(np.load(first / "input_test.npy"))
    write_csv(pd.DataFrame({"gene_index": layout.genes, "row": layout.pixel // layout.side, "col": layout.pixel % layout.side}), out / "genomap_layout.csv")
    figures = []
    for lay in usable:
        split = lay.split_dir(1)
        label = pd.read_csv(split / "obs_test.csv")["label"].astype(str).to_numpy()
        profiles = {"input": np.load(split / "input_test.npy"), "reconstruction": np.load(split / "recon_test.npy")}
        if (split / "counterfactual_batches_test.csv").exists():
            for row in pd.read_csv(split / "counterfactual_batches_test.csv").itertuples():
                profiles[f"as if {row.batch}"] = np.load(split / row.file)
        panels = {t: {name: values[label == t].mean(0) for name, values in profiles.items()} for t in chosen}
        figures.append(genomap_figure(panels, layout, out / f"genomaps_{safe_name(lay.model)}.png", f"{lay.model}: mean test profiles (split 1)"))
    return figures


def compare_runs(layouts: list[RunLayout], umaps: bool = True, genomaps: bool = False, genomap_labels: list[str] | None = None) -> Path | None:
    """Write the comparison of ``layouts`` (models of one dataset / scenario / run); return its directory.

    With ``genomaps``, also genomaps (genes placed by Gromov–Wasserstein on the test inputs) of the
    mean input, reconstruction and — for scMEDAL-RE — counterfactual reconstructions of the cells of
    ``genomap_labels`` (default: the three most frequent labels), one figure per model.
    """
    if not layouts:
        return None
    first = layouts[0]
    out = compare_dir(first.root, first.dataset, first.scenario, first.run)
    sections: list[Section] = []
    for part in ("test", "val", "train"):
        frames, size = [], None
        for lay in layouts:
            for path in lay.latent_dir.glob(f"all_scores_{part}_samplesize-*.csv"):
                size = _SCORES.match(path.name).group(2)  # type: ignore[union-attr]
                frames.append(pd.read_csv(path))
        if not frames:
            continue
        table = pd.concat(frames, ignore_index=True)
        ci = fold_summary(table.drop(columns=["split"]), by=["model"])
        write_csv(table, out / f"{part}_allscores.csv")
        write_csv(ci, out / f"{part}_scores_{size}_95CI.csv")
        write_csv(ci.pivot_table(index=["model", "metric"], values=["mean", "sem", "sd"]).reset_index(), out / f"{part}_{size}.csv")
        for how in ("min", "max"):
            write_csv(_extremes(table, how), out / f"{part}_scores_{size}_{how}_silhouette_batch.csv")
        if part == "test":
            sections.append(Section("Test cells: mean ± 95% CI half-width over folds", [mean_ci_table(ci, "model", HEADLINE, first="PCA")],
                                    note=f"↑ higher is better, ↓ lower is better. ASW = average silhouette width (raw, −1…1); "
                                         f"scib = scib-metrics' scaling (0…1). The reference (PCA) comes first. Every fold's value: {part}_allscores.csv."))
    figure = _umaps(layouts, out) if umaps else None
    if figure is not None:
        sections.append(Section("Test latents side by side (split 1)", [], [figure], captions=["UMAP per model, coloured by label (top) and batch"]))
    if genomaps:
        figures = _genomaps(layouts, out, genomap_labels)
        if figures:
            sections.append(Section("Genomaps", [], figures, captions=[f.stem for f in figures],
                                    note="Genes on a grid by Gromov–Wasserstein (co-expressed genes close); layout in genomap_layout.csv."))
    for lay in layouts:
        figs = [lay.figures_dir / "avg_loss.png", lay.figures_dir / "splits_1" / "umap_test.png"]
        tables = [pd.read_csv(lay.latent_dir / "metrics_allfolds_95CI.csv")] if (lay.latent_dir / "metrics_allfolds_95CI.csv").exists() else []
        sections.append(Section(lay.model, tables, figs, captions=["mean loss over folds", "UMAP of test latent (split 1)"]))
    write_report(out / "report.html", f"{first.dataset}: {first.scenario} / {first.run}", sections, f"{len(layouts)} models")
    return out
