import math

import pytest
import torch

from gradprune.methods.ria import ria_scores


def test_hand_computed_scores_on_a_2x3_weight():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-3.0, 2.0, 1.0]])
    sum_sq = torch.tensor([4.0, 16.0, 1.0])  # sqrt: 2, 4, 1; ** 0.5: sqrt(2), 2, 1
    # column sums |W|: 4, 4, 4; row sums: 6, 6
    expected = torch.tensor(
        [
            [(1 / 4 + 1 / 6) * math.sqrt(2), (2 / 4 + 2 / 6) * 2, (3 / 4 + 3 / 6) * 1],
            [(3 / 4 + 3 / 6) * math.sqrt(2), (2 / 4 + 2 / 6) * 2, (1 / 4 + 1 / 6) * 1],
        ]
    )
    scores = ria_scores(weight, sum_sq)
    assert scores.dtype == torch.float32 and scores.shape == (2, 3)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)
    # a = 1 is the plain activation norm
    torch.testing.assert_close(ria_scores(weight, sum_sq, a=1.0)[0, 0], torch.tensor((1 / 4 + 1 / 6) * 2.0))


def test_zero_row_and_column_give_zero_not_nan():
    weight = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, -1.0]])  # row 0 and column 0 are all zero
    scores = ria_scores(weight, torch.tensor([0.0, 4.0, 9.0]))
    assert not scores.isnan().any()
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.0, (2 / 2 + 2 / 3) * math.sqrt(2), (1 / 1 + 1 / 3) * math.sqrt(3)]])
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)
    assert not ria_scores(torch.zeros(2, 3), torch.zeros(3)).isnan().any()


def test_a_zero_ignores_activations():
    torch.manual_seed(0)
    weight = torch.randn(4, 5)
    relative = ria_scores(weight, torch.ones(5), a=0.0)
    for sum_sq in (torch.rand(5) * 100, torch.zeros(5)):
        torch.testing.assert_close(ria_scores(weight, sum_sq, a=0.0), relative, rtol=0, atol=0)


def test_dtype_kept_out_of_the_weight_and_float64_statistics():
    weight = torch.randn(3, 4, dtype=torch.bfloat16)
    scores = ria_scores(weight, torch.rand(4, dtype=torch.float64))
    assert scores.dtype == torch.float32 and weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=torch.ones(3), sum_sq=torch.ones(3)), r"weight must be a 2-D \(out_features, in_features\) tensor, got \(3,\)"),
        (dict(weight=torch.ones(2, 3), sum_sq=torch.ones(2)), r"sum_sq must be a tensor of shape \(3,\).*got \(2,\)"),
        (dict(weight=torch.ones(2, 3), sum_sq=-torch.ones(3)), r"sum_sq must hold sums of squares"),
        (dict(weight=torch.ones(2, 3), sum_sq=torch.ones(3), a=-0.5), r"a \(the activation exponent\) must be a finite number >= 0, got -0.5"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ria_scores(**kwargs)


# -- the one-shot method ------------------------------------------------------------------------------------
def test_prune_oneshot_ria_by_hand():
    """One Linear fed by embedding rows: per row the lowest RIA scores go, exactly half of each row."""
    from torch import nn

    from gradprune import prune_oneshot

    class OneLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding.from_pretrained(torch.tensor([[2.0, 4.0, 1.0, 1.0]]))
            self.proj = nn.Linear(4, 2, bias=False)
            with torch.no_grad():
                self.proj.weight.copy_(torch.tensor([[1.0, -2.0, 1.0, 4.0], [3.0, 0.5, 1.0, 1.0]]))

        def forward(self, input_ids, attention_mask=None):
            return self.proj(self.embed(input_ids))

    model = OneLinear()
    weight = model.proj.weight.detach().clone()
    report = prune_oneshot(model, "ria", 0.5, calibration=[torch.tensor([0])], sequential=False)
    expected_scores = ria_scores(weight, torch.tensor([4.0, 16.0, 1.0, 1.0], dtype=torch.float64))
    keep = report["masks"]["proj"]
    assert (~keep).sum(dim=1).tolist() == [2, 2] and report["options"] == {"scope": "row", "a": 0.5}
    for row in range(2):
        assert expected_scores[row][~keep[row]].max() <= expected_scores[row][keep[row]].min()
    assert torch.equal(model.proj.weight, weight * keep)


def test_prune_oneshot_ria_rejects_a_bad_exponent_before_changing_anything():
    from gradprune import prune_oneshot
    from tiny_models import tiny_llama

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"a \(RIA's activation exponent\) must be a finite number >= 0, got -1"):
        prune_oneshot(model, "ria", 0.5, calibration=[torch.tensor([[1, 2, 3]])], a=-1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
