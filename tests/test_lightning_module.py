"""PrunableLM: building the model from its sources and checking its arguments."""
import pytest
import torch
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


class CopyLM(nn.Module):
    """Predicts that the next token repeats the current one (logits: one-hot of the input)."""

    def __init__(self, vocab=16):
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask=None):
        return torch.nn.functional.one_hot(input_ids, self.vocab).float() * self.scale


def test_validation_logs_token_accuracy_over_the_non_padding_targets(tmp_path):
    """val/acc is the share of next-token targets that are the logits' argmax, over the whole validation set,
    with padded targets left out as val/ppl leaves them out: counted by hand for a model that predicts a
    repeat of the current token."""
    from torch.utils.data import DataLoader

    from lightning_helpers import trainer

    ids = torch.tensor([[1, 1, 2, 2, 2, 3], [4, 4, 4, 4, 4, 4],   # 3 of 5 repeats; 5 of 5 but only 2 targets kept
                        [5, 6, 7, 8, 9, 9], [3, 3, 0, 0, 0, 0]])  # 1 of 5; 1 of 1 kept
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    mask[3, 2:] = 0
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": mask[i:i + 2]} for i in (0, 2)]
    module = PrunableLM(model=CopyLM())
    metrics = trainer(tmp_path).validate(module, DataLoader(batches, batch_size=None))[0]
    assert metrics["val/acc"] == pytest.approx((3 + 2 + 1 + 1) / (5 + 2 + 5 + 1))
    assert "val/ppl" in metrics
