"""Wanda's reference rules, transcribed, and a comparison with prune_oneshot that tests the rule, not the
rounding.

The reference code (Sun et al., ``lib/prune.py``) keeps per input channel a float32 running mean of the
squared L2 norms of the inputs (``scaler_row``), scores ``|W| * sqrt(scaler_row)``, and prunes per output row
the ``int(in_features * s)`` lowest by a stable sort; block ``i`` is calibrated on the outputs of the
already-pruned blocks ``0..i-1``.

Comparing two whole sequential runs tests the rounding as much as the rule: gradprune sums squares in
float64, the reference in float32, and which of two near-tied weights goes can differ between CPU kernel
sets (``ATEN_CPU_CAPABILITY``). One swap in block 1 then changes every later block's inputs, and the runs
drift apart. So :func:`compare_with_reference` separates the two questions:

- the rule, layer by layer on identical inputs: every layer's inputs are recorded while prune_oneshot
  calibrates it, the transcribed reference rule is applied to exactly those inputs and the dense weights,
  and each row where the two masks differ must be a near-tie: both masks prune exactly ``int(in * s)``
  weights of the row, and in float64 (exact sums) no weight either one prunes scores more than ``RTOL``
  above a weight it keeps;
- the protocol: block 0 sees the embeddings, and block ``i + 1`` sees what the *pruned* block ``i`` makes of
  block ``i``'s inputs.

``RTOL = 1e-5`` is about 170 float32 ulps: the reference's float32 sums over a few dozen tokens, its
running mean and the sqrt and product of both scores stay well inside it, while any real rule difference
(no sqrt, another statistic, another count or group) moves scores by far more.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gradprune import prune_oneshot
from gradprune.blocks import find_block_stack

RTOL = 1e-5


def reference_scaler_row(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The reference's statistic: float32 running mean over samples of the squared L2 norm per channel."""
    scaler, nsamples = None, 0
    for inp in inputs:
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        if scaler is None:
            scaler = torch.zeros(x.shape[0])
        scaler *= nsamples / (nsamples + 1)
        nsamples += 1
        scaler += torch.norm(x, p=2, dim=1) ** 2 / nsamples
    return scaler


def reference_keep_mask(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's unstructured rule: per row, the int(in * s) lowest scores by a stable sort go."""
    metric = weight.abs() * torch.sqrt(scaler_row.reshape(1, -1))
    idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
    return ~torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)


@dataclass
class Comparison:
    ours: dict  # keep-masks of prune_oneshot
    reference: dict  # keep-masks of the reference rule on the same inputs
    exact_scores: dict  # float64 |W| * sqrt(sum of x^2), for checking near-ties
    differing_rows: dict = field(default_factory=dict)  # name -> number of rows where the masks differ


def _valid_lowest(keep: torch.Tensor, exact: torch.Tensor, count: int) -> torch.Tensor:
    """Per row: prunes exactly ``count``, and no pruned score exceeds a kept one by more than RTOL."""
    pruned_max = exact.masked_fill(keep, float("-inf")).amax(dim=1)
    kept_min = exact.masked_fill(~keep, float("inf")).amin(dim=1)
    return (~keep).sum(dim=1).eq(count) & (pruned_max <= kept_min * (1 + RTOL))


def differing_rows_are_near_ties(name: str, a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor, count: int) -> int:
    """Two per-row keep-masks of one layer may differ only in rows where both are a valid choice of the
    ``count`` lowest ``exact`` scores up to RTOL; returns how many rows differ (AssertionError otherwise)."""
    rows = (a != b).any(dim=1)
    for who, mask in (("first", a), ("second", b)):
        valid = _valid_lowest(mask[rows], exact[rows], count)
        assert valid.all(), f"{name}: the {who} mask breaks the rule in {int((~valid).sum())} rows that differ"
    return int(rows.sum())


class LayerInputs:
    """Records, while a one-shot run calibrates, the inputs of every Linear in the block stack (the first
    ``n`` calls of each: the calibration pass on the dense block) and the inputs of every block."""

    def __init__(self, model: nn.Module, n: int):
        self.model, self.n, self.stack = model, n, find_block_stack(model)
        self.dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.layers: dict[str, list] = {}
        self.blocks: dict[int, list] = {}
        self._handles: list = []

    def _record_layer(self, name):
        def hook(module, args, output):
            seen = self.layers.setdefault(name, [])
            if len(seen) < self.n:
                seen.append(args[0].detach().clone())
        return hook

    def _record_block(self, index):
        def hook(module, args, kwargs):
            seen = self.blocks.setdefault(index, [])
            if len(seen) < self.n:
                hidden = args[0] if args else kwargs["hidden_states"]
                seen.append((hidden.detach().clone(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return hook

    def __enter__(self) -> "LayerInputs":
        for i, block in enumerate(self.stack.blocks):
            self._handles.append(block.register_forward_pre_hook(self._record_block(i), with_kwargs=True))
            for name, m in block.named_modules():
                if isinstance(m, nn.Linear):
                    self._handles.append(m.register_forward_hook(self._record_layer(f"{self.stack.block_name(i)}.{name}")))
        return self

    def __exit__(self, *exc_info) -> None:
        for h in self._handles:
            h.remove()

    def exact_scores(self, name: str) -> torch.Tensor:
        """float64 ``|W| * sqrt(sum of x^2)`` of the dense weight of target ``name`` over the recorded inputs."""
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        rows = [x.reshape(-1, x.shape[-1]).double() for x in self.layers[module]]
        sum_sq = sum(r.square().sum(dim=0) for r in rows)
        return self.dense[module].double().abs() * sum_sq.sqrt().unsqueeze(0)


def compare_with_reference(model: nn.Module, samples: list[torch.Tensor], sparsity: float) -> Comparison:
    """Run ``prune_oneshot(model, "wanda", sparsity)`` on a LLaMA-style HF model and check it against the
    reference rule and protocol (see the module docstring); raises AssertionError naming the layer."""
    with LayerInputs(model, len(samples)) as seen:
        ours = prune_oneshot(model, "wanda", sparsity, calibration=samples, progress=False)["masks"]

    result = Comparison(ours, {}, {})
    for name, keep in ours.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        weight = seen.dense[module]
        reference = reference_keep_mask(weight, reference_scaler_row(seen.layers[module]), sparsity)
        exact = seen.exact_scores(name)
        result.reference[name], result.exact_scores[name] = reference, exact
        differing = differing_rows_are_near_ties(name, keep, reference, exact, int(weight.shape[1] * sparsity))
        if differing:
            result.differing_rows[name] = differing

    # the protocol: block 0 sees the embeddings, block i + 1 the outputs of the pruned block i
    with torch.no_grad():
        stack, block_inputs = seen.stack, seen.blocks
        embeddings = model.get_input_embeddings()
        for (hidden, _), ids in zip(block_inputs[0], samples):
            assert torch.equal(hidden, embeddings(ids)), "block 0 did not see the embeddings"
        for i in range(len(stack.blocks) - 1):
            for (hidden, kwargs), (following, _) in zip(block_inputs[i], block_inputs[i + 1]):
                out = stack.blocks[i](hidden, **kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                scale = float(following.abs().max())
                assert torch.allclose(out, following, rtol=1e-4, atol=1e-5 * scale), f"block {i + 1}'s inputs are not block {i}'s pruned outputs"
    return result
