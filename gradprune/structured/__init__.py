"""Structured pruning: remove whole MLP neurons, attention head groups and decoder layers, so the model
really gets smaller and faster.

- :mod:`.units`: where the units are, per architecture (:data:`ARCHITECTURES`);
- :mod:`.metrics`: importance formulas (pure functions of calibration statistics);
- :mod:`.remove`: physical removal and the config update (:func:`remove_zeroed_units` for masked models);
- :mod:`.checks`: the checks of a call, before anything changes;
- :mod:`.prune`: the one-shot pipeline :func:`prune_structured`: checks, statistics
  (:func:`unit_statistics`), a plan (:func:`~.prune.plan_removal`), its application
  (:func:`~.prune.apply_plan`) and a report (:func:`~.prune.removal_report`).
"""
from .metrics import NEURON_METRICS
from .prune import UnitStatistics, parameter_count, prune_structured, unit_statistics
from .remove import Removal, apply_removal, find_zeroed_units, remove_zeroed_units
from .units import ARCHITECTURES, find_units

__all__ = ["ARCHITECTURES", "NEURON_METRICS", "Removal", "apply_removal", "find_units", "find_zeroed_units",
           "parameter_count", "prune_structured", "remove_zeroed_units", "UnitStatistics", "unit_statistics"]
