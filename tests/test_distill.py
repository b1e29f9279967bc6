import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import gradprune as gp
from gradprune.callbacks import PruningCallback
from gradprune.distill import Distillation, distillation_loss, hidden_loss, hidden_state_loss, kd_loss, squarehead_loss
from lightning_helpers import tiny_module, token_loader, trainer
from tiny_models import TINY_LLAMA, tiny_llama

pytestmark = pytest.mark.numerics  # run again under other CPU kernels by .ci/run (make test-numerics)


def hand_made():
    torch.manual_seed(0)
    student = torch.randn(2, 4, 5)
    teacher = torch.randn(2, 4, 5)
    ids = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return student, teacher, ids, mask


def test_alpha_one_is_plain_cross_entropy():
    student, teacher, ids, mask = hand_made()
    parts = distillation_loss(student, teacher, ids, mask, alpha=1.0, temperature=3.0)
    # targets: ids[:, 1:], minus the padded positions (row 1 keeps only its first target)
    logits = torch.cat([student[0, :3], student[1, :1]])
    targets = torch.cat([ids[0, 1:], ids[1, 1:2]])
    assert parts["loss"].item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_alpha_zero_is_t2_kl_over_non_padding_tokens(temperature):
    student, teacher, ids, mask = hand_made()
    parts = distillation_loss(student, teacher, ids, mask, alpha=0.0, temperature=temperature)
    positions = [(0, 0), (0, 1), (0, 2), (1, 0)]
    total = 0.0
    for b, t in positions:
        p = torch.softmax(teacher[b, t] / temperature, -1)
        q = torch.softmax(student[b, t] / temperature, -1)
        total += float((p * (p.log() - q.log())).sum())
    assert parts["loss"].item() == pytest.approx(temperature**2 * total / len(positions), rel=1e-5)
    assert parts["kd"].item() == pytest.approx(parts["loss"].item())


def test_mixture_and_identical_logits():
    student, teacher, ids, mask = hand_made()
    mixed = distillation_loss(student, teacher, ids, mask, alpha=0.3, temperature=2.0)
    assert mixed["loss"].item() == pytest.approx(0.3 * mixed["ce"].item() + 0.7 * mixed["kd"].item(), rel=1e-6)
    assert kd_loss(student, student.clone(), 2.0, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_loss_normalised_mse():
    a = [torch.randn(2, 3, 8) for _ in range(3)]
    assert hidden_loss(a, [x.clone() for x in a], [1, 2], True).item() == pytest.approx(0.0, abs=1e-6)
    b = [x * 3 + 1 for x in a]  # same after layer normalisation, not before
    assert hidden_loss(a, b, [1], True).item() == pytest.approx(0.0, abs=1e-5)
    assert hidden_loss(a, b, [1], False).item() > 0.1


def squarehead_states():
    """hidden states [B=1, T=3, H=2] for embeddings (0) and two blocks (1, 2); token 2 is padding."""
    teacher = [
        torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]),
        torch.tensor([[[1.0, 1.0], [1.0, -1.0], [9.0, 9.0]]]),
        torch.tensor([[[2.0, 0.0], [0.0, 2.0], [5.0, 5.0]]]),
    ]
    student = [
        torch.tensor([[[7.0, 7.0], [7.0, 7.0], [7.0, 7.0]]]),  # embeddings far off: not part of "all"
        torch.tensor([[[2.0, 1.0], [1.0, -1.0], [0.0, 0.0]]]),
        torch.tensor([[[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]]]),
    ]
    return student, teacher, torch.tensor([[1, 1, 0]])


def test_squarehead_by_hand():
    student, teacher, mask = squarehead_states()
    layers = Distillation(hidden_loss="squarehead", hidden_layers="all").layer_indices(2)
    assert layers == [1, 2]
    # layer 1: error per token (1^2 + 0^2) / 2 = 0.5, 0 -> 0.25; teacher energy (1 + 1) / 2 = 1, 1 -> 1
    # layer 2: error 0, (0 + 2^2) / 2 = 2 -> 1; teacher energy 2, 2 -> 2; sum 0.25 / 1 + 1 / 2 = 0.75
    assert squarehead_loss(student, teacher, layers, mask).item() == pytest.approx(0.75, rel=1e-7)
    assert hidden_state_loss("squarehead", student, teacher, layers, True, mask).item() == pytest.approx(0.75, rel=1e-7)
    # the padding token counts without the mask: layer 1 (0.5 + 0 + 81) / 3 over (1 + 1 + 81) / 3,
    # layer 2 (0 + 2 + 16) / 3 over (2 + 2 + 25) / 3
    expected = 81.5 / 83 + 18 / 29
    assert squarehead_loss(student, teacher, layers).item() == pytest.approx(expected, rel=1e-6)
    # one layer alone, and scale invariance: scaling both states leaves every ratio unchanged
    assert squarehead_loss(student, teacher, [2], mask).item() == pytest.approx(0.5, rel=1e-7)
    scaled = squarehead_loss([x * 10 for x in student], [x * 10 for x in teacher], layers, mask)
    assert scaled.item() == pytest.approx(0.75, rel=1e-6)
    # "mse" keeps today's layer-normalised mean
    assert hidden_state_loss("mse", student, teacher, [1, 2], True, mask).item() == pytest.approx(
        hidden_loss(student, teacher, [1, 2], True, mask).item()
    )


def test_squarehead_zero_teacher_is_finite():
    zeros = [torch.zeros(1, 3, 2)] * 2
    assert squarehead_loss(zeros, zeros, [1]).item() == 0.0
    student = [torch.zeros(1, 3, 2), torch.full((1, 3, 2), 1e-3)]
    value = squarehead_loss(student, zeros, [1])
    assert torch.isfinite(value) and value.item() == pytest.approx(1e-6 / 1e-8, rel=1e-4)  # MSE / eps
    # a padding-only batch has no tokens: 0, not NaN
    assert squarehead_loss(student, zeros, [1], torch.zeros(1, 3)).item() == 0.0


def test_squarehead_gradient_reaches_the_student_only():
    student, teacher, mask = squarehead_states()
    student = [x.clone().requires_grad_() for x in student]
    squarehead_loss(student, teacher, [1, 2], mask).backward()
    assert student[0].grad is None  # the embeddings are not in the loss
    assert torch.all(student[1].grad[0, 2] == 0) and torch.all(student[2].grad[0, 2] == 0)  # padding
    # d/ds of (s - t)^2 / (H * n_tokens * energy): layer 1, token 0, feature 0: 2 * 1 / (2 * 2 * 1) = 0.5
    assert student[1].grad[0, 0, 0].item() == pytest.approx(0.5)


class PruneAtFitStart(PruningCallback):
    """Stands in for a one-shot callback: prunes when fit starts (once), masks enforced afterwards."""

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        if not self.registry(pl_module).masks:
            gp.prune(pl_module, 0.5)


@pytest.mark.parametrize("order", ["pruner_first", "pruner_last"])
def test_self_teacher_is_dense_frozen_and_outside_optimizer(tmp_path, order):
    module = tiny_module(distill=Distillation(alpha=0.5, temperature=2.0, hidden_layers=[1, 2]))
    dense = {k: v.clone() for k, v in module.model.state_dict().items()}
    grads = []

    class Probe(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(any(p.grad is not None for p in pl_module.teacher.parameters()))

    callbacks = [PruneAtFitStart(), Probe()] if order == "pruner_first" else [Probe(), PruneAtFitStart()]
    fit = trainer(tmp_path, max_steps=6, log_every_n_steps=1, callbacks=callbacks)
    fit.fit(module, token_loader())
    teacher = module.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # the dense weights, unchanged by pruning or training
        assert torch.equal(value, dense[name]), name
    assert grads and not any(grads)
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert gp.sparsity_report(module)["global"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert {"train/ce", "train/kd", "train/hidden"} <= set(fit.callback_metrics)


def test_checkpoint_has_no_teacher_and_resume_rebuilds_it(tmp_path):
    module = tiny_module(distill=Distillation())
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=4, callbacks=[PruneAtFitStart(), checkpoint], enable_checkpointing=True).fit(
        module, token_loader()
    )
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(state["state_dict"]) == {f"model.{k}" for k in module.model.state_dict()} | {
        k for k in state["state_dict"] if k.startswith("val_perplexity")
    }
    assert state["hyper_parameters"]["distill"]["teacher"] == "self"
    loaded = gp.PrunableLM.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # rebuilt from the saved dict
    assert loaded.distill == Distillation()
    assert all(torch.equal(v, state["state_dict"][k]) for k, v in loaded.state_dict().items())

    resumed = tiny_module(distill=Distillation())
    dense = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    trainer(tmp_path / "b", max_steps=6, callbacks=[PruneAtFitStart()]).fit(
        resumed, token_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert all(torch.equal(v, dense[k]) for k, v in resumed.teacher.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.5), r"distill.alpha must be in \[0, 1\], got 1.5"),
        (dict(alpha=-0.1), r"distill.alpha must be in \[0, 1\], got -0.1"),
        (dict(temperature=0.0), r"distill.temperature must be > 0 and finite, got 0.0"),
        (dict(teacher_dtype="int8"), r"distill.teacher_dtype must be one of"),
    ],
)
def test_bad_distill_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Distillation(**kwargs)


@pytest.mark.parametrize("distill, error, match", [
    (dict(alpha=0.3, tempo=2), ValueError, r"distill has unknown keys \['tempo'\]"),
    ("self", TypeError, r"distill must be a gradprune.distill.Distillation or a dict of its fields, got str"),
])
def test_bad_distill_argument(distill, error, match):
    with pytest.raises(error, match=match):
        tiny_module(distill=distill)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_loss="kl"), r"distill.hidden_loss must be one of \['mse', 'squarehead'\], got 'kl'"),
        (dict(hidden_layers="last"), r"distill.hidden_layers must be 'all' or a list of integers .*got 'last'"),
        (dict(hidden_layers=[1, "2"]), r"distill.hidden_layers must be 'all' or a list of integers .*got \[1, '2'\]"),
        (dict(hidden_layers=[-1]), r"distill.hidden_layers must be >= 0 .*got \[-1\]"),
        (dict(hidden_loss="squarehead"), r"distill.hidden_loss='squarehead' needs hidden_layers: 'all' .*got \[\]"),
    ],
)
def test_bad_hidden_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Distillation(**kwargs)


def test_squarehead_trains_a_tiny_llama_and_logs_hidden(tmp_path):
    module = tiny_module(distill=Distillation(alpha=0.5, hidden_loss="squarehead", hidden_layers="all", hidden_weight=0.5))
    values = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            values.append(float(trainer.callback_metrics["train/hidden"]))

    fit = trainer(tmp_path, max_steps=4, log_every_n_steps=1, callbacks=[PruneAtFitStart(), Record()])
    fit.fit(module, token_loader())
    assert fit.global_step == 4 and module.distiller.hidden_indices == [1, 2]
    assert {"train/ce", "train/kd", "train/hidden"} <= set(fit.callback_metrics)
    assert len(values) == 4 and all(math.isfinite(v) and v > 0 for v in values)  # pruned: student != teacher
    batch = next(iter(token_loader()))[0]
    with torch.no_grad():  # the logged term is squarehead_loss over blocks 1..2 of the two models
        s = module.model(input_ids=batch, output_hidden_states=True).hidden_states
        t = module.teacher(input_ids=batch, output_hidden_states=True).hidden_states
    assert len(s) == 3 and squarehead_loss(s, t, [1, 2]).item() > 0


class NoHiddenStates(torch.nn.Module):
    """A causal LM with a config that returns logits but no hidden states."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
        self.inner = LlamaForCausalLM(LlamaConfig(vocab_size=128, **config))
        self.config = self.inner.config

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        return SimpleNamespace(logits=self.inner(input_ids=input_ids, attention_mask=attention_mask).logits, hidden_states=None)


def test_all_layers_on_a_model_without_hidden_states(tmp_path):
    with pytest.raises(ValueError, match=r"distill.hidden_layers='all' needs a model that returns hidden states .*got Linear"):
        gp.PrunableLM(model=torch.nn.Linear(4, 4), distill=Distillation(hidden_layers="all"))
    module = gp.PrunableLM(model=NoHiddenStates(), distill=Distillation(hidden_loss="squarehead", hidden_layers="all"))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"distill.hidden_layers='all' needs hidden states \[1, 2\] from the model "
                                         r"\(NoHiddenStates\), but its forward\(output_hidden_states=True\) returned none"):
        trainer(tmp_path, max_steps=2, callbacks=[PruneAtFitStart()]).fit(module, token_loader())
    assert all(torch.equal(v, before[k]) for k, v in module.model.state_dict().items())  # failed before pruning


def test_all_layers_need_the_same_depth(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in TINY_LLAMA.items() if k not in ("model_type", "num_hidden_layers")}
    LlamaForCausalLM(LlamaConfig(vocab_size=128, num_hidden_layers=3, **config)).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"distill.hidden_layers='all' pairs every block .* student has 2 blocks and the teacher 3"):
        tiny_module(distill=Distillation(teacher=str(tmp_path / "teacher"), hidden_loss="squarehead", hidden_layers="all"))


def test_hidden_layers_that_do_not_exist():
    with pytest.raises(ValueError, match=r"distill.hidden_layers \[5\] do not exist: the model has 2 blocks"):
        tiny_module(distill=Distillation(hidden_layers=[1, 5]))


def test_teacher_with_other_vocabulary_rejected(tmp_path):
    tiny_llama(vocab=100).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"vocabulary of 100 tokens, the student 128"):
        tiny_module(distill=Distillation(teacher=str(tmp_path / "teacher")))


def test_distillation_with_gradual_pruning_and_accumulation(tmp_path):
    from gradprune.callbacks import GradualPruningCallback

    module = tiny_module(distill=Distillation(alpha=0.2, temperature=3.0))
    gradual = GradualPruningCallback(0.6, schedule="cubic", end_step=6, every=2)
    fit = trainer(tmp_path, max_steps=8, accumulate_grad_batches=2, log_every_n_steps=1, callbacks=[gradual])
    fit.fit(module, token_loader())
    assert fit.global_step == 8
    for layer in gp.sparsity_report(module)["layers"].values():  # scope "layer": exact in every layer
        assert layer["zeros"] == gp.exact_count(0.6, layer["numel"])
    assert gp.sparsity_report(module.teacher)["global"]["sparsity"] == 0.0  # the teacher stays dense
    assert float(fit.callback_metrics["train/kd"]) > 0
