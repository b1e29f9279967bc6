"""SparseGPT against a transcription of the reference algorithm (tests/sparsegpt_reference.py): one layer,
given the same Hessian, must give the same keep-mask and the same updated weights, unstructured and for
every N:M pattern (2:4, 4:8 and others take one path); and prune_oneshot must hand each layer's own
Hessian and weight to that routine."""
from __future__ import annotations

import pytest
import torch

from gradprune import prune_oneshot
from gradprune.methods import sparsegpt as sparsegpt_module
from gradprune.methods.sparsegpt import sparsegpt_prune
from sparsegpt_reference import reference_hessian, reference_sparsegpt
from tiny_models import tiny_llama

PATTERNS = [None, (2, 4), (4, 8), (1, 4), (3, 4), (2, 8)]


def layer(rows: int = 24, columns: int = 320, tokens: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the reference Hessian of correlated inputs with an outlier channel and a dead one."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) / columns ** 0.5 + torch.eye(columns)
    x = torch.randn(4, tokens // 4, columns, generator=g) @ mixing
    x[..., 7] *= 30.0  # an outlier channel, as LLaMA-family activations have
    x[..., 11] = 0.0  # a dead input
    return torch.randn(rows, columns, generator=g), reference_hessian(x.unbind(0))


def sparsity_of(nm):
    return 0.5 if nm is None else nm[0] / nm[1]


@pytest.mark.parametrize("nm", PATTERNS, ids=lambda nm: "unstructured" if nm is None else f"{nm[0]}of{nm[1]}")
@pytest.mark.parametrize("blocksize", [128, 64])
def test_one_layer_matches_the_reference_given_the_same_hessian(nm, blocksize):
    weight, hessian = layer()
    s = sparsity_of(nm)
    ours_w, ours_keep = sparsegpt_prune(weight, hessian, s, nm, blocksize=blocksize)
    prunen, prunem = nm if nm is not None else (0, 0)
    ref_w, ref_keep = reference_sparsegpt(weight, hessian, s, prunen, prunem, blocksize=blocksize, exact_count=True,
                                          inverse_dtype=torch.float64)
    assert torch.equal(ours_keep, ref_keep)
    torch.testing.assert_close(ours_w, ref_w, rtol=1e-5, atol=1e-6)
    assert not ours_w[:, 11].any()  # the dead input's column is zero
    assert torch.equal(ours_w != 0, ours_keep & (ours_w != 0))  # pruned weights are zero
    if nm is not None:  # exactly N pruned in every group of M
        pruned = (~ours_keep).reshape(weight.shape[0], -1, nm[1]).sum(-1)
        assert bool((pruned == nm[0]).all())


def test_the_reference_count_rule_prunes_one_more_per_block_and_is_otherwise_the_same():
    """The reference prunes every score <= the order statistic of index int(numel * s): one weight more per
    block than the exact count. gradprune keeps the layer's count exact; the rest of the step is the same."""
    weight, hessian = layer()
    ref_w, ref_keep = reference_sparsegpt(weight, hessian, 0.5, inverse_dtype=torch.float64)
    ours_w, ours_keep = sparsegpt_prune(weight, hessian, 0.5)
    blocks = -(-weight.shape[1] // 128)
    assert int((~ref_keep).sum()) == int((~ours_keep).sum()) + blocks
    assert int((~ours_keep).sum()) == weight.numel() // 2


@pytest.mark.parametrize("nm", [(2, 4), None], ids=["2of4", "unstructured"])
def test_a_float32_inverse_changes_few_decisions(nm):
    """The reference inverts the damped Hessian in float32, gradprune in float64: on a well-conditioned
    layer the two choose nearly the same weights and reach the same layer error."""
    weight, hessian = layer()
    prunen, prunem = nm if nm is not None else (0, 0)
    ref_w, ref_keep = reference_sparsegpt(weight, hessian, 0.5, prunen, prunem, exact_count=True)
    ours_w, ours_keep = sparsegpt_prune(weight, hessian, 0.5, nm)
    assert (ref_keep != ours_keep).float().mean() < 0.01
    h = hessian.double()

    def error(w):
        delta = (w.double() - weight.double())
        delta[:, 11] = 0  # the dead column changes nothing
        return float(torch.einsum("ri,ij,rj->", delta, h, delta))

    assert error(ours_w) == pytest.approx(error(ref_w), rel=0.02)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "unstructured"])
def test_prune_oneshot_runs_each_layer_through_the_reference_step(monkeypatch, pattern):
    """Block by block on a tiny LLaMA: every layer's keep-mask and new weight are what the reference step
    gives on the weight and Hessian that layer was pruned with (one code path for every N:M)."""
    model = tiny_llama(layers=2, hidden=64, intermediate=128)
    calls = []
    real = sparsegpt_module.sparsegpt_prune

    def spy(weight, hessian, sparsity, nm=None, blocksize=128, percdamp=0.01, keep=None):
        out = real(weight, hessian, sparsity, nm, blocksize, percdamp, keep)
        calls.append((weight.clone(), hessian.clone(), sparsity, nm, blocksize, percdamp, out))
        return out

    monkeypatch.setattr(sparsegpt_module, "sparsegpt_prune", spy)
    ids = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(1))
    prune_oneshot(model, "sparsegpt", 0.25 if pattern == "1:4" else 0.5, pattern, list(ids.split(4)), progress=False)
    assert len(calls) == 14  # q, k, v, o, gate, up, down in each of 2 blocks
    registry_masks = []
    for weight, hessian, sparsity, nm, blocksize, percdamp, (new_w, keep) in calls:
        prunen, prunem = nm if nm is not None else (0, 0)
        ref_w, ref_keep = reference_sparsegpt(weight, hessian, sparsity, prunen, prunem, blocksize, percdamp,
                                              exact_count=True, inverse_dtype=torch.float64)
        assert torch.equal(keep, ref_keep)
        torch.testing.assert_close(new_w, ref_w, rtol=1e-5, atol=1e-6)
        registry_masks.append(keep)
    pruned = sum(int((~k).sum()) for k in registry_masks)
    total = sum(k.numel() for k in registry_masks)
    assert pruned == total * (0.25 if pattern == "1:4" else 0.5)
