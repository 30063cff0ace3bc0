"""Human-in-the-loop paired comparisons: a web app for raters, the judgement store,
pair scheduling and the Bradley-Terry aggregation (``creative-sparse human ...``).

Needs the ``human`` extra (Flask, Flask-WTF, SQLAlchemy, waitress) for the store and
the app; the aggregation needs only numpy and scipy.
"""

from .._lazy import lazy_attributes

_EXPORTS = {
    "open_store": ".store", "Store": ".store", "read_judgements": ".store",
    "create_app": ".app", "serve": ".app",
    "summarise": ".aggregate", "bradley_terry": ".aggregate",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
