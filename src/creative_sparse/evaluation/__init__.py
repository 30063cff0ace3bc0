"""Evaluation protocol (runner, records, tables); re-exports the task sets of :mod:`creative_sparse.tasks`.

    >>> from creative_sparse.evaluation import list_tasks, load_task
    >>> "poetry" in list_tasks()
    True
"""

from ..tasks import CodeTest, Task, list_tasks, load_task

__all__ = ["CodeTest", "Task", "list_tasks", "load_task"]
