"""`gradprune evaluate`: lm-eval tasks on a saved model from the command line."""
import json
import subprocess
import sys

import pytest

from gradprune import evaluate_tasks
from gradprune.cli import main
from gradprune.tokenizer import byte_tokenizer
from lm_tasks import TASK, write_local_task
from tiny_models import tiny_llama


def test_evaluate_help_does_not_import_torch():
    code = ("import sys\nfrom gradprune.cli import main\ntry:\n    main(['evaluate', '--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("usage: gradprune evaluate") and "--tasks" in done.stdout
    assert done.stdout.rstrip().endswith("NO TORCH")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pytest.importorskip("lm_eval")  # in the dev extra, so `make test` runs these
    root = tmp_path_factory.mktemp("cli")
    model = tiny_llama(vocab=258)
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    return model, str(root / "model"), str(write_local_task(root / "tasks")), root


def test_evaluate_prints_and_writes_the_numbers_evaluate_tasks_gives(saved, capsys):
    model, directory, tasks, root = saved
    main(["evaluate", "--model", directory, "--tasks", TASK, "--limit", "8", "--include-path", tasks,
          "--output", str(root / "out.json")])
    printed = capsys.readouterr().out
    written = json.loads((root / "out.json").read_text())
    assert json.loads(printed[printed.index("{"):]) == written
    expected = evaluate_tasks(model, [TASK], tokenizer=byte_tokenizer(), limit=8, include_path=tasks)
    assert written == expected and set(written[TASK]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "limit must be None (every item), an int >= 1 (items per task) or a fraction in (0, 1], got 0.0"),
    (["--limit", "2.5"], "argument --limit: a count of items must be a whole number, got 2.5"),
    (["--tasks", f"{TASK},nope_task"], "tasks: 'nope_task' is not an lm-eval task"),
])
def test_bad_arguments_exit_2_naming_the_argument(saved, capsys, extra, message):
    _, directory, tasks, _ = saved
    args = ["evaluate", "--model", directory, "--tasks", TASK, "--include-path", tasks]
    with pytest.raises(SystemExit) as exit_info:
        main(args + extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
