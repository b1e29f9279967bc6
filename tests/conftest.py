"""Shared fixtures: tiny Hugging Face models built from config objects (nothing is downloaded)."""
import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from tiny_models import tiny_gpt2, tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


class LogCollector(logging.Handler):
    """Records of the ``gradprune`` loggers, collected by a handler of their own (works under ``-p no:logging``,
    where caplog does not)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list:
        return [record.getMessage() for record in self.records]

    def text(self) -> str:
        return "\n".join(self.messages())


@pytest.fixture
def gradprune_logs(monkeypatch):
    """Collects gradprune's log records; ``gradprune_logs.at_info()`` lets INFO through for the test."""
    logger = logging.getLogger("gradprune")
    level = logger.level
    collector = LogCollector()
    # setLevel, not the attribute: it also clears the loggers' cached isEnabledFor answers, so a child logger
    # that logged at the old level (gradprune.data's "tokenised" line) lets INFO through after at_info()
    collector.at_info = lambda: logger.setLevel(logging.INFO)
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, collector])
    yield collector
    logger.setLevel(level)
