"""One self-contained HTML page per run: no external files, no network, readable offline.

Figures are embedded as base64 PNG, tables are plain HTML that a few lines of inline
JavaScript make sortable by clicking a column header, and confusion matrices are HTML tables
shaded by each row's share (no figure needed). The first section is the headline.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from scatlas._io import write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#666;font-size:.85rem} table{border-collapse:collapse;font-size:.8rem;margin:.6rem 0;max-width:100%}
th,td{border:1px solid #ddd;padding:.2rem .4rem;text-align:right} th{background:#f3f3f3;cursor:pointer;user-select:none;white-space:normal;max-width:9em;vertical-align:bottom;font-weight:600}
td:first-child,th:first-child{text-align:left} tr:nth-child(even){background:#fafafa}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top} figure img{max-width:560px;border:1px solid #eee}
figcaption{font-size:.8rem;color:#555} p.note{font-size:.9rem}
table.heatmap td{min-width:2.5em} table.heatmap th{cursor:default}
"""

_SORT = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var body=t.tBodies[0], rows=Array.from(body.rows), asc=th.dataset.asc!=='1';
      rows.sort(function(a,b){var x=a.cells[i].innerText,y=b.cells[i].innerText,nx=parseFloat(x),ny=parseFloat(y);
        if(!isNaN(nx)&&!isNaN(ny)){return asc?nx-ny:ny-nx} return asc?x.localeCompare(y):y.localeCompare(x)});
      rows.forEach(function(r){body.appendChild(r)}); th.dataset.asc=asc?'1':'0';
    });
  });
});
"""


#: Readable names of the metric columns scatlas writes, with the direction that is better.
METRIC_NAMES: dict[str, str] = {
    "silhouette_label": "ASW label (raw) ↑",
    "silhouette_batch": "ASW batch (raw) ↓",
    "silhouette_label_scib": "ASW label (scib) ↑",
    "silhouette_batch_scib": "ASW batch (scib, 1 = mixed) ↑",
    "davies_bouldin_label": "Davies–Bouldin label ↓",
    "davies_bouldin_batch": "Davies–Bouldin batch ↑",
    "calinski_harabasz_label": "Calinski–Harabasz label ↑",
    "calinski_harabasz_batch": "Calinski–Harabasz batch ↓",
    "kmeans_ari": "k-means ARI ↑",
    "kmeans_nmi": "k-means NMI ↑",
    "n_cells": "cells",
    "accuracy": "accuracy ↑",
    "balanced_accuracy": "balanced accuracy ↑",
    "macro_f1": "macro F1 ↑",
    "micro_f1": "micro F1 ↑",
    "weighted_f1": "weighted F1 ↑",
    "f1": "F1 ↑",
    "precision": "precision ↑",
    "recall": "recall ↑",
    "support": "cells (support)",
    "unknown_fraction": "share called unknown",
    "ece_before": "ECE before ↓",
    "ece_after": "ECE after ↓",
    "ece_with_fitted": "ECE at the fitted temperature ↓",
    "temperature_fitted": "fitted temperature",
    "n_cells_unseen_label": "cells of labels the reference lacks",
    "n_cells_unlabelled": "cells without a label",
    "map": "mAP ↑",
    "precision_at_r": "precision@R ↑",
    "Total": "Total ↑",
    "Bio conservation": "Bio conservation ↑",
    "Batch correction": "Batch correction ↑",
}


@dataclass
class Section:
    """A titled part of a report: a note, tables, confusion matrices and figures.

    ``heatmaps`` are count tables (e.g. :func:`~scatlas.metrics.annotation.confusion_counts`: true
    labels as rows), each shown with every cell shaded by its share of the row. ``nan_reasons``
    says why a column can be undefined (NaN); a column that is NaN in every row gets that sentence
    (or a generic one) under the table instead of an unexplained empty column.
    """

    title: str
    tables: Sequence[pd.DataFrame] = ()
    figures: Sequence[Path] = ()
    note: str = ""
    captions: Sequence[str] = field(default_factory=list)
    nan_reasons: dict[str, str] = field(default_factory=dict)
    heatmaps: Sequence[pd.DataFrame] = ()

    def is_empty(self) -> bool:
        """No table, no heatmap, no existing figure and no note: the section is left out of the page."""
        return (not self.note and not any(len(t) for t in [*self.tables, *self.heatmaps])
                and not any(Path(f).exists() for f in self.figures))


def _nan_sentence(df: pd.DataFrame, reasons: dict[str, str]) -> str:
    empty = [c for c in df.columns if df[c].isna().all()]
    if not empty or df.empty:
        return ""
    lines = [f"{METRIC_NAMES.get(c, c)}: {reasons.get(c, 'undefined on these data (e.g. a single batch, or no label present in two batches)')}."
             for c in empty]
    return f"<p class='note'>Empty columns — {html.escape(' '.join(lines))}</p>"


def mean_ci_table(ci: pd.DataFrame, index: str | list[str], order: Sequence[str] = (), first: str | None = None) -> pd.DataFrame:
    """A long ``fold_summary`` table (``metric``, ``mean``, ``ci_high``) as one row per ``index``, one ``mean ± half-width`` cell per metric.

    ``order`` puts those metrics first; ``first`` puts the row whose (first) index value starts
    with it on top (e.g. ``"PCA"``, the unintegrated reference); other rows keep their order.
    """
    index = [index] if isinstance(index, str) else list(index)
    cells = ci.assign(cell=[f"{m:.3f} ± {h - m:.3f}" if np.isfinite(h) else f"{m:.3f}" for m, h in zip(ci["mean"], ci["ci_high"], strict=True)])
    table = cells.pivot_table(index=index, columns="metric", values="cell", aggfunc="first", sort=False)
    columns = [m for m in order if m in table] + [m for m in table.columns if m not in order and m != "n_cells"]
    rows = sorted(table.index, key=lambda r: not (first and str(r[0] if isinstance(r, tuple) else r).upper().startswith(first.upper())))
    return table.loc[rows, columns].rename_axis(columns=None).reset_index()


def _table(df: pd.DataFrame, reasons: dict[str, str] | None = None) -> str:
    shown = df.rename(columns=lambda c: METRIC_NAMES.get(str(c), str(c)))
    if "metric" in shown:
        shown["metric"] = shown["metric"].map(lambda m: METRIC_NAMES.get(str(m), m))
    table = shown.to_html(index=False, classes="sortable", border=0, float_format=lambda v: f"{v:.4g}", na_rep="", escape=True)
    return table + _nan_sentence(df, reasons or {})


def _heatmap(counts: pd.DataFrame) -> str:
    """A count table as HTML, each cell shaded by its share of its row (the count shown, the share on hover)."""
    share = counts.to_numpy() / np.maximum(counts.to_numpy().sum(1, keepdims=True), 1)
    corner = html.escape(f"{counts.index.name or ''} \\ {counts.columns.name or ''}".strip(" \\"))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in counts.columns)
    body = []
    for label, values, shares in zip(counts.index, counts.to_numpy(), share, strict=True):
        cells = "".join(f"<td style='background:rgba(33,113,181,{f:.2f});color:{'#fff' if f > 0.6 else '#222'}' title='{f:.1%}'>{v if v else ''}</td>"
                        for v, f in zip(values, shares, strict=True))
        body.append(f"<tr><th>{html.escape(str(label))}</th>{cells}</tr>")
    return f"<table class='heatmap'><thead><tr><th>{corner}</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def write_report(path: str | Path, title: str, sections: Sequence[Section], subtitle: str = "") -> Path:
    """Write the report atomically; sections in order (put the headline table first).

    Parameters
    ----------
    path
        Output ``.html`` file.
    title, subtitle
        Page heading and a line under it (e.g. the command that produced it).
    sections
        Content; figures that do not exist are skipped, and so are sections left with nothing.
        Known metric columns are shown with readable names and the better direction (↑ / ↓).
    """
    from scatlas import __version__

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(subtitle)} · scatlas {__version__} · {stamp}</p>"]
    for section in sections:
        if section.is_empty():
            continue
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.note:
            parts.append(f"<p class='note'>{html.escape(section.note)}</p>")
        parts.extend(_table(t, section.nan_reasons) for t in section.tables if len(t))
        parts.extend(_heatmap(h) for h in section.heatmaps if len(h))
        captions = list(section.captions) + [Path(f).stem for f in section.figures[len(section.captions):]]
        parts.extend(_figure(Path(f), c) for f, c in zip(section.figures, captions, strict=True) if Path(f).exists())
        parts.append("</section>")
    parts.append(f"<script>{_SORT}</script></body></html>")
    return write_text("\n".join(parts), path)
