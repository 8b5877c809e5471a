"""One self-contained HTML page per run: no external files, no network, readable offline.

Figures are embedded as base64 PNG, tables are plain HTML that a few lines of inline
JavaScript make sortable by clicking a column header. The first section is the headline.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from scatlas._io import write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#666;font-size:.85rem} table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right} th{background:#f3f3f3;cursor:pointer;user-select:none}
td:first-child,th:first-child{text-align:left} tr:nth-child(even){background:#fafafa}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top} figure img{max-width:560px;border:1px solid #eee}
figcaption{font-size:.8rem;color:#555} p.note{font-size:.9rem}
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


@dataclass
class Section:
    """A titled part of a report: a note, tables and figures."""

    title: str
    tables: Sequence[pd.DataFrame] = ()
    figures: Sequence[Path] = ()
    note: str = ""
    captions: Sequence[str] = field(default_factory=list)


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, classes="sortable", border=0, float_format=lambda v: f"{v:.4g}", na_rep="", escape=True)


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
        Content; figures that do not exist are skipped.
    """
    from scatlas import __version__

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(subtitle)} · scatlas {__version__} · {stamp}</p>"]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.note:
            parts.append(f"<p class='note'>{html.escape(section.note)}</p>")
        parts.extend(_table(t) for t in section.tables)
        captions = list(section.captions) + [Path(f).stem for f in section.figures[len(section.captions):]]
        parts.extend(_figure(Path(f), c) for f, c in zip(section.figures, captions, strict=True) if Path(f).exists())
        parts.append("</section>")
    parts.append(f"<script>{_SORT}</script></body></html>")
    return write_text("\n".join(parts), path)
