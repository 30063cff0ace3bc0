"""Evaluation: task prompt sets (with a held-out split) for tuning and reports.

    >>> from creative_sparse.evaluation import list_tasks, load_task
    >>> "poetry" in list_tasks()
    True
"""

from .tasks import Task, list_tasks, load_task

__all__ = ["Task", "list_tasks", "load_task"]
