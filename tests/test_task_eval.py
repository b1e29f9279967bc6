"""gradprune.evaluate_tasks: lm-eval's numbers for the live model, on a local multiple-choice task."""
import sys

import lightning.pytorch as pl
import pytest
import torch

import gradprune
from gradprune import PrunableLM
from gradprune.task_eval import evaluate_tasks, flatten_results
from gradprune.tokenizer import byte_tokenizer
from lm_tasks import TASK, write_local_task
from tiny_models import TINY_LLAMA, tiny_llama

pytest.importorskip("lm_eval")  # in the dev extra, so `make test` runs these


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return str(write_local_task(tmp_path_factory.mktemp("tasks")))


def lm_eval_directly(model, task_dir, limit=None):
    """lm-eval called by hand the documented way: HFLM around the live model, simple_evaluate."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=byte_tokenizer(), batch_size=8),
                                  tasks=[TASK], num_fewshot=0, limit=limit, log_samples=False, bootstrap_iters=1000,
                                  task_manager=TaskManager(include_path=task_dir))
    return out["results"][TASK]


def test_numbers_are_lm_evals_own_to_the_last_digit_and_the_model_is_left_as_it_was(task_dir):
    model = tiny_llama(vocab=258).train()
    rng = torch.get_rng_state()
    ours = evaluate_tasks(model, [TASK], tokenizer=byte_tokenizer(), include_path=task_dir)
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # lm-eval's eval() and seeding undone
    theirs = lm_eval_directly(model, task_dir)
    assert set(ours) == {TASK}
    assert ours[TASK] == {"acc": theirs["acc,none"], "acc_stderr": theirs["acc_stderr,none"],
                          "acc_norm": theirs["acc_norm,none"], "acc_norm_stderr": theirs["acc_norm_stderr,none"]}
    assert theirs["sample_len"] == 20
    assert ours[TASK]["acc"] in {k / 20 for k in range(21)} and ours[TASK]["acc_stderr"] > 0


def test_a_prunable_lm_and_any_lightning_module_are_evaluated_through_their_causal_lm(task_dir):
    module = PrunableLM(model=dict(TINY_LLAMA), vocab_size=258)
    direct = lm_eval_directly(module.model, task_dir, limit=8)

    class Holder(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

    from_module = evaluate_tasks(module, TASK, tokenizer="bytes", limit=8, include_path=task_dir)
    from_holder = evaluate_tasks(Holder(module.model), f"{TASK},", tokenizer="bytes", limit=8, include_path=task_dir)
    assert from_module == from_holder
    assert from_module[TASK]["acc"] == direct["acc,none"] and from_module[TASK]["acc_norm"] == direct["acc_norm,none"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=[]), r"tasks must name at least one lm-eval task .*got \[\]"),
    (dict(tasks=" , "), r"tasks must name at least one lm-eval task .*got \[\]"),
    (dict(limit=0), r"limit must be None \(every item\), an int >= 1 .* got 0"),
    (dict(limit=-3), r"limit must be .* got -3"),
    (dict(limit=1.5), r"limit must be .*fraction in \(0, 1\], got 1.5"),
    (dict(tasks=[f"{TASK}x"]), rf"tasks: '{TASK}x' is not an lm-eval task or under include_path=.*did you mean '{TASK}'"),
    (dict(tasks=["arc_easy", "no_such_task_here"]), r"tasks: 'no_such_task_here' is not an lm-eval task"),
    (dict(include_path="/no/such/folder"), r"include_path='/no/such/folder' is not a folder"),
    (dict(model=tiny_llama(vocab=128)), r"tokenizer: its vocabulary has 258 token ids but the model \(LlamaForCausalLM\) embeds only 128"),
])
def test_bad_input_is_named_before_the_model_is_touched(task_dir, kwargs, match):
    model = kwargs.pop("model", None) or tiny_llama(vocab=258)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = dict(tasks=[TASK], tokenizer=byte_tokenizer(), include_path=task_dir)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate_tasks(model, **args)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_without_a_known_tokenizer_is_asked_for_one(task_dir):
    with pytest.raises(ValueError, match=r"tokenizer=None: cannot tell which tokenizer belongs to the LlamaForCausalLM"):
        evaluate_tasks(tiny_llama(vocab=258), [TASK], include_path=task_dir)


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ImportError, match=r"pip install gradprune\[eval\]"):
        gradprune.evaluate_tasks(tiny_llama(vocab=258), ["arc_easy"], tokenizer=byte_tokenizer())


def test_results_are_flattened_without_the_filter_suffix():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 1.0, "sample_len": 4}}
    assert flatten_results(results) == {"t": {"acc": 0.5, "acc_stderr": 0.1, "exact_match,strict": 1.0}}
