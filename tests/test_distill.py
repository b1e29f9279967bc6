import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import gradprune as gp
from gradprune.callbacks import PruningCallback
from gradprune.distill import Distillation, distillation_loss, hidden_loss, kd_loss
from lightning_helpers import tiny_module, token_loader, trainer
from tiny_models import tiny_llama

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
        (dict(temperature=0.0), r"distill.temperature must be > 0, got 0.0"),
        (dict(teacher_dtype="int8"), r"distill.teacher_dtype must be one of"),
    ],
)
def test_bad_distill_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Distillation(**kwargs)


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
