"""PrunableLM: building the model from its sources and checking its arguments."""
import pytest
from torch import nn

from gradprune import PrunableLM
from tiny_models import tiny_llama


def test_model_loaded_from_a_directory_trains_in_train_mode(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model")
    module = PrunableLM(model=str(tmp_path / "model"), vocab_size=128)
    assert module.model.training and all(m.training for m in module.model.modules())


def test_export_dir_with_a_model_that_cannot_save_fails_at_construction():
    with pytest.raises(ValueError, match=r"export_dir='out' needs a model with save_pretrained .* got Linear"):
        PrunableLM(model=nn.Linear(4, 4), export_dir="out")
