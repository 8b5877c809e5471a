"""Self-contained HTML reports (figures embedded, tables sortable, headline table first)."""

from scatlas.report.html import Section, write_report

__all__ = ["Section", "write_report"]
