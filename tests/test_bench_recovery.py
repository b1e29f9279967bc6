"""The recovery benchmark's summary: which one-shot row a train-time row is held against, and its margin.
The seed also picks the held-out files (seed 2's perplexities are about half seed 0's), so rows must be
compared on the seeds they share, seed by seed."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))  # the script imports its sibling benchtools
    try:
        spec = importlib.util.spec_from_file_location("bench_recovery_script", SCRIPTS / "bench_recovery.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def record(row, seed, ppl, **extra):
    return {"row": row, "label": row, "sparsity_target": 0.5, "pattern": "2:4", "steps": 100, "seed": seed,
            "ppl": ppl, "every": 10, "end_fraction": 0.2, "initial_sparsity": 0.25, "first_event_prunes": True,
            **extra}


def test_a_baseline_with_an_easier_held_out_seed_is_not_taken_for_the_best(bench):
    """One-shot A ran seeds 0 and 1; one-shot B only seed 2, whose held-out text is easier: B's mean is lower,
    but the train-time row shares no seed with B and must be held against A, seed by seed."""
    records = [record("oneshot-sparsegpt-kd", 0, 20.0), record("oneshot-sparsegpt-kd", 1, 18.0),
               record("oneshot-wanda-kd", 2, 10.0),
               record("gradual-sparsegpt-calibration-kd", 0, 19.0), record("gradual-sparsegpt-calibration-kd", 1, 18.9)]
    ramp = next(g for g in bench.summarize(records) if g["row"].startswith("gradual"))
    assert ramp["baseline"] == "oneshot-sparsegpt-kd" and ramp["margin_seeds"] == [0, 1]
    assert ramp["margin_pct"] == pytest.approx(0.0)  # +5% at seed 0, -5% at seed 1
    assert ramp["margin_sd"] == pytest.approx(math.sqrt(50.0))


def test_the_row_is_held_against_the_baseline_it_does_worst_against_on_shared_seeds(bench):
    """Two one-shot rows on the same seeds: the margin reported is the smaller one, and in stds it divides the
    difference of the means over the shared seeds by the larger of the two stds there."""
    records = [record("oneshot-sparsegpt-kd", s, p, nsamples=32) for s, p in ((0, 21.0), (1, 18.0), (2, 10.0))]
    records += [record("oneshot-sparsegpt-kd", s, p, nsamples=128) for s, p in ((0, 20.0), (1, 17.0), (2, 9.5))]
    records += [record("gradual-sparsegpt-calibration-kd", s, p) for s, p in ((0, 19.0), (1, 17.0))]
    ramp = next(g for g in bench.summarize(records) if g["row"].startswith("gradual"))
    assert ramp["baseline"].endswith("(128 calibration windows)") and ramp["margin_seeds"] == [0, 1]
    assert ramp["margin_pct"] == pytest.approx(2.5)  # +5% and 0%
    spread = max(math.sqrt(2.0), math.sqrt(4.5))  # stds of (19, 17) and of (20, 17)
    assert ramp["margin_std"] == pytest.approx((18.5 - 18.0) / spread)


def test_a_row_with_no_seed_in_common_gets_no_margin(bench):
    records = [record("oneshot-sparsegpt-kd", 0, 20.0), record("gradual-sparsegpt-calibration-kd", 1, 18.0)]
    ramp = next(g for g in bench.summarize(records) if g["row"].startswith("gradual"))
    assert "margin_pct" not in ramp and "baseline" not in ramp


def bench_args(**overrides):
    from argparse import Namespace

    values = dict(sparsity=0.5, pattern="2:4", steps=100, batch_size=4, block_size=128, nsamples=128,
                  schedule="cubic", exponent=3.0, end_fraction=0.2, every=10, stat_batches=4, initial_sparsity=0.25,
                  start_sparsity=0.3, lora_r=16, prior_strength=3.0, logit_scale=[4.0, 12.0],
                  temperature=[1.0, 0.5], logit_lr=0.03, reconstruct=True, sr_decay=2e-4, seed=0)
    return Namespace(**{**values, **overrides})


def test_the_stream_row_is_the_calibration_ramp_keeping_every_training_sequence(bench):
    """The stream row differs from the calibration ramp only in stream_windows, which holds every sequence of
    the run (steps x batch size), so its 2:4 event sees all training data before it."""
    made = bench.rows(bench_args(steps=400))
    ramp = made["gradual-sparsegpt-calibration-kd"][1]()
    stream = made["gradual-sparsegpt-calibration-stream-kd"][1]()
    assert ramp.stream_windows == 0 and stream.stream_windows == 400 * 4
    for name in ("final_sparsity", "pattern", "scorer", "statistics", "nsamples", "seqlen", "initial_sparsity",
                 "every", "scope"):
        assert getattr(stream, name) == getattr(ramp, name), name


def test_rows_at_another_learning_rate_are_their_own_group_held_against_one_shot_at_that_rate(bench):
    """A higher-lr run of a row must not replace the default run of the same seed, and its margin is over the
    one-shot row fine-tuned at the same rate; rows recorded before lr_used existed count as the default."""
    records = [record("oneshot-sparsegpt-kd", s, p) for s, p in ((0, 20.0), (1, 18.0))]
    records += [record("oneshot-sparsegpt-kd", s, p, lr_used=5e-4) for s, p in ((0, 30.0), (1, 28.0))]
    records += [record("sparsegpt-dynamic-magnitude-kd", s, p, lr_used=bench.LR) for s, p in ((0, 20.0), (1, 18.0))]
    records += [record("sparsegpt-dynamic-magnitude-kd", s, p, lr_used=5e-4) for s, p in ((0, 27.0), (1, 25.2))]
    dynamic = [g for g in bench.summarize(records) if g["row"].startswith("sparsegpt-")]
    assert sorted(g["lr"] for g in dynamic) == [bench.LR, 5e-4]
    default, high = sorted(dynamic, key=lambda g: g["lr"])
    assert default["margin_pct"] == pytest.approx(0.0) and "(lr" not in default["label"]
    assert high["margin_pct"] == pytest.approx(10.0) and "(lr 0.0005)" in high["baseline"]
    assert "(lr 0.0005)" in high["label"]


def test_fixed_held_out_rows_are_their_own_group_and_take_in_that_seed_run_without_the_flag(bench):
    """Rows run with --split-seed 0 share seed 0's held-out files: their spread over seeds is the runs' own. They
    are grouped and held against one-shot apart from the rows whose seed picked the files, and seed 0 run without
    the flag (which held out the same files) belongs to both groups."""
    records = [record("oneshot-sparsegpt-kd", s, p) for s, p in ((0, 20.0), (1, 18.0), (2, 10.0))]
    records += [record("gradual-sparsegpt-calibration-kd", s, p) for s, p in ((0, 19.8), (1, 17.8), (2, 9.9))]
    records += [record("oneshot-sparsegpt-kd", s, p, fixed_split=0) for s, p in ((1, 20.2), (2, 19.9))]
    records += [record("gradual-sparsegpt-calibration-kd", s, p, fixed_split=0) for s, p in ((1, 19.8), (2, 19.6))]
    groups = bench.summarize(records)
    ramps = {g["fixed_split"]: g for g in groups if g["row"].startswith("gradual")}
    assert set(ramps) == {None, 0}
    assert ramps[None]["seeds"] == ramps[0]["seeds"] == [0, 1, 2]
    assert ramps[0]["by_seed"] == {0: 19.8, 1: 19.8, 2: 19.6}
    assert "held-out files of seed 0" in ramps[0]["label"] and "held-out files" not in ramps[None]["label"]
    assert "held-out files of seed 0" in ramps[0]["baseline"]
    assert ramps[0]["margin_pct"] == pytest.approx(100 * (0.2 / 20.0 + 0.4 / 20.2 + 0.3 / 19.9) / 3)
    # one std of the fixed rows is small next to the seed-picked rows' (whose held-out text differs)
    assert ramps[0]["margin_std"] > 1 > ramps[None]["margin_std"]
