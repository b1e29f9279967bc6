"""Warnings at fit start when a run cannot show what was asked of it (issue 25, item 3): each names the
values at fault and the fix."""
import warnings

import pytest

from gradprune.callbacks import GradualPruningCallback, SparsityMonitor
from lightning_helpers import tiny_module, token_loader, trainer


def fit(tmp_path, callbacks, **kwargs):
    trainer(tmp_path, callbacks=callbacks, **kwargs).fit(tiny_module(), token_loader(n=48), token_loader(n=8, seed=1))


def messages(record):
    return [str(w.message) for w in record]


# -- validation never runs before the end --------------------------------------------------------------------
def test_validation_that_never_comes_is_named_with_its_interval_and_the_fix(tmp_path):
    with pytest.warns(UserWarning, match=r"validation will never run: the first comes after 10 training batches "
                                         r"\(val_check_interval=10, check_val_every_n_epoch=None, 12 batches per epoch\), "
                                         r"but this run stops after 6 \(max_steps=6\)\. Set val_check_interval to at "
                                         r"most 6 batches, or train longer"):
        fit(tmp_path, [SparsityMonitor()], max_steps=6, val_check_interval=10, check_val_every_n_epoch=None)


def test_validation_at_the_end_of_an_epoch_the_run_never_finishes_is_named(tmp_path):
    with pytest.warns(UserWarning, match=r"first comes after 12 training batches \(val_check_interval=1\.0, "
                                         r"check_val_every_n_epoch=1, 12 batches per epoch\), but this run stops after 5 "
                                         r".*with check_val_every_n_epoch=None"):
        fit(tmp_path, [SparsityMonitor()], max_steps=5)


def test_no_validation_warning_when_validation_runs(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, [SparsityMonitor()], max_steps=6, val_check_interval=6, check_val_every_n_epoch=None)
    assert not [m for m in messages(record) if "validation will never run" in m]


# -- the ramp collapses into fewer than two events ----------------------------------------------------------------
def test_a_ramp_squeezed_into_one_event_is_named_with_its_steps_and_the_fix(tmp_path):
    gradual = GradualPruningCallback(0.5, initial_sparsity=0.3, start_step=0, end_step=0.1, every=5)
    with pytest.warns(UserWarning, match=r"the pruning ramp collapses into one event: start_step=0, end_step=0\.1 of "
                                         r"this run's 12 optimizer steps = step 1, every=5 give events at steps \[0, 1\], "
                                         r"so the model jumps to final_sparsity at step 1 instead of ramping\. For a "
                                         r"ramp of at least two events set end_step >= 2 \(every=1\) or 10 \(every=5\) "
                                         r"or train longer"):
        fit(tmp_path, [gradual], max_steps=12)


def test_an_every_as_long_as_the_ramp_is_named(tmp_path):
    with pytest.warns(UserWarning, match=r"events at steps \[2, 10\].*set every <= 4"):
        fit(tmp_path, [GradualPruningCallback(0.5, start_step=2, end_step=10, every=8)], max_steps=12)


def test_no_ramp_warning_for_a_ramp_of_several_events_or_a_constant_schedule(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path / "a", [GradualPruningCallback(0.5, start_step=0, end_step=0.5, every=2)], max_steps=12)
        fit(tmp_path / "b", [GradualPruningCallback(0.5, schedule="constant", start_step=2, end_step=3)], max_steps=12)
    assert not [m for m in messages(record) if "collapses" in m]


# -- the schedule ends after max_steps -------------------------------------------------------------------------
def test_a_schedule_ending_after_max_steps_is_named_with_its_last_event_and_the_fix(tmp_path):
    gradual = GradualPruningCallback(0.5, start_step=0, end_step=20, every=4)
    with pytest.warns(UserWarning, match=r"end_step \(20\) is beyond this run's total optimizer steps \(6\): this run "
                                         r"will apply the event at step 4 as the last one, short of final_sparsity 0\.5\. "
                                         r".*otherwise lower end_step or train longer"):
        fit(tmp_path, [gradual], max_steps=6)
