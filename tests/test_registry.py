"""One table of methods: the one-shot methods and the train-time scorers are views of it, under the same
names, and register_method is how a method joins both."""
import pytest
import torch
from torch import nn

import gradprune as gp
from gradprune.methods import METHODS, SCORERS, Method, register_method
from gradprune.methods.registry import _TABLE  # noqa: F401  (the test restores the table it changes)
from gradprune.scorers import get_scorer, scorer_names


def test_one_table_two_views():
    assert list(METHODS) == ["magnitude", "wanda", "sparsegpt", "ria"]
    assert list(SCORERS) == ["magnitude", "wanda", "sparsegpt", "ria", "taylor"]
    assert scorer_names() == sorted(SCORERS)
    for name in METHODS:  # a one-shot method is also a train-time scorer, of the same statistics
        assert SCORERS[name] is METHODS[name]
    assert {name: get_scorer(name).needs for name in SCORERS} == {
        "magnitude": "weights", "wanda": "activations", "sparsegpt": "hessians", "ria": "activations", "taylor": "gradients"}
    with pytest.raises(KeyError):
        METHODS["taylor"]  # gradients exist only during training


def test_wanda_scores_exist_once():
    layer = nn.Linear(4, 3)
    target = gp.find_targets(nn.Sequential(layer))[0]
    sum_sq = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    expected = layer.weight.detach().abs() * sum_sq.sqrt().float()
    assert torch.equal(get_scorer("wanda").score(target, sum_sq), expected)


def test_register_method_adds_to_both_views(monkeypatch):
    monkeypatch.setattr("gradprune.methods.registry._TABLE", dict(_TABLE))
    score = lambda target, statistic: -target.weight.detach().abs()  # noqa: E731
    register_method(Method("negative", score=score, train_score=score))
    assert "negative" in METHODS and "negative" in scorer_names()
    with pytest.raises(ValueError, match="'negative' is registered already"):
        register_method(Method("negative", score=score))
    model = nn.Sequential(nn.Linear(8, 8))
    gp.prune_oneshot(model, "negative", 0.5, calibration=None)
    kept = model[0].weight != 0
    assert int(kept.sum()) == 32  # the largest magnitudes went first


def test_method_entries_are_checked():
    with pytest.raises(ValueError, match="needs a score or a prune function"):
        Method("nothing")
    with pytest.raises(ValueError, match="gradient statistics exist only during training"):
        Method("bad", statistics="gradient", score=lambda t, s: t.weight)
