"""The one table of pruning methods: one :class:`~gradprune.methods.base.Method` entry per name, read by
the one-shot pipeline (:data:`METHODS`, the entries with one-shot scoring) and by the gradual callback
(:data:`SCORERS`, the entries with train-time scoring; :mod:`gradprune.scorers` is a view of it).

:func:`register_method` is the one way to add a method; :mod:`gradprune.methods` registers the built-in
ones (magnitude, wanda, sparsegpt, ria, taylor) when it is imported.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping

from .base import Method

_TABLE: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the table under ``method.name``: a one-shot method (``prune_oneshot(method=name)``,
    the one-shot callbacks) if it has ``score`` or ``prune``, a train-time scorer
    (``GradualPruningCallback(scorer=name)``) if it has ``train_score`` or ``train_prune``.

    Raises ValueError if the name is taken, unless ``replace``. Returns ``method``."""
    if not isinstance(method, Method):
        raise TypeError(f"method must be a gradprune.methods.Method, got {type(method).__name__}")
    if method.name in _TABLE and not replace:
        raise ValueError(f"a method named {method.name!r} is registered already; pass replace=True to replace it")
    _TABLE[method.name] = method
    return method


class MethodView(Mapping[str, Method]):
    """A live, read-only view of the table: the entries that ``keep`` accepts, in registration order."""

    def __init__(self, keep: Callable[[Method], bool], what: str) -> None:
        self._keep, self._what = keep, what

    def __getitem__(self, name: str) -> Method:
        method = _TABLE.get(name)
        if method is None or not self._keep(method):
            raise KeyError(name)
        return method

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, method in _TABLE.items() if self._keep(method)])

    def __len__(self) -> int:
        return sum(1 for method in _TABLE.values() if self._keep(method))

    def __repr__(self) -> str:
        return f"<{self._what}: {list(self)}>"


#: The one-shot methods by name (``prune_oneshot(method=...)``): entries with ``score`` or ``prune``.
METHODS: Mapping[str, Method] = MethodView(lambda method: method.one_shot, "one-shot methods")
#: The train-time scorers by name (``GradualPruningCallback(scorer=...)``): entries with ``train_score``
#: or ``train_prune``.
SCORERS: Mapping[str, Method] = MethodView(lambda method: method.train_time, "train-time scorers")
