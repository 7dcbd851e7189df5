"""Executors: sweep and generate have one code path whatever runs the tasks. A fake executor that draws every task,
runs them last first on a copy of each argument (as a worker would receive them) and reports progress only when a
task is done gives the same rows as this process."""

import copy

import polars as pl

from conftest import sweep
from engram_eval.run.executors import LocalExecutor, Task


class ShuffledExecutor:
    parallel = True
    description = {"fake": True}

    def __init__(self, lm):
        self.lm, self.shared, self.closed = lm, [], False

    def share(self, value):
        self.shared.append(value)
        return value

    def map(self, tasks, on_result, progress):
        drawn = list(tasks)
        for task in reversed(drawn):
            on_result(task, task.work(self.lm, *copy.deepcopy(task.args), progress=lambda n: None))
            progress(task.size)

    def close(self):
        self.closed = True


def add(lm, a, b, *, progress):
    progress(1)
    return a + b + lm


def test_the_local_executor_runs_tasks_in_order_and_passes_progress_through():
    seen, progressed = [], []
    executor = LocalExecutor(10)
    assert executor.share(big := [1, 2]) is big
    executor.map((Task(str(i), add, (i, 1), 1) for i in range(3)), lambda task, result: seen.append((task.name, result)),
                 progressed.append)
    assert seen == [("0", 11), ("1", 12), ("2", 13)] and progressed == [1, 1, 1]


def test_sweep_and_generate_give_the_same_rows_on_another_executor(tiny, tiny_bank, tmp_path, monkeypatch):
    import engram_eval.run.generation as generation
    import engram_eval.run.sweep as sweep_module
    from engram_eval.run.generation import run_generate

    local = sweep(tiny, tiny_bank, tmp_path / "local")
    local_text = pl.read_parquet(run_generate(tiny, local.out, max_new_tokens=4, batch_size=2, progress=False).generations_path)
    opened = []
    for module in (sweep_module, generation):
        monkeypatch.setattr(module, "open_executor", lambda lm, ray: opened.append(ShuffledExecutor(lm)) or opened[-1])
    other = sweep(tiny, tiny_bank, tmp_path / "other")
    assert pl.read_parquet(other.results_path).equals(pl.read_parquet(local.results_path))
    assert other.run["distributed"] == {"fake": True} and other.run["cells"] == local.run["cells"]
    other_text = pl.read_parquet(run_generate(tiny, other.out, max_new_tokens=4, batch_size=2, progress=False).generations_path)
    assert other_text.equals(local_text)
    assert len(opened) == 2 and all(executor.closed for executor in opened)
    assert len(opened[0].shared) == 1 and set(opened[0].shared[0]) >= {("topic", 1, 4), ("topic", 4, 4)}  # the raw vectors, once
