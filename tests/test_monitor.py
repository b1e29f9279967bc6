import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradprune.callbacks import GradualPruningCallback, SparsityMonitor
from lightning_helpers import tiny_module, token_loader, trainer


def test_tensorboard_has_sparsity_beside_validation_metric(tmp_path):
    module = tiny_module()
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = SparsityMonitor()
    gradual = GradualPruningCallback(0.6, schedule="cubic", start_step=0, end_step=8, every=4, scope="global")
    trainer(tmp_path, max_steps=12, logger=logger, val_check_interval=4, log_every_n_steps=1,
            callbacks=[gradual, monitor]).fit(module, token_loader(n=48), token_loader(n=8, seed=1))

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"sparsity/target", "sparsity/achieved", "sparsity/global", "val/ppl"} <= scalars
    assert "sparsity/layer/model.model.layers.0.self_attn.q_proj" in scalars
    achieved = {e.step: e.value for e in events.Scalars("sparsity/achieved")}
    target = {e.step: e.value for e in events.Scalars("sparsity/target")}
    assert achieved == pytest.approx(target, abs=2e-3) and max(achieved.values()) == pytest.approx(0.6, abs=1e-3)
    sparsity_at_val = [e.value for e in events.Scalars("sparsity/global")]
    ppl = [e.value for e in events.Scalars("val/ppl")]
    assert len(sparsity_at_val) == len(ppl) == 3  # validations at steps 4, 8, 12, each with both values
    assert sparsity_at_val[-1] == pytest.approx(0.6, abs=1e-3) and all(p > 1 for p in ppl)
    assert "custom_scalars__config__" in events.Tags()["tensors"]  # the sparsity-vs-metric chart layout

    report = monitor.report
    assert report["global_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert report["val/ppl final"] == pytest.approx(ppl[-1], rel=1e-5)
    assert set(report["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (tmp_path / "tb" / "version_0" / "gradprune_report.json").exists()


@pytest.fixture
def fresh_gradprune_logger(monkeypatch):
    """The gradprune logger as a new Python process has it: no level, no handler."""
    import logging

    logger = logging.getLogger("gradprune")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    return logger


def test_a_fit_from_python_logs_each_event_and_the_report_and_writes_the_history(tmp_path, fresh_gradprune_logger,
                                                                               gradprune_logs):
    import json

    logger = TensorBoardLogger(tmp_path, name="tb")
    gradual = GradualPruningCallback(0.5, schedule="linear", start_step=2, end_step=6, every=2)
    trainer(tmp_path, max_steps=8, logger=logger, val_check_interval=4, callbacks=[gradual, SparsityMonitor()]).fit(
        tiny_module(), token_loader(n=48), token_loader(n=8, seed=1))

    text = gradprune_logs.text()  # nothing set a level: the callbacks show gradprune's INFO messages themselves
    import re

    events = re.findall(r"step (\d+): pruned to \d\.\d{4} sparsity \(target \d\.\d{4}\) in \d+\.\ds", text)
    assert events == ["2", "4", "6"]  # each event with its time
    assert "gradprune report" in text and "final sparsity 0.5000" in text
    report = json.loads((tmp_path / "tb" / "version_0" / "gradprune_report.json").read_text())
    assert [h["step"] for h in report["history"]] == [4, 8]
    assert report["history"][-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_show_logs_adds_a_handler_only_where_the_program_set_up_none(monkeypatch, fresh_gradprune_logger):
    import logging

    from gradprune.callbacks.base import LOG_FORMAT, show_logs

    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])  # the program set up logging
    show_logs()
    assert fresh_gradprune_logger.level == logging.INFO and fresh_gradprune_logger.handlers == []
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a plain `python train.py`
    show_logs()
    (handler,) = fresh_gradprune_logger.handlers
    assert handler.formatter._fmt == LOG_FORMAT and fresh_gradprune_logger.propagate is False
    show_logs()
    assert len(fresh_gradprune_logger.handlers) == 1


def test_the_rich_progress_bar_of_a_max_steps_run_reads_epoch_0_not_0_of_minus_2(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import RichProgressBar

    bar = RichProgressBar()
    fit = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, max_steps=2,
                     limit_val_batches=0, callbacks=[bar, SparsityMonitor()])
    fit.fit(tiny_module(), token_loader(n=8))
    assert fit.max_epochs == -1  # what Lightning sets for a run bounded by max_steps only
    assert bar._get_train_description(0).strip() == "Epoch 0"
    assert type(bar)._get_train_description(bar, 0).strip() == "Epoch 0/-2"  # Lightning's own text
