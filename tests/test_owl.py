import math
import random

import pytest
import torch

from gradprune.methods.owl import exact_counts, outlier_ratio, owl_budgets
from gradprune import find_targets
from gradprune.selection import exact_count


def weighted_mean(values, sizes):
    return math.fsum(v * n for v, n in zip(values, sizes)) / sum(sizes)


def test_outlier_ratio_on_hand_made_tensors():
    # scores 1 x 9 and 46 once: mean = (9 + 46) / 10 = 5.5; above 5 * 5.5 = 27.5: only 46
    assert outlier_ratio([torch.ones(3, 3), torch.tensor([46.0])]) == pytest.approx(0.1, abs=0)
    # the block's scores are taken together: the same values split otherwise give the same ratio
    assert outlier_ratio([torch.tensor([1.0] * 9 + [46.0])]) == 0.1
    # m = 1: above the mean 5.5 is again only 46; m = 0.1: above 0.55 is everything
    assert outlier_ratio([torch.ones(3, 3), torch.tensor([46.0])], m=1.0) == 0.1
    assert outlier_ratio([torch.ones(3, 3), torch.tensor([46.0])], m=0.1) == 1.0
    # strictly above: 5 * mean exactly is not an outlier (scores 0 x 4 and 5: mean 1, threshold 5)
    assert outlier_ratio([torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0])]) == 0.0
    assert outlier_ratio([torch.zeros(4)]) == 0.0


@pytest.mark.parametrize("sparsity, lam", [(0.5, 0.08), (0.7, 0.08), (0.3, 0.3), (0.9, 0.1), (0.6, 0.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budgets_mean_range_monotone_and_exact_counts(sparsity, lam, seed):
    rng = random.Random(seed)
    blocks = 7
    ratios = [rng.uniform(0.0, 0.05) for _ in range(blocks)]
    target_sizes = [[rng.randint(1, 5000) for _ in range(rng.randint(1, 4))] for _ in range(blocks)]
    sizes = [sum(t) for t in target_sizes]
    budgets = owl_budgets(ratios, sizes, sparsity, lam)
    assert weighted_mean(budgets, sizes) == pytest.approx(sparsity, abs=1e-12)
    assert all(sparsity - lam - 1e-15 <= b <= sparsity + lam + 1e-15 for b in budgets)
    if lam > 0:  # the block furthest from the mean ratio sits on the edge of the range
        assert max(abs(b - sparsity) for b in budgets) == pytest.approx(lam, abs=1e-15)
    by_ratio = [b for _, b in sorted(zip(ratios, budgets))]
    assert all(x >= y for x, y in zip(by_ratio, by_ratio[1:]))  # more outliers -> less sparsity
    # affine in the ratio: equal steps in ratio, equal steps in budget
    if lam > 0:
        slope = (budgets[1] - budgets[0]) / (ratios[1] - ratios[0])
        for z, b in zip(ratios, budgets):
            assert b == pytest.approx(budgets[0] + slope * (z - ratios[0]), abs=1e-12)

    counts = exact_counts(budgets, target_sizes, sparsity)
    assert sum(map(sum, counts)) == exact_count(sparsity, sum(sizes))
    for b, row, numels in zip(budgets, counts, target_sizes):
        assert len(row) == len(numels)
        for c, n in zip(row, numels):
            assert 0 <= c <= n and abs(c - b * n) < 1  # largest remainder: floor or ceil of the ideal
    assert exact_counts(budgets, target_sizes, sparsity) == counts  # deterministic


def test_equal_ratios_give_uniform_budgets():
    assert owl_budgets([0.02] * 4, [10, 20, 30, 40], 0.5) == [0.5] * 4
    assert owl_budgets([0.01], [10], 0.7, 0.08) == [0.7]


def test_hand_made_budgets_and_counts():
    # ratios 0, 0.1, 0.2 on equal sizes: mean 0.1, offsets 0.1, 0, -0.1 -> u = 1, 0, -1
    budgets = owl_budgets([0.0, 0.1, 0.2], [10, 10, 10], 0.5, 0.1)
    assert budgets == pytest.approx([0.6, 0.5, 0.4], abs=1e-15)
    # sizes weight the mean: ratios 0 (size 30) and 1 (size 10): zbar = 0.25, offsets 0.25, -0.75
    budgets = owl_budgets([0.0, 1.0], [30, 10], 0.5, 0.09)
    assert budgets == pytest.approx([0.5 + 0.09 / 3, 0.5 - 0.09], abs=1e-15)
    # counts: ideal 0.6*5 = 3, 0.6*5 = 3 | 0.5*7 = 3.5, 0.5*3 = 1.5 | 0.4*10 = 4; total floor(15 + 0.5) = 15
    # floors 3, 3, 3, 1, 4 = 14; one more to the largest remainder (tie 0.5/0.5 -> the earlier target)
    assert exact_counts([0.6, 0.5, 0.4], [[5, 5], [7, 3], [10]], 0.5) == [[3, 3], [4, 1], [4]]


def test_counts_take_away_when_the_rounding_overshoots():
    # uniform 0.5 over three targets of 1: ideal 0.5 each, total floor(1.5 + 0.5) = 2
    assert exact_counts([0.5], [[1, 1, 1]], 0.5) == [[1, 1, 0]]
    # 0.25 over 2 + 2: ideal 0.5, 0.5, total floor(1 + 0.5) = 1
    assert exact_counts([0.25, 0.25], [[2], [2]], 0.25) == [[1], [0]]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: owl_budgets([0.1, 0.2], [1, 1], 0.5, lam=0.6), r"lam must be in \[0, 0.5\] = \[0, min\(sparsity, 1 - sparsity\)\] at sparsity 0.5.*got 0.6"),
        (lambda: owl_budgets([0.1, 0.2], [1, 1], 0.05, lam=0.08), r"lam must be in \[0, 0.05\].*got 0.08"),
        (lambda: owl_budgets([0.1, 0.2], [1, 1], 0.9, lam=0.2), r"lam must be in \[0, 0.1\].*got 0.2"),
        (lambda: owl_budgets([0.1, 0.2], [1, 1], 0.5, lam=-0.01), r"lam must be in \[0, 0.5\].*got -0.01"),
        (lambda: owl_budgets([0.1, 0.2], [1], 0.5), r"ratios and sizes must be non-empty and of equal length.*2 ratios and 1 sizes"),
        (lambda: owl_budgets([0.1], [0], 0.5), r"sizes must be positive integers.*got \[0\]"),
        (lambda: owl_budgets([0.1], [1], 1.0), r"sparsity must be in \[0, 1\), got 1.0"),
        (lambda: outlier_ratio([torch.ones(3)], m=0), r"m \(the outlier threshold, a multiple of the mean score\) must be > 0, got 0"),
        (lambda: outlier_ratio([torch.ones(3)], m=-5.0), r"m .* must be > 0, got -5.0"),
        (lambda: outlier_ratio([]), r"scores_of_block must be a non-empty list of score tensors"),
        (lambda: exact_counts([0.5, 0.5], [[4]], 0.5), r"budgets and target_sizes_per_block must be non-empty and of equal length"),
        (lambda: exact_counts([1.5], [[4]], 0.5), r"budgets must be sparsities in \[0, 1\], got \[1.5\]"),
        (lambda: exact_counts([0.1, 0.1], [[100], [100]], 0.5), r"budgets average 0.1 over the targeted weights but sparsity is 0.5"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- OWL in prune_oneshot and the callbacks ---------------------------------------------------------------
def _calibration():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(3)]


@pytest.mark.parametrize("method, scope", [("wanda", "row"), ("wanda", "layer"), ("ria", "row"), ("sparsegpt", None)])
def test_oneshot_owl_budgets_are_exact_in_total_and_follow_the_blocks(method, scope):
    from gradprune import prune_oneshot
    from gradprune.blocks import group_by_block
    from tiny_models import tiny_llama

    model = tiny_llama(layers=3)
    options = {} if scope is None else {"scope": scope}
    report = prune_oneshot(model, method, 0.6, calibration=_calibration(), allocation="owl", owl_lambda=0.1,
                           progress=False, **options)
    total = report["global"]
    assert total["zeros"] == exact_count(0.6, total["numel"]) and report["allocation"] == "owl"
    budgets = report["owl_budgets"]
    assert len(budgets) == 3 and all(0.5 - 1e-12 <= b <= 0.7 + 1e-12 for b in budgets)
    assert max(budgets) - min(budgets) > 0.05  # the blocks really got different budgets
    for block, budget in zip(group_by_block(model, find_targets(model)), budgets):
        for t in block:  # each layer within one weight of its block's budget (largest remainder)
            assert abs(report["layers"][t.name]["zeros"] - budget * t.numel) <= 1, t.name


def test_row_scope_with_counts_spreads_a_layer_budget_exactly_over_rows():
    from gradprune.selection import select_masks

    layer = torch.nn.Linear(5, 3, bias=False)
    (target,) = find_targets(torch.nn.Sequential(layer))
    keep = select_masks([target], 0.5, scope="row", counts={target.name: 7})[target.name]
    assert (~keep).sum(dim=1).tolist() == [3, 2, 2] and int((~keep).sum()) == 7


@pytest.mark.parametrize("args, kwargs, match", [
    (("magnitude", 0.6), dict(allocation="owl"), r"allocation='owl' ranks blocks by Wanda scores .* 'magnitude'"),
    (("wanda", 0.6), dict(allocation="owl", owl_lambda=0.5), r"owl_lambda must be in \[0, 0.4\]"),
    (("wanda", 0.5, "2:4"), dict(allocation="owl"), r"allocation='owl' .* N:M pattern \('2:4'\)"),
    (("wanda", 0.6), dict(allocation="owl", scope="global", sequential=False), r"use scope 'layer' or 'row', not 'global'"),
    (("wanda", 0.6), dict(allocation="OWL"), r"allocation must be one of \['uniform', 'owl'\], got 'OWL'"),
    (("wanda", 0.6), dict(allocation="owl", adaptive=True), r"adaptive=True .* does not combine with allocation='owl'"),
])
def test_oneshot_owl_bad_input_changes_nothing(args, kwargs, match):
    from gradprune import MaskRegistry, prune_oneshot
    from tiny_models import tiny_llama

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_oneshot(model, *args, calibration=_calibration(), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not MaskRegistry.of(model).masks


def test_monotone_counts_never_unprune_and_keep_the_total():
    from gradprune.methods.owl import monotone_counts

    counts = monotone_counts({"a": 10, "b": 30, "c": 20}, {"a": 15, "b": 5, "c": 5})
    assert counts["a"] == 15 and counts["b"] >= 5 and counts["c"] >= 5 and sum(counts.values()) == 60
    assert monotone_counts({"a": 10, "b": 30}, {"a": 0, "b": 0}) == {"a": 10, "b": 30}
