import itertools

import pytest
import torch
from torch import nn

import gradprune as gp
from gradprune import SparsitySchedule, exact_count, find_targets, select_masks
from tiny_models import tiny_gpt2

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by .ci/run (make test-numerics)


def random_mixed_model(seed=0):
    """Linear layers of several shapes (in_features divisible by 8) plus GPT-2's Conv1D layers."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    return nn.ModuleDict({"mlp": mlp, "gpt": tiny_gpt2(layers=1, seed=seed)})


def pruned_counts(targets, masks):
    return {t.name: int((~masks[t.name]).sum()) for t in targets}


def assert_nm(targets, masks, n, m, exactly):
    for t in targets:
        pruned_groups = (~t.out_in(masks[t.name])).reshape(t.out_features, -1, m).sum(-1)
        if exactly:
            assert (pruned_groups == n).all(), t.name
        else:
            assert (pruned_groups <= n).all(), t.name


KINDS = ["cubic", "linear", "exponential", "constant"]
SCOPES = ["layer", "global", "row"]
PATTERNS = ["unstructured", "2:4", "4:8"]


@pytest.mark.parametrize("kind, scope, pattern", list(itertools.product(KINDS, SCOPES, PATTERNS)))
def test_exact_count_at_every_event_and_monotone(kind, scope, pattern):
    model = random_mixed_model()
    targets = find_targets(model, exclude=["lm_head"])  # the gpt's head is tied; excluded anyway
    final = 0.5 if pattern != "unstructured" else 0.7
    schedule = SparsitySchedule(kind, final, initial_sparsity=0.05, start_step=2, end_step=20, every=3)
    masks = {}
    previous = None
    for step in schedule.events():
        s = schedule.sparsity_at(step)
        masks = select_masks(targets, s, gp.magnitude_scores, scope, pattern, masks)
        counts = pruned_counts(targets, masks)
        if scope == "global":
            assert sum(counts.values()) == exact_count(s, sum(t.numel for t in targets))
        elif scope == "layer":
            assert counts == {t.name: exact_count(s, t.numel) for t in targets}
        else:
            assert counts == {t.name: exact_count(s, t.in_features) * t.out_features for t in targets}
        if previous is not None:  # monotone: nothing pruned before comes back
            for name in masks:
                assert not (masks[name] & ~previous[name]).any()
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            assert_nm(targets, masks, n, m, exactly=(step == schedule.events()[-1] and scope != "global" or s == n / m))
        for t in targets:
            assert masks[t.name].dtype == torch.bool and masks[t.name].shape == t.weight.shape
        previous = masks


def test_incremental_removes_fraction_of_remaining():
    model = nn.Sequential(nn.Linear(100, 100))
    targets = find_targets(model)
    m30 = select_masks(targets, 0.3)
    m40 = select_masks(targets, 0.4, masks=m30)
    remaining_before = int(m30["0"].sum())
    removed_now = int((m30["0"] & ~m40["0"]).sum())
    assert remaining_before == 7000 and removed_now == 1000  # 1000 / 7000 = 14.3% of what remained
    assert int((~m40["0"]).sum()) == 4000  # not 0.3 + 0.4 * 0.7 = 58% as compounding amounts would give


def test_hand_computed_layer_and_row_masks():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -4.0, 0.3, 2.0], [5.0, -0.2, 0.05, 1.0]]))
    targets = find_targets(nn.Sequential(lin))
    layer = select_masks(targets, 0.5, scope="layer")["0"]
    assert layer.tolist() == [[False, True, False, True], [True, False, False, True]]
    row = select_masks(targets, 0.25, scope="row")["0"]
    assert row.tolist() == [[False, True, True, True], [True, True, False, True]]


def test_ties_go_to_lower_index_and_are_deterministic():
    lin = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.weight[1, 0] = -0.0  # -0.0 and 0.0 tie too
        lin.weight[1, 5] = 0.0
    targets = find_targets(nn.Sequential(lin))
    row = select_masks(targets, 0.25, scope="row")["0"]
    assert (~row).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 5]]
    layer = select_masks(targets, 0.25, scope="layer")["0"]
    assert (~layer).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 5]]
    assert torch.equal(layer, select_masks(targets, 0.25, scope="layer")["0"])


def test_global_matches_a_full_sort_reference():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 16))
    with torch.no_grad():
        model[1].weight.mul_(0.1)  # very different scales: a global ranking prunes layer 1 most
        model[2].weight.copy_(model[2].weight.round(decimals=1))  # many ties
    targets = find_targets(model)
    masks = select_masks(targets, 0.6, scope="global")
    flat = torch.cat([t.weight.detach().abs().flatten() for t in targets])
    order = torch.sort(flat, stable=True).indices[: exact_count(0.6, flat.numel())]
    expected = torch.ones_like(flat, dtype=torch.bool)
    expected[order] = False
    assert torch.equal(torch.cat([masks[t.name].flatten() for t in targets]), expected)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 18])
def test_global_reads_scores_in_chunks_with_exact_counts_and_the_sort_reference(monkeypatch, chunk):
    """Chunk boundaries inside tensors and inside runs of ties (chunk 7 and 64), with earlier masks (the
    already-pruned at -inf), negative, zero and infinite scores: the exact count, and the masks of a
    stable full sort of all scores together."""
    monkeypatch.setattr(gp.kselect, "CHUNK", chunk)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 24), nn.Linear(24, 8))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(layer.weight.round(decimals=1))  # long runs of ties
        model[1].weight[0, :5] = torch.tensor([float("-inf"), float("inf"), -0.0, 0.0, -3.0])
    targets = find_targets(model)
    score = lambda t: t.weight.detach().clone()  # signed scores
    earlier = select_masks(targets, 0.3, score_fn=score, scope="layer")
    for sparsity in (0.37, 0.5, 0.9):
        masks = select_masks(targets, sparsity, score_fn=score, scope="global", masks=earlier)
        flat = torch.cat([score(t).flatten() for t in targets])
        flat[~torch.cat([earlier[t.name].flatten() for t in targets])] = float("-inf")
        order = torch.sort(flat + 0.0, stable=True).indices[: exact_count(sparsity, flat.numel())]
        expected = torch.ones_like(flat, dtype=torch.bool)
        expected[order] = False
        kept = torch.cat([masks[t.name].flatten() for t in targets])
        assert int((~kept).sum()) == exact_count(sparsity, flat.numel())
        assert torch.equal(kept, expected), sparsity


def test_global_handles_negative_and_infinite_scores():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8))
    targets = find_targets(model)
    masks = select_masks(targets, 0.5, score_fn=lambda t: t.weight.detach(), scope="global")
    flat = torch.cat([t.weight.detach().flatten() for t in targets])
    kept = torch.cat([masks[t.name].flatten() for t in targets])
    assert flat[~kept].max() <= flat[kept].min()


def test_conv1d_nm_groups_run_along_input_dimension(gpt2):
    targets = find_targets(gpt2)
    masks = select_masks(targets, 0.5, scope="layer", pattern="2:4")
    assert_nm(targets, masks, 2, 4, exactly=True)
    t = targets[0]
    assert t.transposed
    stored = ~masks[t.name]  # (in, out): groups of 4 along dim 0
    assert (stored.reshape(-1, 4, stored.shape[1]).sum(1) == 2).all()


def test_masks_are_not_applied_by_select(llama):
    before = [t.weight.detach().clone() for t in find_targets(llama)]
    select_masks(find_targets(llama), 0.5)
    assert all(torch.equal(a, t.weight) for a, t in zip(before, find_targets(llama)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\), got 1.0"),
        (dict(sparsity=float("nan")), r"sparsity must be in \[0, 1\), got nan"),
        (dict(sparsity=0.5, scope="tensor"), r"scope must be one of \['layer', 'global', 'row'\], got 'tensor'"),
        (dict(sparsity=0.5, pattern="blocky"), r"pattern must be 'unstructured' or 'N:M'.*'blocky'"),
        (dict(sparsity=0.5, pattern="4:4"), r"pattern '4:4' is not a valid N:M pattern: need 0 < N < M"),
        (dict(sparsity=0.5, pattern="2:0"), r"pattern '2:0' is not a valid N:M pattern"),
        (dict(sparsity=0.6, pattern="2:4"), r"sparsity 0.6 is above what pattern '2:4' allows"),
        (dict(sparsity=0.5, pattern="8:16"), r"layer '1' has in_features=24, not divisible by M=16"),
    ],
)
def test_bad_selection_arguments_change_nothing(kwargs, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        gp.prune(model, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert gp.MaskRegistry.of(model).masks == {}


def test_nan_scores_rejected():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="scores for '0' contain NaN"):
        select_masks(find_targets(model), 0.5, score_fn=lambda t: torch.full_like(t.weight, float("nan")))
