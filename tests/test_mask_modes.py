"""Masks that training chooses: LearnedMasks (MaskLLM) and DynamicMasks (SR-STE) as GradualPruningCallback modes.
The maths by hand, the prior, the freeze step, exactness at every recompute, resume, DDP and bad arguments."""
import copy
import itertools
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from gradprune import MaskRegistry, find_targets, prune_oneshot
from gradprune.callbacks import DynamicMasks, GradualPruningCallback, LearnedMasks, SparseGPTPruningCallback
from gradprune.learned_masks import (groups, hard_mask, nm_candidates, prior_logits, sample_mask, sr_decay_,
                                     straight_through)
from lightning_helpers import token_loader, trainer
from test_gradual_scorers import PlainLM, RankShards, no_hooks_left
from test_gradual_sparsegpt import SaveState

pytestmark = pytest.mark.numerics


# -- the maths ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, m, count", [(2, 4, 6), (4, 8, 70), (1, 4, 4)])
def test_candidate_table_is_complete_and_n_m_exact(n, m, count):
    table = nm_candidates(n, m)
    assert table.shape == (count, m) == (math.comb(m, n), m)
    assert (table.sum(dim=1) == m - n).all()  # "N:M" prunes N of every M
    assert len({tuple(row.tolist()) for row in table}) == count
    every = {tuple(i in kept for i in range(m)) for kept in itertools.combinations(range(m), m - n)}
    assert {tuple(row.tolist()) for row in table} == every


def test_hard_mask_is_the_argmax_candidate_and_the_first_on_ties():
    table = nm_candidates(2, 4)
    logits = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0))  # candidate-first
    logits[:, 0, 0] = torch.tensor([0.0, 2.0, 1.0, 2.0, 2.0, -1.0])  # a three-way tie: candidate 1 wins
    masks = hard_mask(logits, table)
    assert masks.shape == (5, 3, 4)
    assert torch.equal(masks[0, 0], table[1])
    for index in itertools.product(range(5), range(3)):
        assert torch.equal(masks[index], table[int(logits[(slice(None), *index)].argmax())])


def test_prior_logits_give_the_prior_its_strength_and_neighbours_their_share():
    table = nm_candidates(2, 4)  # keeps (0,1), (0,2), (0,3), (1,2), (1,3), (2,3)
    logits = prior_logits(torch.tensor([[True, False, True, False]]), table, 3.0)
    assert logits.shape == (6, 1)  # candidate-first
    assert logits[:, 0].tolist() == [1.5, 3.0, 1.5, 1.5, 0.0, 1.5]


@pytest.mark.parametrize("hard", [True, False])
def test_sampled_mask_and_its_gradient_match_the_gumbel_softmax_formula(hard):
    """The sampler against the textbook estimator written with autograd over a candidate-last copy:
    y = softmax((scale * logits + g) / T), mask = onehot(argmax y) - y.detach() + y (hard) or y, times the
    candidate table; the same uniform draws give g."""
    table = nm_candidates(2, 4)
    logits = torch.randn(6, 7, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    upstream = torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(2))
    mask = sample_mask(logits, table, temperature=0.7, scale=2.5, hard=hard, generator=torch.Generator().manual_seed(3))
    (mask * upstream).sum().backward()

    reference_logits = logits.detach().movedim(0, -1).clone().requires_grad_(True)
    uniform = torch.rand(6, 7, 5, generator=torch.Generator().manual_seed(3)).movedim(0, -1)
    gumbel = -torch.log(-torch.log(uniform))
    y = torch.softmax((2.5 * reference_logits + gumbel) / 0.7, dim=-1)
    if hard:
        y = torch.nn.functional.one_hot(y.argmax(dim=-1), 6).float() - y.detach() + y
    reference = y @ table.float()
    (reference * upstream).sum().backward()
    assert torch.allclose(mask.detach(), reference.detach(), atol=1e-6)
    assert torch.allclose(logits.grad.movedim(0, -1), reference_logits.grad, atol=1e-6, rtol=1e-5)
    assert logits.grad.abs().sum() > 0


def test_hard_samples_are_exact_candidates_and_pass_gradients_to_the_logits():
    table = nm_candidates(2, 4)
    logits = torch.zeros(6, 64, requires_grad=True)
    mask = sample_mask(logits, table, temperature=0.5, scale=1.0, hard=True, generator=torch.Generator().manual_seed(0))
    assert {tuple(row.tolist()) for row in mask.detach().round()} <= {tuple(r) for r in table.float().tolist()}
    assert torch.allclose(mask.detach(), mask.detach().round(), atol=1e-6)
    (mask * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("hard", [True, False])
def test_a_uniform_draw_of_zero_rules_its_candidate_out_without_nans(monkeypatch, hard):
    """u = 0 (about once in 2**24 draws) is a Gumbel draw of -inf: that candidate cannot win its group and gets
    no weight, and nothing turns into NaN."""
    table = nm_candidates(2, 4)
    uniform = torch.full((6, 3), 0.5)
    uniform[0] = 0.0  # every group's first candidate, which would win the tie of equal logits otherwise
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: uniform.clone())
    logits = torch.zeros(6, 3, requires_grad=True)
    mask = sample_mask(logits, table, temperature=0.5, scale=1.0, hard=hard, generator=None)
    (mask * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(mask).all() and torch.isfinite(logits.grad).all()
    if hard:
        assert torch.equal(mask, table[1].float().expand(3, 4))
    else:  # the other five candidates share the weight equally: positions 0 and 1 are kept by two of them
        assert torch.allclose(mask, torch.tensor([0.4, 0.4, 0.6, 0.6]).expand(3, 4))
    assert torch.equal(logits.grad[0], torch.zeros(3))


def test_logit_adam_is_fused_where_torch_can_and_plain_where_it_cannot(monkeypatch):
    from gradprune.callbacks.mask_modes import _logit_adam
    logits = torch.zeros(6, 4, requires_grad=True)
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4):  # CPU's fused Adam came in 2.4
        assert _logit_adam([logits], 0.1).defaults["fused"]

    class NoFusedKernel(torch.optim.Adam):  # as torch before 2.4 does for CPU tensors
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be CUDA tensors")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", NoFusedKernel)
    adam = _logit_adam([logits], 0.1)
    assert not adam.defaults["fused"] and adam.defaults["eps"] == 1e-12
    logits.grad = torch.ones(6, 4)
    adam.step()
    assert torch.allclose(logits, torch.full((6, 4), -0.1))


def test_straight_through_forward_is_masked_and_gradient_and_decay_match_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5]], requires_grad=True)
    keep = torch.tensor([[True, False, True, False]])
    x = torch.tensor([[2.0, 1.0, -1.0, 4.0]])
    effective = straight_through(w, keep)
    assert effective.tolist() == [[1.0, 0.0, 3.0, 0.0]]
    (effective * x).sum().backward()
    assert w.grad.tolist() == x.tolist()  # every weight gets its gradient, pruned ones included
    sr_decay_(w, keep, 0.1)
    assert torch.allclose(w.grad, torch.tensor([[2.0, 1.0 - 0.2, -1.0, 4.0 + 0.05]]))


# -- through fit ---------------------------------------------------------------------------------------------
class AtEvents(Callback):
    """The mode's masks right after each event, before the freeze."""

    def __init__(self, gradual):
        self.gradual, self.masks, self.metrics = gradual, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = self.gradual.last_event_step
        mode = self.gradual.mode
        if step is not None and step not in self.masks:
            held = getattr(mode, "_keep", None) or getattr(mode, "_previous", None) or MaskRegistry.of(pl_module).masks
            self.masks[step] = {k: v.clone() for k, v in held.items()}
            self.metrics[step] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("masks/")}


def nm_exact(keep, n=2, m=4):
    return bool((keep.reshape(keep.shape[0], -1, m).sum(dim=-1) == m - n).all())


def learned(prior="magnitude", **options):
    return GradualPruningCallback(0.5, pattern="2:4", start_step=0, end_step=6, every=2, nsamples=4, seqlen=12,
                                  mode=LearnedMasks(prior=prior, **options))


@pytest.mark.parametrize("prior", ["magnitude", "sparsegpt"])
def test_learned_masks_are_exactly_n_m_at_every_event_and_held_after_the_freeze(tmp_path, prior):
    module = PlainLM(lr=1e-2)
    gradual = learned(prior, logit_lr=0.5, logit_scale=(1.0, 1.0))
    events = AtEvents(gradual)
    trainer(tmp_path, max_steps=9, callbacks=[gradual, events]).fit(module, token_loader())
    assert sorted(events.masks) == [0, 2, 4, 6]
    assert all(nm_exact(keep) for masks in events.masks.values() for keep in masks.values())
    registry = MaskRegistry.of(module)
    assert set(registry.masks) == {t.name for t in gradual.targets}
    for t in gradual.targets:  # after the freeze: the mask is the model's, pruned weights exactly zero
        assert nm_exact(registry.masks[t.name])
        assert torch.equal(registry.masks[t.name], events.masks[6][t.name].reshape(t.weight.shape))
        assert (t.weight[~registry.masks[t.name]] == 0).all()
    assert "forward" not in gradual.targets[0].module.__dict__ and no_hooks_left(module)
    assert 0.0 < events.metrics[4]["masks/flip_rate"] < 1.0  # logits learned: some masks changed
    assert events.metrics[2]["masks/temperature"] == pytest.approx(1.0 + (0.5 - 1.0) * 2 / 6)


def test_masks_are_sampled_in_training_steps_of_a_model_in_eval_mode(tmp_path):
    """from_pretrained returns a model in eval mode and Lightning keeps a submodule's mode: the logits must learn
    all the same (they once did not, and the masks never left the prior)."""
    module = PlainLM(lr=1e-2)
    module.model.eval()
    gradual = learned("magnitude", logit_lr=0.5, logit_scale=(1.0, 1.0))
    events = AtEvents(gradual)
    trainer(tmp_path, max_steps=9, callbacks=[gradual, events]).fit(module, token_loader())
    assert not module.model.training
    assert 0.0 < events.metrics[4]["masks/flip_rate"] < 1.0


@pytest.mark.parametrize("prior, reconstruct", [("sparsegpt", None), ("sparsegpt", False), ("wanda", None)])
def test_prior_of_infinite_strength_with_frozen_weights_is_the_oneshot_model(tmp_path, prior, reconstruct):
    """lr 0 and train_weights=False: only the masks could change, and an infinite prior never lets them. The
    model is then the one-shot method's: SparseGPT's weight update runs at the freeze step (reconstruct, its
    default); without it the model is SparseGPT's mask on the dense weights."""
    module = PlainLM(lr=0.0)
    dense = copy.deepcopy(module)
    reference = copy.deepcopy(module)
    gradual = learned(prior, prior_strength=math.inf, train_weights=False, reconstruct=reconstruct)
    trainer(tmp_path, max_steps=8, callbacks=[gradual]).fit(module, token_loader())
    calibration = [ids[:, :12] for (ids,) in token_loader()][:1]  # the first 4 training sequences
    prune_oneshot(reference, prior, 0.5, "2:4", calibration=calibration, sequential=True, progress=False,
                  include=[t.name for t in gradual.targets])
    expected, masks = MaskRegistry.of(reference).masks, MaskRegistry.of(module).masks
    assert masks.keys() == expected.keys() and masks
    assert all(torch.equal(masks[k], expected[k]) for k in masks)
    weights = {name: p for name, p in module.named_parameters()}
    changed = 0
    for t in gradual.targets:
        name = next(n for n, p in weights.items() if p is t.weight)
        got, oneshot, before = t.weight, reference.get_parameter(name), dense.get_parameter(name)
        if reconstruct is False:
            assert torch.equal(got, before * masks[t.name]), name
            changed += not torch.equal(got, oneshot)
        else:
            assert torch.equal(got, oneshot), name
    if reconstruct is False:
        assert changed  # SparseGPT's update moved kept weights; without reconstruct they stay dense
    for (name, a), b in zip(module.state_dict().items(), reference.state_dict().values()):
        if not any(a is t.weight or name.endswith(".weight") and weights.get(name) is t.weight for t in gradual.targets):
            assert torch.equal(a, b), name
    assert all(not t.weight.requires_grad for t in gradual.targets)


def test_dynamic_masks_are_chosen_afresh_exactly_and_frozen_at_end_step(tmp_path):
    module = PlainLM(lr=5e-2)
    gradual = GradualPruningCallback(0.5, pattern="2:4", schedule="constant", start_step=1, end_step=7, every=2,
                                     mode=DynamicMasks(decay=1e-2))
    events = AtEvents(gradual)
    trainer(tmp_path, max_steps=10, callbacks=[gradual, events]).fit(module, token_loader())
    assert sorted(events.masks) == [1, 3, 5, 7]
    assert all(nm_exact(keep) for masks in events.masks.values() for keep in masks.values())
    changed = sum(int((events.masks[1][k] != events.masks[5][k]).sum()) for k in events.masks[1])
    assert changed > 0  # weights pruned at one event came back at a later one
    registry = MaskRegistry.of(module)
    for t in gradual.targets:
        assert (t.weight[~registry.masks[t.name]] == 0).all() and nm_exact(registry.masks[t.name])


def test_dynamic_masks_after_a_oneshot_callback_start_from_its_masks_and_weights(tmp_path):
    """One-shot SparseGPT 2:4, then SR-STE from its solution (magnitude scores): with a learning rate of 0 no
    pruned weight grows back, so every event keeps the one-shot masks and the run ends at the one-shot model."""
    module = PlainLM(lr=0.0)
    reference = copy.deepcopy(module)
    oneshot = SparseGPTPruningCallback(0.5, pattern="2:4", nsamples=6, seqlen=12)
    gradual = GradualPruningCallback(0.5, pattern="2:4", start_step=0, end_step=6, every=2, scorer="magnitude",
                                     scope="layer", mode=DynamicMasks())
    events = AtEvents(gradual)
    trainer(tmp_path, max_steps=8, callbacks=[oneshot, gradual, events]).fit(module, token_loader())

    calibration = [ids[:, :12] for (ids,) in token_loader()][:2]  # batches of 4: 4 + 2 sequences
    calibration[1] = calibration[1][:2]
    prune_oneshot(reference, "sparsegpt", 0.5, "2:4", calibration=calibration, progress=False)
    expected = MaskRegistry.of(reference).masks
    assert sorted(events.masks) == [0, 2, 4, 6]
    assert all(torch.equal(masks[name], expected[name]) for masks in events.masks.values() for name in masks)
    registry = MaskRegistry.of(module)
    assert registry.masks.keys() == expected.keys()
    assert all(torch.equal(registry.masks[name], expected[name]) for name in expected)
    for (name, weight), (_, want) in zip(module.named_parameters(), reference.named_parameters()):
        assert torch.equal(weight, want), name


@pytest.mark.parametrize("initial, start", [(0.3, 1), (0.0, 0)])  # (0, 0): a ramp from step 0, no batch before it
def test_dynamic_unstructured_masks_follow_the_schedule_exactly(tmp_path, initial, start):
    module = PlainLM(lr=1e-2)
    gradual = GradualPruningCallback(0.7, schedule="linear", initial_sparsity=initial, start_step=start, end_step=5,
                                     every=2, scorer="wanda", scope="row", stat_batches=2, mode=DynamicMasks())
    events = AtEvents(gradual)
    trainer(tmp_path, max_steps=7, callbacks=[gradual, events]).fit(module, token_loader())
    assert sorted(events.masks) == ([1, 3, 5] if start else [0, 2, 4, 5])
    for step, masks in events.masks.items():
        target = gradual.schedule.sparsity_at(step)
        if target == 0:  # the ramp's step-0 event: nothing to prune yet, the model stays dense
            assert not masks
            continue
        for t in gradual.targets:
            rows = masks[t.name].reshape(t.weight.shape)
            per_row = (~rows).sum(dim=1)
            assert (per_row == int(math.floor(target * rows.shape[1] + 0.5))).all(), (step, t.name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_after_the_freeze_pruned_weights_stay_exactly_zero(tmp_path, optimizer):
    class Module(PlainLM):
        def configure_optimizers(self):
            if optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=5e-2, momentum=0.9)
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    for mode in (LearnedMasks(prior="magnitude"), DynamicMasks(decay=0.1)):
        module = Module()
        gradual = GradualPruningCallback(0.5, pattern="2:4", schedule="constant", start_step=1, end_step=3, every=1,
                                         mode=mode)
        trainer(tmp_path, max_steps=12, callbacks=[gradual]).fit(module, token_loader())
        registry = MaskRegistry.of(module)
        assert registry.masks
        for t in gradual.targets:
            assert (t.weight[~registry.masks[t.name]] == 0).all(), (type(mode).__name__, t.name)


def _run_learning(make_mode, root, ckpt_path=None, checkpoint=None):
    module = PlainLM(lr=1e-2, seed=1)
    callbacks = [GradualPruningCallback(0.5, pattern="2:4", schedule="constant", start_step=1, end_step=9, every=2,
                                        mode=make_mode())]
    if checkpoint is not None:
        callbacks.append(checkpoint)
    trainer(root, max_epochs=3, limit_train_batches=4, callbacks=callbacks,
            enable_checkpointing=checkpoint is not None).fit(module, token_loader(), ckpt_path=ckpt_path)
    return module, callbacks[0]


def _assert_same_model(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    masks_a, masks_b = MaskRegistry.of(a).masks, MaskRegistry.of(b).masks
    assert masks_a and masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


@pytest.mark.parametrize("make_mode", [lambda: LearnedMasks(prior="magnitude", logit_lr=0.5), lambda: DynamicMasks()])
def test_resume_inside_the_learning_phase_is_bit_identical(tmp_path, make_mode):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}")
    full, full_cb = _run_learning(make_mode, tmp_path / "a", checkpoint=checkpoint)
    middle = tmp_path / "ckpt" / "step=4.ckpt"  # events at 1, 3, 5, 7, 9: step 4 is inside the learning phase
    state = torch.load(middle, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("GradualPruningCallback")]
    assert state["callbacks"][key]["mode"]  # the logits / masks travel in the checkpoint
    resumed, resumed_cb = _run_learning(make_mode, tmp_path / "b", ckpt_path=str(middle))
    assert resumed_cb.last_event_step == full_cb.last_event_step == 9
    _assert_same_model(full, resumed)


def test_resume_from_a_checkpoint_with_candidate_last_logits_is_bit_identical(tmp_path):
    """Checkpoints written before the logits were stored candidate-first hold them as (out, in // m, C), with
    their Adam moments, and no layout key: they resume to the same model."""
    make_mode = lambda: LearnedMasks(prior="magnitude", logit_lr=0.5)  # noqa: E731
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}")
    full, _ = _run_learning(make_mode, tmp_path / "a", checkpoint=checkpoint)
    state = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("GradualPruningCallback")]
    mode = state["callbacks"][key]["mode"]
    assert mode.pop("layout") == "candidates-first"
    mode["logits"] = {name: value.movedim(0, -1).contiguous() for name, value in mode["logits"].items()}
    for moments in mode["optimizer"]["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            moments[k] = moments[k].movedim(0, -1).contiguous()
    assert all(value.shape[-1] == 6 for value in mode["logits"].values())
    torch.save(state, tmp_path / "old.ckpt")
    resumed, _ = _run_learning(make_mode, tmp_path / "b", ckpt_path=str(tmp_path / "old.ckpt"))
    _assert_same_model(full, resumed)


class SaveLogits(SaveState):
    """Each rank's logits after optimizer step 3 (inside the learning phase), and its weights and masks at the end."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            (gradual,) = [c for c in trainer.callbacks if isinstance(c, GradualPruningCallback)]
            torch.save({k: v.detach().clone() for k, v in gradual.mode._logits.items()},
                       self.directory / f"logits{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_two_ddp_processes_learn_identical_logits_and_masks(tmp_path):
    gradual = GradualPruningCallback(0.5, pattern="2:4", schedule="constant", start_step=1, end_step=5, every=2,
                                     mode=LearnedMasks(prior="magnitude", logit_lr=0.5))
    ddp = trainer(tmp_path, max_steps=6, strategy="ddp_spawn", devices=2, use_distributed_sampler=False,
                  callbacks=[gradual, SaveLogits(tmp_path)])
    ddp.fit(PlainLM(lr=1e-3), datamodule=RankShards())
    logits = [torch.load(tmp_path / f"logits{r}.pt") for r in (0, 1)]
    assert logits[0] and all(torch.equal(v, logits[1][k]) for k, v in logits[0].items())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["masks"]
    for kind in ("weights", "masks"):
        for name, value in ranks[0][kind].items():
            assert torch.equal(value, ranks[1][kind][name]), (kind, name)


# -- bad arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: LearnedMasks(temperature=(0.0, 0.1)), r"temperature must be two finite numbers > 0 \(start, end\), got \(0.0, 0.1\)"),
    (lambda: LearnedMasks(logit_scale=(1.0,)), r"logit_scale must be two finite numbers > 0"),
    (lambda: LearnedMasks(prior_strength=-1.0), r"prior_strength must be a number in \[0, inf\], got -1.0"),
    (lambda: LearnedMasks(prior="wanda", reconstruct=True), r"reconstruct=True .* needs prior='sparsegpt'.*'wanda'"),
    (lambda: LearnedMasks(reconstruct="yes"), r"reconstruct must be True, False or None, got 'yes'"),
    (lambda: LearnedMasks(prior="random"), r"prior must be one of \['masks', 'sparsegpt', 'wanda', 'magnitude'\], got 'random'"),
    (lambda: LearnedMasks(logit_lr=0), r"logit_lr must be a finite number > 0, got 0"),
    (lambda: DynamicMasks(decay=-1), r"decay must be a finite number >= 0, got -1"),
    (lambda: GradualPruningCallback(0.5, end_step=4, mode=LearnedMasks()), r"mode LearnedMasks learns N:M masks: give pattern='N:M'"),
    (lambda: GradualPruningCallback(0.25, pattern="2:4", end_step=4, mode=LearnedMasks()),
     r"final_sparsity must be 0.5 for pattern '2:4', got 0.25"),
    (lambda: GradualPruningCallback(0.5, pattern="4:4", end_step=4, mode=LearnedMasks()), r"pattern '4:4' is not a valid N:M pattern"),
    (lambda: GradualPruningCallback(0.5, end_step=4, scorer="sparsegpt", mode=DynamicMasks()),
     r"mode DynamicMasks chooses masks from scores; scorer 'sparsegpt' rewrites weights"),
    (lambda: GradualPruningCallback(0.5, end_step=4, mode="learned"), r"mode must be None, LearnedMasks\(...\) or DynamicMasks"),
])
def test_bad_arguments_are_named_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_a_freeze_step_after_the_run_is_refused_at_fit_start_before_anything_changes(tmp_path):
    module = PlainLM()
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    gradual = GradualPruningCallback(0.5, pattern="2:4", start_step=0, end_step=50, every=5, mode=LearnedMasks(prior="magnitude"))
    with pytest.raises(ValueError, match=r"mode LearnedMasks freezes the masks at end_step 50, after this run's last "
                                         r"optimizer step \(4\)"):
        trainer(tmp_path, max_steps=4, callbacks=[gradual]).fit(module, token_loader())
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())
    assert not MaskRegistry.of(module).masks and "forward" not in gradual.targets[0].module.__dict__
