"""The core promise of GradualPruningCallback: after every event, the first one included, the targets are at
exactly the schedule's sparsity, in every mode (scorer x statistics x allocation x scope). A ramp that starts
at initial_sparsity > 0 prunes to it at its first event; it never skips it."""
import pytest
from lightning.pytorch.callbacks import Callback

from gradprune import exact_count
from gradprune.callbacks import GradualPruningCallback
from lightning_helpers import token_loader, trainer
from test_gradual_scorers import PlainLM

pytestmark = pytest.mark.numerics

WEIGHT_SCORERS = {"magnitude"}  # need nothing from training: their first event may be at step 0


class AfterEachEvent(Callback):
    """Zeros of the targets right after each event (events run at batch start for step 0, else at batch end)."""

    def __init__(self, gradual):
        self.gradual, self.zeros = gradual, {}

    def _record(self, trainer, pl_module):
        step = self.gradual.last_event_step
        if step is not None and step not in self.zeros:
            self.zeros[step] = sum(int((t.weight == 0).sum()) for t in self.gradual.targets)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(trainer, pl_module)


def expected_zeros(targets, target, scope):
    if scope == "global":
        return exact_count(target, sum(t.numel for t in targets))
    if scope == "row":
        return sum(t.out_in(t.weight).shape[0] * exact_count(target, t.numel // t.out_in(t.weight).shape[0]) for t in targets)
    return sum(exact_count(target, t.numel) for t in targets)


MODES = [
    (scorer, statistics, allocation, scope)
    for scorer in ("magnitude", "wanda", "ria", "taylor", "sparsegpt")
    for statistics in ("window", "calibration")
    for allocation in ("uniform", "owl")
    for scope in ("layer", "row", "global")
]


def build(scorer, statistics, allocation, scope):
    start = 0 if scorer in WEIGHT_SCORERS or statistics == "calibration" else 1
    calibration = dict(nsamples=4, seqlen=12) if statistics == "calibration" else {}
    return GradualPruningCallback(0.6, schedule="linear", initial_sparsity=0.35, start_step=start, end_step=start + 4,
                                  every=2, scope=scope, scorer=scorer, statistics=statistics, allocation=allocation,
                                  stat_batches=2, **calibration)


@pytest.mark.parametrize("scorer, statistics, allocation, scope", MODES)
def test_every_event_reaches_the_schedules_sparsity_first_event_included(tmp_path, scorer, statistics, allocation, scope):
    try:
        gradual = build(scorer, statistics, allocation, scope)
    except ValueError:
        pytest.skip("a combination the callback refuses at construction (tests/test_gradual*.py pin those messages)")
    record = AfterEachEvent(gradual)
    trainer(tmp_path, max_steps=gradual.start_step + 5, callbacks=[gradual, record]).fit(PlainLM(lr=1e-2), token_loader())
    schedule = gradual.schedule
    assert sorted(record.zeros) == schedule.events()
    first = schedule.events()[0]
    assert schedule.sparsity_at(first) == pytest.approx(0.35)
    total = sum(t.numel for t in gradual.targets)
    for step, zeros in record.zeros.items():
        target = schedule.sparsity_at(step)
        if allocation == "owl":  # budgets per layer, exact in total up to one weight per layer's rounding
            assert abs(zeros - target * total) <= len(gradual.targets), (step, zeros, target * total)
        else:
            assert zeros == expected_zeros(gradual.targets, target, scope), (step, target)
    assert record.zeros[first] > 0.3 * total  # the first event pruned: the ramp starts at 35%, not at 0
