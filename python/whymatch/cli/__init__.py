"""The `whymatch` command: info, demo, explain, search-explain, explain-avsl, train (mining, avsl, sane).

Every failure is one line ``whymatch <command>: error: ...`` on stderr with exit status 2 (Ctrl-C: 130); set
WHYMATCH_DEBUG=1 for the traceback of an unexpected one. Options are checked while parsing (ranges, finite
numbers, devices, data roots, factory specs); output directories, input images and run files are checked when
the command starts, before any model, data or explanation work.

One module per command (``info``, ``demo``, ``explain``, ``search_explain``, ``explain_avsl``, ``train_mining``,
``train_avsl``, ``train_sane``), each with its ``cmd_*`` function and an ``add_parser(sub)`` that adds its
subcommand; ``app`` holds the parser and :func:`main`, ``option_types`` the argparse types, ``checks`` the checks
made before any work, ``common`` what the explaining commands share (their explainer options come from
:func:`whymatch.saliency.registry.cli_options`), ``train`` the group of the training tasks and ``training``
what the training commands share.
"""

from __future__ import annotations

from .app import build_parser, keep_freed_memory, main
from .demo import DEMO_CPU_MASKS, cmd_demo
from .explain import cmd_explain
from .explain_avsl import cmd_explain_avsl
from .info import cmd_info
from .option_types import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from .search_explain import cmd_search_explain
from .training import _GROUPS_HELP  # noqa: F401 (re-exported: the help's parameter groups, checked by the tests)
from .train_avsl import cmd_train_avsl
from .train_mining import cmd_train_mining
from .train_sane import cmd_train_sane

__all__ = ["DEMO_CPU_MASKS", "MAX_IMAGE_SIDE", "MIN_IMAGE_SIDE", "build_parser", "cmd_demo", "cmd_explain",
           "cmd_explain_avsl", "cmd_info", "cmd_search_explain", "cmd_train_avsl", "cmd_train_mining",
           "cmd_train_sane", "keep_freed_memory", "main"]
