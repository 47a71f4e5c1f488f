"""Training: one loop (:class:`CheckpointedLoop`: exact resume, DDP, AMP, best.pt), P x K sampling, a
metric-learning Trainer (Recall@K), task wiring; the torch.distributed helpers in :mod:`.distributed`.

``whymatch train mining`` trains with the similarity-mining loss (:mod:`whymatch.mining`)
through :func:`train_mining`; ``whymatch train avsl`` trains AVSL through :func:`train_avsl`
(:class:`AVSLTrainer`, a :class:`Trainer` evaluating on AVSL's distance); ``whymatch train sane``
runs :class:`whymatch.attributes.train.AttributeTrainer`, the same loop. The Trainer's parameter groups (:class:`ParamGroup`), 'cosine' / 'step' /
'none' schedules, warm-up and group freezing serve every task; ``AVSLConfig.from_recipe('published',
...)`` sets the published AVSL recipe.
"""

from .checkpoint import RESUMABLE, RUN_FILES
from .loop import CheckpointedLoop
from .sampler import PKSampler
from .tasks import (BACKBONES, DATASETS, METRIC_LOSSES, MiningConfig, TensorImages, TrainConfig, build_backbone,
                    build_data, build_metric_loss, mining_group_layout, schedule_kwargs, task_param_groups,
                    train_mining)
from .trainer import BEST, CHECKPOINT, METRICS_LOG, SCHEDULERS, ParamGroup, Trainer, assign_param_groups, random_flip
from .avsl_task import (AVSL_GROUPS, AVSL_RECIPES, AVSLConfig, AVSLTrainer, avsl_recall_at_k, build_avsl_model,
                        published_avsl_recipe, train_avsl)

__all__ = ["RESUMABLE", "RUN_FILES", "CheckpointedLoop", "PKSampler", "Trainer", "ParamGroup", "assign_param_groups", "SCHEDULERS", "random_flip", "CHECKPOINT",
           "BEST", "METRICS_LOG", "BACKBONES", "DATASETS", "METRIC_LOSSES", "TrainConfig", "MiningConfig",
           "TensorImages", "build_backbone", "build_data", "build_metric_loss", "mining_group_layout",
           "task_param_groups", "schedule_kwargs", "train_mining", "AVSLConfig", "AVSLTrainer", "AVSL_GROUPS",
           "AVSL_RECIPES", "published_avsl_recipe", "avsl_recall_at_k", "build_avsl_model", "train_avsl"]
