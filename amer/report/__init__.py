"""Writers shared by every report (curvature, benchmarks, experiments): JSON, Markdown and plain-text
tables, and PNG figures. Every file is written to a temporary sibling and renamed into place, so a report
on disk is complete or absent, never half written."""

from amer.report.writers import atomic_write_text, dumps_json, md_table, new_figure, save_figure, text_table, write_json

__all__ = ["atomic_write_text", "dumps_json", "md_table", "new_figure", "save_figure", "text_table", "write_json"]
