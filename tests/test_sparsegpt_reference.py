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

PATTERNS = [None, (2, 4), (4, 8), (1, 4), (3, 4), (2, 8), (16, 32)]


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


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (3, 8)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
def test_groups_cut_by_a_block_end_match_the_reference(nm):
    """A block width that is not a multiple of M (blocksize 100): groups restart at each block, the last group
    of a block is narrower and prunes min(N, its width) per row, as the reference's column loop does."""
    weight, hessian = layer()
    ours_w, ours_keep = sparsegpt_prune(weight, hessian, nm[0] / nm[1], nm, blocksize=100)
    ref_w, ref_keep = reference_sparsegpt(weight, hessian, nm[0] / nm[1], *nm, blocksize=100, exact_count=True,
                                          inverse_dtype=torch.float64)
    assert torch.equal(ours_keep, ref_keep)
    torch.testing.assert_close(ours_w, ref_w, rtol=1e-5, atol=1e-6)


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

    def spy(weight, hessian, sparsity, nm=None, blocksize=128, percdamp=0.01, keep=None, **kwargs):
        out = real(weight, hessian, sparsity, nm, blocksize, percdamp, keep, **kwargs)
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


@pytest.mark.parametrize("n", [1, 7, 96])
def test_inverse_factor_is_the_references_three_step_factor(n):
    """One Cholesky of the reversed matrix and one triangular inverse give the reference's upper factor of
    the damped inverse (Cholesky, cholesky_inverse, Cholesky again) to float64 rounding."""
    from gradprune.methods.sparsegpt import inverse_hessian_factor
    from sparsegpt_reference import reference_inverse_factor

    x = torch.randn(3 * n + 5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    h = 2 / x.shape[0] * x.t() @ x
    ours = inverse_hessian_factor(h, 0.01)
    torch.testing.assert_close(ours, reference_inverse_factor(h, 0.01, torch.float64), rtol=1e-10, atol=1e-12)
    assert torch.equal(ours, ours.triu())
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(ours.t() @ ours @ damped, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-9)


def test_layers_that_read_one_input_share_one_inverse(monkeypatch):
    """q/k/v read one input and so do gate/up: one inverse each, four per LLaMA block (qkv, o, gate/up,
    down), and the result is what separate inverses give."""
    model = tiny_llama(layers=2, hidden=64, intermediate=128)
    twin = tiny_llama(layers=2, hidden=64, intermediate=128)
    ids = list(torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(2)).split(4))
    prepared = []
    real = sparsegpt_module.prepare_hessian
    monkeypatch.setattr(sparsegpt_module, "prepare_hessian", lambda h, p: prepared.append(1) or real(h, p))
    prune_oneshot(model, "sparsegpt", 0.5, "2:4", ids, progress=False)
    assert len(prepared) == 8
    monkeypatch.undo()
    real_prune = sparsegpt_module.sparsegpt_prune
    monkeypatch.setattr(sparsegpt_module, "sparsegpt_prune", lambda *a, prepared=None, **k: real_prune(*a, **k))
    prune_oneshot(twin, "sparsegpt", 0.5, "2:4", ids, progress=False)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_a_singular_hessian_gets_more_damping_with_a_warning(caplog):
    from gradprune.methods.sparsegpt import inverse_hessian_factor

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = x.t() @ x  # rank 3 of 8: no Cholesky without damping
    with caplog.at_level("WARNING"):
        u = inverse_hessian_factor(h, 0.0)
    assert "not positive definite" in caplog.text
    assert bool(torch.isfinite(u).all()) and torch.equal(u, u.triu())
    with pytest.raises(RuntimeError, match="not positive definite even with damping"):
        inverse_hessian_factor(torch.full((4, 4), float("nan"), dtype=torch.float64), 0.01)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (3, 4)])
def test_n_m_ties_go_to_the_lower_column(nm):
    """Equal scores in a group (equal weights, identity Hessian): the first N columns of each group go, the
    rule of drop_lowest_per_row; weights an earlier mask pruned go first."""
    rows, columns = 3, 16
    weight = torch.ones(rows, columns)
    new, keep = sparsegpt_prune(weight, torch.eye(columns), nm[0] / nm[1], nm, blocksize=8)
    expected = (torch.arange(columns) % nm[1] >= nm[0]).expand(rows, -1)
    assert torch.equal(keep, expected)
    earlier = torch.ones(rows, columns, dtype=torch.bool)
    earlier[:, nm[1] - 1] = False  # the last column of the first group was pruned before
    _, keep = sparsegpt_prune(weight, torch.eye(columns), nm[0] / nm[1], nm, blocksize=8, keep=earlier)
    assert not keep[:, nm[1] - 1].any()
    assert torch.equal((~keep).reshape(rows, -1, nm[1]).sum(-1), torch.full((rows, columns // nm[1]), nm[0]))
    assert torch.equal(keep[:, nm[1]:], expected[:, nm[1]:])
