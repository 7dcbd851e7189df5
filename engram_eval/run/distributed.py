"""Sweeps and generation sharded over a Ray cluster (the optional `ray` extra; nothing here runs without `--ray`).

RayExecutor is the executor (engram_eval.run.executors) of a Ray cluster. The driver does what is done once — prepares
the questions, fills the engram store, lays out the grid — and shares every engram's raw vectors through Ray's object
store. Workers are actors that load the model once and keep it, and run the task they are handed (a question's cells,
a batch of generations); the driver hands out whole questions, largest first, and each returns its question's rows as
an Arrow table, which the driver writes as the question's part file with the same atomic write as a single-process
sweep. So the run directory and the
store live on the driver's disk alone; only the model must be loadable on every node. A worker that dies (killed, out
of memory) has its question retried on a fresh worker; a killed driver leaves only whole part files, and a rerun
resumes."""

from __future__ import annotations

import os
import signal
import socket
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..backend.model import LoadedModel, load_model
from ..core.errors import EngramEvalError
from ..core.spec import RayOptions

INSTALL_HINT = "pip install 'engram-eval[ray]'"
CONNECT_SECONDS = 10
MAX_ATTEMPTS = 3  # tries per question before the run fails
WORKER_START_SECONDS = 1800  # a worker loads its model within this (a 7B model from a network disk can take minutes)
TEST_KILL_ONCE = "ENGRAM_EVAL_TEST_KILL_WORKER_ONCE"  # "question_id:marker_path": a worker SIGKILLs itself there, once


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EngramEvalError(f"--ray: Ray is not installed; install the extra: {INSTALL_HINT}") from None
    return ray


def connect(options: RayOptions) -> Any:
    """Join the cluster (or start a local one for `auto`) -> the ray module. An address is checked for an answer first,
    within CONNECT_SECONDS, so a wrong one is one line rather than a long hang."""
    ray = import_ray()
    if options.address != "auto":
        host, _, port = options.address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_SECONDS).close()
        except (OSError, ValueError):
            raise EngramEvalError(f"--ray: no Ray cluster answers at {options.address} (waited {CONNECT_SECONDS} s)") from None
    if ray.is_initialized():
        return ray
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if options.address == "auto":
        try:
            ray.init(address="auto", **quiet)
        except (ConnectionError, RuntimeError):
            ray.init(**quiet)  # no running cluster: a local one with this machine's CPUs (and GPUs)
    else:
        ray.init(address=options.address, **quiet)
    return ray


def plan_workers(options: RayOptions) -> tuple[Any, int]:
    """Connect, and check that the cluster can place the workers asked for -> (ray, number of workers). Run before any
    model work: an actor that cannot be placed would wait forever."""
    ray = connect(options.check())
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if options.gpus_per_worker > gpus:
        raise EngramEvalError(f"--gpus-per-worker: {options.gpus_per_worker:g} GPUs asked for, but the cluster has {gpus:g}")
    per_worker = options.gpus_per_worker or options.threads_per_worker
    workers = options.workers or max(1, int((gpus if options.gpus_per_worker else cpus) // per_worker))
    if workers * options.threads_per_worker > cpus:
        raise EngramEvalError(f"--workers: {workers} workers x {options.threads_per_worker} threads need "
                              f"{workers * options.threads_per_worker} CPUs; the cluster has {cpus:g}")
    if workers * options.gpus_per_worker > gpus:
        raise EngramEvalError(f"--workers: {workers} workers x {options.gpus_per_worker:g} GPUs need "
                              f"{workers * options.gpus_per_worker:g} GPUs; the cluster has {gpus:g}")
    return ray, workers


class Worker:
    """A Ray actor's body: loads the model once and keeps it, and runs the work it is handed on it (a question's cells,
    a batch of generations)."""

    def __init__(self, spec: str, device: str, dtype: str, trust_remote_code: bool, threads: int):
        torch.set_num_threads(threads)
        self.lm = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)

    def fingerprint(self) -> str:
        return self.lm.fingerprint

    def call(self, key: str, work: Callable[..., Any], *args: Any) -> Any:
        """work(model, *args): a module-level function of the layer above (Ray sends it by reference); its progress
        is counted by the driver when the result arrives."""
        _die_here_once(key)
        return work(self.lm, *args, progress=lambda n: None)


def _die_here_once(key: str) -> None:
    """Fault injection for the tests: die as a worker killed mid-question would, the first time it reaches `key`."""
    target, _, marker = os.environ.get(TEST_KILL_ONCE, "").partition(":")
    if target == key and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


class RayExecutor:
    """The Ray cluster's workers, each with the model loaded once: an executor (engram_eval.run.executors) whose tasks
    travel to whichever worker is free. A worker that dies has its task retried on a fresh worker (at most
    MAX_ATTEMPTS tries)."""

    parallel = True

    def __init__(self, lm: LoadedModel, options: RayOptions):
        if not lm.spec:
            raise EngramEvalError(f"--ray: workers load the model by its --model name, and {lm.name} has none")
        self.ray, self.size = plan_workers(options)
        self.lm, self.options = lm, options
        env = {TEST_KILL_ONCE: os.environ[TEST_KILL_ONCE]} if TEST_KILL_ONCE in os.environ else {}
        self.actor = self.ray.remote(Worker).options(num_cpus=options.threads_per_worker, num_gpus=options.gpus_per_worker,
                                                     max_restarts=0, runtime_env={"env_vars": env} if env else None)
        self.workers = [self._start() for _ in range(self.size)]
        try:
            fingerprints = self.ray.get([w.fingerprint.remote() for w in self.workers], timeout=WORKER_START_SECONDS)
        except self.ray.exceptions.GetTimeoutError:
            self.close()
            raise EngramEvalError(f"--ray: the workers did not load the model within {WORKER_START_SECONDS} s") from None
        for fingerprint in fingerprints:
            if fingerprint != lm.fingerprint:
                self.close()
                raise EngramEvalError(f"--ray: a worker loaded '{lm.spec}' as another model ({fingerprint[:12]}, driver "
                                      f"{lm.short_fingerprint}): every node needs the same weights")

    @property
    def description(self) -> dict:
        return {"ray": self.ray.__version__, "workers": self.size, "gpus_per_worker": self.options.gpus_per_worker,
                "threads_per_worker": self.options.threads_per_worker}

    def _start(self):
        device = "cuda" if self.options.gpus_per_worker else "cpu"
        dtype = str(self.lm.dtype).removeprefix("torch.")
        return self.actor.remote(self.lm.spec, device, dtype, self.lm.trust_remote_code, self.options.threads_per_worker)

    def share(self, value: Any) -> Any:
        return self.ray.put(value)  # a top-level ObjectRef argument arrives at the worker as the value

    def map(self, tasks: Iterable[Any], on_result: Callable[[Any, Any], None], progress: Callable[[int], None]) -> None:
        """tasks: engram_eval.run.executors.Task (this module imports nothing of the layers that make them)."""
        ray = self.ray
        fresh, retries = iter(tasks), deque()
        idle, running = list(self.workers), {}
        while True:
            while idle:
                if retries:
                    task, attempt = retries.popleft()
                elif (task := next(fresh, None)) is not None:
                    attempt = 1
                else:
                    break
                worker = idle.pop()
                running[worker.call.remote(task.name, task.work, *task.args)] = (worker, task, attempt)
            if not running:
                return
            (ref,), _ = ray.wait(list(running), num_returns=1)
            worker, task, attempt = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError:
                if attempt >= MAX_ATTEMPTS:
                    raise EngramEvalError(f"--ray: '{task.name}' failed {attempt} times: its workers died") from None
                replacement = self._start()
                self.workers[self.workers.index(worker)] = replacement
                idle.append(replacement)
                retries.append((task, attempt + 1))
                continue
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
            idle.append(worker)
            on_result(task, result)
            progress(task.size)

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
