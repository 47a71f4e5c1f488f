"""Training: P x K sampling, a reusable Trainer (exact resume, DDP, AMP, Recall@K), task wiring.

``whymatch train mining`` trains with the similarity-mining loss (:mod:`whymatch.mining`)
through :func:`train_mining`; ``whymatch train avsl`` trains AVSL through :func:`train_avsl`
(:class:`AVSLTrainer`, a :class:`Trainer` evaluating on AVSL's distance); SANE will reuse
:class:`Trainer` too.
"""

from .sampler import PKSampler
from .tasks import (BACKBONES, DATASETS, METRIC_LOSSES, MiningConfig, TensorImages, TrainConfig, build_backbone,
                    build_data, build_metric_loss, train_mining)
from .trainer import BEST, CHECKPOINT, METRICS_LOG, Trainer, random_flip
from .avsl_task import AVSLConfig, AVSLTrainer, avsl_recall_at_k, build_avsl_model, train_avsl

__all__ = ["PKSampler", "Trainer", "random_flip", "CHECKPOINT", "BEST", "METRICS_LOG", "BACKBONES", "DATASETS",
           "METRIC_LOSSES", "TrainConfig", "MiningConfig", "TensorImages", "build_backbone", "build_data", "build_metric_loss",
           "train_mining", "AVSLConfig", "AVSLTrainer", "avsl_recall_at_k", "build_avsl_model", "train_avsl"]
