"""Where work runs: this process, or a Ray cluster's workers, behind one map-style interface.

A task is a module-level function of the loaded model, `work(lm, *args, progress=...)`, with its arguments; an executor
runs each task on a model it holds and hands the result back to the driver, in completion order. sweep and generate
build their tasks once and do not know which executor runs them. `progress(n)` is called with units of work as they
finish (a batch of cells, of generations): this process reports them as the work goes; a Ray worker's count arrives,
whole, with its result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from ..backend.model import LoadedModel
from ..core.spec import RayOptions


@dataclass(frozen=True)
class Task:
    name: str  # unique within one map: what errors and the fault-injection test name (a question id)
    work: Callable[..., Any]  # work(lm, *args, progress=callable) -> result; module-level, so Ray sends it by reference
    args: tuple
    size: int  # the units of progress the task is worth


class Executor(Protocol):
    parallel: bool  # tasks run concurrently: hand out the largest first (a short tail)
    description: dict | None  # what run.json records of it (None: this process)

    def share(self, value: Any) -> Any:
        """A large argument several tasks take, sent once (Ray's object store) -> what to pass in its place."""

    def map(self, tasks: Iterable[Task], on_result: Callable[[Task, Any], None], progress: Callable[[int], None]) -> None:
        """Run every task; tasks are drawn from the iterable as capacity frees up, so a task built later sees what
        earlier results taught the driver. An error of the work itself stops the run."""

    def close(self) -> None: ...


class LocalExecutor:
    """This process, one task after another, on the driver's model."""

    parallel = False
    description = None

    def __init__(self, lm: LoadedModel):
        self.lm = lm

    def share(self, value: Any) -> Any:
        return value

    def map(self, tasks: Iterable[Task], on_result: Callable[[Task, Any], None], progress: Callable[[int], None]) -> None:
        for task in tasks:
            on_result(task, task.work(self.lm, *task.args, progress=progress))

    def close(self) -> None:
        pass


def open_executor(lm: LoadedModel, ray: RayOptions | None) -> Executor:
    """This process, or a Ray pool whose workers are started and have loaded (and matched) the model."""
    if ray is None:
        return LocalExecutor(lm)
    from .distributed import RayExecutor

    return RayExecutor(lm, ray)
