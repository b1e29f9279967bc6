"""Issue 14: bad input fails fast, with a named error, and changes nothing.

Each item of the issue has a test here (or next to the code it concerns, as noted), and
``test_public_entries_reject_bad_input`` is the table over the public entries: for every case the
exception type, a ``match=`` on the message, and the model's state dict and masks compared before and
after. New public arguments join the table when they are added.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gradprune import MaskRegistry, prune, prune_oneshot
from tiny_models import tiny_llama


def calib():
    return [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))]


def snapshot(model):
    registry = MaskRegistry.of(model)
    return copy.deepcopy(model.state_dict()), {k: v.clone() for k, v in registry.masks.items()}


def assert_unchanged(model, before):
    state, masks = before
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(state[k], v) or (state[k].isnan() == v.isnan()).all() for k, v in after.items())
    now = MaskRegistry.of(model).masks
    assert set(now) == set(masks) and all(torch.equal(masks[k], now[k]) for k in masks)


# -- item 5: pruning a model that already has masks -------------------------------------------------------------
def test_pruning_again_to_a_pattern_the_masks_break_is_refused():
    model = tiny_llama()
    prune_oneshot(model, "wanda", 0.5, calibration=calib(), progress=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"pattern='2:4': earlier pruning left groups of 4 with more than 2 pruned.*masks only grow"):
        prune_oneshot(model, "wanda", 0.5, "2:4", calibration=calib(), progress=False)
    assert_unchanged(model, before)


def test_pruning_again_below_the_current_sparsity_is_refused():
    model = tiny_llama()
    prune_oneshot(model, "magnitude", 0.7)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"sparsity=0.5 \(scope='row'\) is below what earlier pruning already removed"):
        prune_oneshot(model, "wanda", 0.5, calibration=calib(), progress=False)
    assert_unchanged(model, before)


def test_pruning_again_to_more_is_monotone_and_the_report_holds():
    model = tiny_llama()
    first = prune_oneshot(model, "magnitude", 0.3)
    second = prune_oneshot(model, "wanda", 0.5, calibration=calib(), progress=False)
    assert all((first["masks"][k] | ~second["masks"][k]).all() for k in first["masks"])  # nothing revived
    assert second["global"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # the same request twice is a no-op, and a 2:4 request on 2:4 masks is allowed
    again = prune_oneshot(model, "wanda", 0.5, calibration=calib(), progress=False)
    assert all(torch.equal(again["masks"][k], second["masks"][k]) for k in again["masks"])
    nm = tiny_llama()
    prune_oneshot(nm, "magnitude", 0.5, "2:4")
    report = prune_oneshot(nm, "wanda", 0.5, "2:4", calibration=calib(), progress=False)
    for mask in report["masks"].values():
        assert ((~mask).reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all()


# -- item 6: calibration ids out of range -------------------------------------------------------------------------
def test_calibration_ids_out_of_range_name_the_item_and_the_vocabulary():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration item 1 has token id 300, but the model's vocabulary has 128 ids"):
        prune_oneshot(model, "wanda", 0.5, calibration=[torch.tensor([[1, 2]]), torch.tensor([[3, 300]])])
    assert_unchanged(model, before)


# -- item 7: tied embeddings (also tests/test_targets.py) ------------------------------------------------------
def test_prune_with_include_everything_leaves_a_tied_embedding_alone():
    model = tiny_llama()
    embedding = model.get_input_embeddings().weight.detach().clone()
    prune(model, 0.5, include=".*")
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    with pytest.raises(ValueError, match="tied embeddings"):
        prune(tiny_llama(), 0.5, include=["lm_head"])


# -- item 8: non-finite weights --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_a_nan_weight_in_a_later_block_is_refused_before_any_block_is_pruned(method):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"non-finite \(NaN or inf\) weights in \['model.layers.1.mlp.up_proj.weight'\]"):
        prune_oneshot(model, method, 0.5, calibration=calib(), progress=False)
    assert_unchanged(model, before)


def test_sparsegpt_refuses_a_non_finite_update_and_leaves_that_layer():
    from gradprune.calibration import HessianStats  # noqa: F401  (the statistics type the method reads)
    from gradprune.methods.base import Job
    from gradprune.methods.sparsegpt import SPARSEGPT, prune_sparsegpt
    from gradprune.targets import find_targets

    model = tiny_llama(layers=1)
    target = find_targets(model)[0]

    class NaNHessian:
        def hessian(self):
            h = torch.eye(target.in_features, dtype=torch.float64)
            h[0, 0] = float("nan")
            return h

    weight = target.weight.detach().clone()
    registry = MaskRegistry.of(model)
    job = Job(SPARSEGPT, 0.5, "unstructured", None, {"blocksize": 128, "percdamp": 0.01, "hessian_dtype": "float32"}, registry, False)
    with pytest.raises((ValueError, RuntimeError), match=r"non-finite|not positive definite"):
        prune_sparsegpt(job, [target], {target.name: NaNHessian()})
    assert torch.equal(target.weight, weight) and not registry.masks


# -- item 11: meta device ------------------------------------------------------------------------------------------
def test_a_model_on_the_meta_device_is_refused_by_name():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="weights on the meta device"):
        prune_oneshot(model, "magnitude", 0.5)
