"""Calibration statistics: hand-checked sums, padding excluded, hooks always removed, Hessians, data checks."""
import pytest
import torch
from torch import nn

from gradprune import find_targets
from gradprune.calibration import (
    ActivationHooks,
    ChannelStats,
    HessianStats,
    as_batches,
    collect_activation_stats,
    sample_windows,
)
from tiny_models import tiny_llama

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by .ci/run (make test-numerics)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_channel_stats_by_hand():
    x = torch.tensor([[1.0, 0.0, -2.0], [3.0, 0.0, 2.0]])
    stats = ChannelStats.empty(3, torch.device("cpu"))
    stats.add(x[:1])
    stats.add(x[1:])
    assert stats.count.item() == 2
    assert torch.equal(stats.l2_sq, torch.tensor([10.0, 0.0, 8.0], dtype=torch.float64))
    assert torch.equal(stats.mean, torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(stats.variance, torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64))
    assert torch.equal(stats.near_zero_fraction, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_stats_are_sums_that_reduce_like_ranks():
    """Two 'ranks' each seeing half the tokens, summed, equal one process seeing all of them."""
    x = torch.randn(10, 4)
    whole, a, b = (ChannelStats.empty(4, torch.device("cpu")) for _ in range(3))
    whole.add(x)
    a.add(x[:6])
    b.add(x[6:])
    other = iter(b.tensors())  # reduce_ visits the sums in tensors() order
    a.reduce_(lambda t: t + next(other))
    assert a.count.item() == 10
    assert torch.allclose(a.l2_sq, whole.l2_sq) and torch.allclose(a.variance, whole.variance)


def test_hessian_is_two_over_n_xtx():
    x = torch.randn(7, 5)
    h = HessianStats.empty(5, torch.device("cpu"))
    h.add(x[:3])
    h.add(x[3:])
    expected = 2.0 / 7 * (x.double().t() @ x.double())
    assert torch.allclose(h.hessian(), expected, atol=1e-5)
    h64 = HessianStats.empty(5, torch.device("cpu"), dtype=torch.float64)
    h64.add(x)
    assert torch.allclose(h64.hessian(), expected, atol=1e-12)


def test_padding_positions_are_excluded():
    model = tiny_llama(layers=1)
    targets = find_targets(model)
    a = torch.randint(0, 128, (1, 10))
    b = torch.randint(0, 128, (1, 6))
    padded = torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # right padding
    batch = {"input_ids": torch.cat([a, padded]), "attention_mask": torch.tensor([[1] * 10, [1] * 6 + [0] * 4])}
    with_padding = collect_activation_stats(model, [batch], targets)
    separate = collect_activation_stats(model, [a, b], targets)
    for t in targets:
        assert with_padding[t.name].count.item() == 16
        assert torch.allclose(with_padding[t.name].l2_sq, separate[t.name].l2_sq, rtol=1e-4, atol=1e-5)
        assert torch.allclose(with_padding[t.name].mean, separate[t.name].mean, rtol=1e-4, atol=1e-5)
    no_mask = collect_activation_stats(model, [batch["input_ids"]], targets)
    assert no_mask[targets[0].name].count.item() == 20  # without a mask every position counts
    assert no_hooks_left(model)


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None):
        self.proj(self.embed(input_ids))
        raise RuntimeError("boom in forward")


def test_hooks_removed_after_exception():
    model = Exploding()
    targets = find_targets(model)
    with pytest.raises(RuntimeError, match="boom"):
        collect_activation_stats(model, [torch.tensor([1, 2, 3])], targets)
    assert no_hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationHooks(targets, hessian=True) as hooks:
            model(torch.tensor([[1, 2]]))
    assert no_hooks_left(model)
    assert hooks.stats[targets[0].name].count.item() == 2  # what ran before the error was recorded


def test_eval_mode_restored_and_no_grad():
    model = tiny_llama(layers=1)
    model.train()
    collect_activation_stats(model, [torch.randint(0, 128, (1, 5))])
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "data, error, match",
    [
        (None, ValueError, "calibration data is required"),
        ([], ValueError, "calibration data is empty"),
        ([torch.zeros(1, 0, dtype=torch.long)], ValueError, "no tokens"),
        ([{"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.zeros(1, 3)}], ValueError, "all padding"),
        ([{"attention_mask": torch.ones(1, 3)}], ValueError, "without 'input_ids'"),
        ([torch.rand(1, 3)], TypeError, "integer token ids"),
        (["text"], TypeError, "must be a tensor of token ids"),
        ([{"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 4)}], ValueError, "shape"),
    ],
)
def test_bad_calibration_data(data, error, match):
    with pytest.raises(error, match=match):
        as_batches(data)


def test_as_batches_accepts_common_forms():
    ids = torch.arange(6)
    forms = [ids, ids.view(2, 3), [ids.view(1, 6)], {"input_ids": ids.view(1, 6)}, [(ids.view(2, 3),)]]
    for form in forms:
        batches = as_batches(form if not isinstance(form, torch.Tensor) else [form])
        assert batches[0]["input_ids"].dim() == 2 and batches[0]["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="too short: 6 tokens, at least 10"):
        as_batches([ids], min_tokens=10)


def test_sample_windows_seeded_and_too_short():
    docs = [list(range(100)), list(range(1000, 1005)), list(range(2000, 2300))]
    a = sample_windows(lambda i: docs[i], 3, nsamples=8, seqlen=16, seed=0)
    b = sample_windows(lambda i: docs[i], 3, nsamples=8, seqlen=16, seed=0)
    assert a.shape == (8, 16) and torch.equal(a, b)
    assert not torch.equal(a, sample_windows(lambda i: docs[i], 3, nsamples=8, seqlen=16, seed=1))
    assert all(int(row[0]) not in range(1000, 1005) for row in a)  # the 5-token document is never used
    with pytest.raises(ValueError, match="too short"):
        sample_windows(lambda i: docs[i], 3, nsamples=2, seqlen=400, seed=0)


def test_sample_windows_needs_more_than_seqlen_tokens_and_takes_tensors():
    """The one window rule (the reference loaders'): a document of exactly seqlen tokens gives no window, and
    a window starts in [0, len - seqlen): seqlen + 2 tokens give two windows. Ids: a list or a 1-D tensor."""
    with pytest.raises(ValueError, match="too short"):
        sample_windows(lambda i: list(range(16)), 1, nsamples=1, seqlen=16, seed=0)
    windows = sample_windows(lambda i: torch.arange(18, dtype=torch.int16), 1, nsamples=40, seqlen=16, seed=0)
    assert windows.dtype == torch.long and windows.shape == (40, 16)
    assert {int(row[0]) for row in windows} == {0, 1}
    as_list = sample_windows(lambda i: list(range(18)), 1, nsamples=40, seqlen=16, seed=0)
    assert torch.equal(windows, as_list)
