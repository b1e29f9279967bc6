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


def test_export_dir_writes_the_chosen_format_with_the_recipe(tmp_path):
    import json

    import torch

    import gradprune as gp
    from gradprune.callbacks import MagnitudePruningCallback
    from lightning_helpers import tiny_module, token_loader, trainer

    module = tiny_module(export_dir=str(tmp_path / "export"), export_format="compressed")
    trainer(tmp_path, max_steps=2, callbacks=[MagnitudePruningCallback(0.6, scope="global")]).fit(module, token_loader())
    info = json.loads((tmp_path / "export" / "gradprune.json").read_text())
    assert info["format"] == "compressed" and info["sparsity"]["global"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    recipe = info["recipe"]
    assert recipe["hparams"]["export_format"] == "compressed" and recipe["global_step"] == 2
    (callback,) = recipe["callbacks"]
    assert callback["class_path"] == "gradprune.callbacks.oneshot.MagnitudePruningCallback"
    assert callback["init_args"]["sparsity"] == 0.6 and callback["init_args"]["pattern"] == "unstructured"
    reloaded = gp.load(tmp_path / "export")
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    dense = module.export(str(tmp_path / "dense"), format="dense")  # any format on demand
    assert json.loads((dense / "gradprune.json").read_text())["format"] == "dense"


def test_unknown_export_format_is_rejected_at_construction():
    with pytest.raises(ValueError, match=r"export_format must be one of \['dense', 'compressed', 'structured'\], got 'sparse'"):
        PrunableLM(model=nn.Linear(4, 4), export_format="sparse")
