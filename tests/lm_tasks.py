"""A local lm-eval task for the tests: multiple choice, 20 items, data written into a folder (no download)."""
import json
from pathlib import Path

TASK = "gp_local_mc"


def write_local_task(folder: Path, items: int = 20, task: str = TASK) -> Path:
    """Write ``<task>.jsonl`` (context, four choices, label) and ``<task>.yaml`` (``dataset_path: json``) into
    ``folder``; returns the folder (lm-eval's include_path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(items):
        words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
        answer = words[i % len(words)]
        choices = [words[(i + k) % len(words)] for k in (3, 0, 5, 1)]  # the answer second, then rotated
        rows.append({"context": f"item {i}: the word is {answer}; again: ", "choices": choices,
                     "label": choices.index(answer)})
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{task}.yaml").write_text("\n".join([
        f"task: {task}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {json.dumps(str(data))}",
        "test_split: test", "output_type: multiple_choice", "doc_to_text: context", "doc_to_choice: choices",
        "doc_to_target: label", 'target_delimiter: ""', "metric_list:", "  - metric: acc", "    aggregation: mean",
        "    higher_is_better: true", "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true",
        "metadata:", "  version: 1.0", ""]))
    return folder
