"""Evaluation: task prompt sets (tune, held-out and evaluation splits) for tuning and reports.

    >>> from creative_sparse.evaluation import list_tasks, load_task
    >>> "poetry" in list_tasks()
    True
"""

from .tasks import CodeTest, Task, list_tasks, load_task

__all__ = ["CodeTest", "Task", "list_tasks", "load_task"]
