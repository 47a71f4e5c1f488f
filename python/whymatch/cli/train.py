"""`whymatch train`: the group of the training commands, one module each (train_mining, train_avsl, train_sane)."""

from __future__ import annotations

from . import train_avsl, train_mining, train_sane

NAME = "train"
HELP = "train a similarity model (run under torchrun for DDP)"
#: the tasks, `whymatch train TASK` (``dest`` of the task: ``args.task``)
TASKS = (train_mining, train_avsl, train_sane)
