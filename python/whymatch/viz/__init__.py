"""Pictures and reports of explanations."""

from .overlay import colorize, contour, mark_point, overlay, to_pil
from .report import format_table, html_table, write_avsl_report, write_report

__all__ = ["to_pil", "colorize", "overlay", "mark_point", "contour", "write_report", "write_avsl_report", "format_table",
           "html_table"]
