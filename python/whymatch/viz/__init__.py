"""Pictures and reports of explanations."""

from .overlay import colorbar, colorize, contour, is_constant, mark_point, overlay, to_pil
from .report import (METRICS, MetricInfo, format_table, html_table, metric_label, write_avsl_report,
                     write_ranked_report, write_report)

__all__ = ["to_pil", "colorize", "colorbar", "is_constant", "overlay", "mark_point", "contour", "write_report",
           "write_ranked_report", "write_avsl_report", "format_table", "html_table", "METRICS", "MetricInfo",
           "metric_label"]
