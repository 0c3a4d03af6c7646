"""Tasks: what "the model does well" means, as one number per example.

Owns: the protocol (:mod:`~headlens.importance.tasks.base`: :class:`Task`, :class:`TaskBatch`,
:func:`mean_pool`, :func:`logits_from_hidden`, :func:`next_token_loss`), the task types
(:mod:`~headlens.importance.tasks.types`: :class:`LMLossTask`, :class:`MLMLossTask`,
:class:`ContrastTask`, :class:`EmbeddingContrastTask`, :class:`FidelityTask`,
:class:`RepeatedHalfTask`, :class:`CallableTask`) and reading them from bundled names and files
(:mod:`~headlens.importance.tasks.loading`: :func:`load_task`, :func:`list_tasks`).
"""
from headlens.importance.tasks.base import Task, TaskBatch, logits_from_hidden, mean_pool, next_token_loss
from headlens.importance.tasks.loading import BUNDLED_TASKS, TEXT_TASKS, default_task_name, list_tasks, load_task
from headlens.importance.tasks.types import (
                                             CallableTask,
                                             ContrastTask,
                                             EmbeddingContrastTask,
                                             FidelityTask,
                                             LMLossTask,
                                             MLMLossTask,
                                             RepeatedHalfTask,
)

__all__ = ["Task", "TaskBatch", "mean_pool", "logits_from_hidden", "next_token_loss", "LMLossTask",
           "MLMLossTask", "FidelityTask", "CallableTask", "ContrastTask", "EmbeddingContrastTask",
           "RepeatedHalfTask", "BUNDLED_TASKS", "TEXT_TASKS", "list_tasks", "default_task_name", "load_task"]
