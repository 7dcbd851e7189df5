"""The command group, its error handling and the options several commands share."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import click
from rich.console import Console

from .._version import __version__
from ..core.errors import EngramEvalError, Terminated
from ..core.registry import POOLINGS, Registry
from ..core.spec import LEARN_OBJECTIVES, SEED_EXTRACTION, Extraction, RayOptions

stderr = Console(stderr=True)


def warning_printer() -> Callable[[str], None]:
    """Prints each distinct warning once, as one `warning:` line on stderr."""
    seen: set[str] = set()

    def warn(message: str) -> None:
        if message not in seen:
            seen.add(message)
            click.echo(f"warning: {message}", err=True)

    return warn


def stdout() -> Console:
    """The terminal as it is; piped output (files, CI logs, tests) gets 160 columns so tables do not fold."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


class CliError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class Command(click.Command):
    """Reports a usage mistake (an unknown choice, a missing argument) as one line, like every other bad input."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise CliError(" ".join(exc.format_message().split())) from None


class Group(click.Group):
    """Turns the library's EngramEvalError into one line on stderr and exit status 2, no traceback."""

    command_class = Command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EngramEvalError as exc:
            raise CliError(str(exc)) from None
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM outside a run (loading the model, building): one line
            stopped(exc, "")


def stopped(interrupt: KeyboardInterrupt, what: str) -> NoReturn:
    """Exit as a stopped command should: one line on stderr, 130 after Ctrl-C, 143 after SIGTERM."""
    terminated = isinstance(interrupt, Terminated)
    click.echo(f"{'terminated' if terminated else 'interrupted'}{what or ''}", err=True)
    sys.exit(143 if terminated else 130)


class RegistryChoice(click.Choice):
    """A registry's names as a click choice, read when click first needs them (parsing or --help), so defining the
    command does not import the modules that implement them (torch)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        return self.registry.names()


class RegistryOption(click.Option):
    """An option naming a registry entry: its choices and its --help (the text given, then each entry's summary)
    come from the registry when they are read."""

    def __init__(self, *args, registry: Registry, **kwargs):
        self.registry = registry
        super().__init__(*args, type=RegistryChoice(registry), **kwargs)

    @property
    def help(self) -> str:
        return " ".join(part for part in (self._help_text, self.registry.help()) if part)

    @help.setter
    def help(self, text: str | None) -> None:
        self._help_text = text or ""


def registry_option(name: str, registry: Registry, default: str, help: str = "") -> Callable:
    return click.option(name, cls=RegistryOption, registry=registry, default=default, show_default=True, help=help)


threads_option = click.option(
    "--threads", type=click.IntRange(min=1),
    help="CPU threads torch uses in this process [default: torch's own, from OMP_NUM_THREADS or the cores]; a sweep "
         "records the number in run.json. State it with every timing: on a loaded machine one thread can beat two "
         "(docs/performance.md).")


@contextmanager
def threads_set(threads: int | None) -> Iterator[None]:
    """torch's CPU threads at `threads` while the command runs, as they were afterwards (None: left alone)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MODEL_HELP = "Embedded model (engram-eval models: smollm2-135m, gemma3-270m), local Hugging Face directory, .gguf file or hub id."


def model_options(command: Callable) -> Callable:
    """--model (default: the embedded SmolLM2), --device, --dtype, --trust-remote-code, --threads -> `load_lm()`."""
    return _model_options(command, "smollm2-135m", MODEL_HELP)


def run_model_options(command: Callable) -> Callable:
    """The same for a command that reads a run: --model defaults to the model the run was swept with, and
    `load_lm(recorded)` loads that one unless --model names another."""
    return _model_options(command, None, MODEL_HELP + " [default: the model the run was swept with, from its run.json]")


def _model_options(command: Callable, default: str | None, help: str) -> Callable:
    @click.option("--model", "model_spec", default=default, show_default=default is not None, help=help)
    @click.option("--device", default="auto", show_default=True, help="auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    @click.option("--dtype", default="auto", show_default=True,
                  help="auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16 or float16.")
    @click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model's repository to run (off by default).")
    @threads_option
    @functools.wraps(command)
    def wrapper(model_spec: str | None, device: str, dtype: str, trust_remote_code: bool, threads: int | None, **kwargs):
        def load(recorded: str | None = None):
            from ..backend.model import load_model  # torch: imported once the command's own checks have passed

            spec = model_spec or recorded or "smollm2-135m"
            with stderr.status(f"loading model {spec} ..."):
                return load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)

        with threads_set(threads):
            return command(load_lm=load, **kwargs)

    return wrapper


store_option = click.option("--store", "store_dir", default="store", show_default=True, type=click.Path(file_okay=False),
                            help="Engram store directory.")
chunks_option = click.option("--chunks", "chunks_text", default="16", show_default=True,
                             help="Number of vectors per engram (k), or several for the chunk-count grid: '8,16,32,64,128'.")


def extraction_options(command: Callable) -> Callable:
    """--pooling, --skip-tokens, --window and --max-tokens -> one `extraction` argument (engram_eval.core.spec.Extraction)."""

    @registry_option("--pooling", POOLINGS, SEED_EXTRACTION.pooling, help="How a source's hidden states become k vectors.")
    @click.option("--skip-tokens", default=0, show_default=True, type=click.IntRange(min=0),
                  help="Leave the source's first N positions out of the pooling (the source still runs whole); 1 removes the "
                       "first token's massive activation.")
    @click.option("--window", type=click.IntRange(min=1),
                  help="Run a source longer than N tokens as consecutive independent windows of N tokens, pooled in order "
                       "(no --max-tokens truncation; memory bounded by one window).")
    @click.option("--max-tokens", default=SEED_EXTRACTION.max_tokens, show_default=True, type=click.IntRange(min=1),
                  help="Without --window, truncate source texts at this many tokens (reported when it happens).")
    @click.option("--learn-objective", type=click.Choice(LEARN_OBJECTIVES), default=SEED_EXTRACTION.learn_objective,
                  show_default=True,
                  help="--pooling learned: reconstruct minimises the cross-entropy of the source's tokens given the k "
                       "vectors; distill the KL from the model reading the source before each probe prompt to the model "
                       "reading the vectors before it.")
    @click.option("--learn-steps", default=SEED_EXTRACTION.learn_steps, show_default=True, type=int,
                  help="--pooling learned: at most this many AdamW steps per layer and k (it stops earlier once the loss "
                       "improves by less than 1e-4 over 20 steps).")
    @click.option("--learn-lr", default=SEED_EXTRACTION.learn_lr, show_default=True, type=float,
                  help="--pooling learned: AdamW's learning rate (betas 0.9, 0.9; no weight decay).")
    @click.option("--learn-seed", default=SEED_EXTRACTION.learn_seed, show_default=True, type=int,
                  help="--pooling learned: seeds torch's generator while learning (recorded with the engram).")
    @click.option("--learn-probes", "learn_probes_file", type=click.Path(dir_okay=False, path_type=Path),
                  help="--learn-objective distill: probe prompts, one per line [default: a bundled set of 10 generic "
                       "prompts that mention no bank's answers]. The bank's questions are never used.")
    @functools.wraps(command)
    def wrapper(pooling: str, skip_tokens: int, window: int | None, max_tokens: int, learn_objective: str, learn_steps: int,
                learn_lr: float, learn_seed: int, learn_probes_file: Path | None, **kwargs):
        probes = None if learn_probes_file is None else read_probes(learn_probes_file)
        extraction = Extraction(pooling=pooling, skip_tokens=skip_tokens, window=window, max_tokens=max_tokens,
                                learn_objective=learn_objective, learn_steps=learn_steps, learn_lr=learn_lr,
                                learn_seed=learn_seed, learn_probes=probes)
        extraction.check_learning()
        return command(extraction=extraction, **kwargs)

    return wrapper


def read_probes(path: Path) -> tuple[str, ...]:
    """--learn-probes FILE: its non-empty lines, or one line saying why not."""
    from ..core.files import read_text
    from ..engram.files import probe_lines

    probes = probe_lines(read_text(path, "--learn-probes file"))
    if not probes:
        raise EngramEvalError(f"{path}: --learn-probes file has no probe prompts (one per line)")
    return probes


def batch_size_option(help: str) -> Callable:
    """--batch-size: 'auto' -> None, or a whole number >= 1."""

    def to_size(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
        if value == "auto":
            return None
        if not (value.isdigit() and int(value) >= 1):
            raise EngramEvalError(f"--batch-size: '{value}' is not 'auto' or a whole number >= 1")
        return int(value)

    return click.option("--batch-size", default="auto", show_default=True, callback=to_size, help=help)


outside_option = click.option("--allow-outside-paths", is_flag=True, help="Allow bank source files outside the bank's folder.")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="engram-eval")
def cli() -> None:
    """Measure engram activation steering honestly: build engrams, sweep a question bank over a layer x
    strength grid with negative controls, report flips, fragile-correct answers and calibration cases,
    and gate regressions in CI."""


wait_option = click.option(
    "--wait", is_flag=True,
    help="When another sweep or generate is writing the run directory (its lock names the process), wait for it to "
         "finish instead of failing.")


def check_writable(folder: Path, option: str) -> None:
    """Fail before the model loads when the results could not be written (a read-only or missing-permission folder, or
    the nearest existing folder above one still to be created); creates nothing."""
    import os

    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise EngramEvalError(f"{option} {folder}: not writable ({existing} is {'read-only' if existing.is_dir() else 'not a folder'})")


def ray_options(command: Callable) -> Callable:
    """--ray, --workers, --gpus-per-worker, --threads-per-worker -> one `ray` argument (None: this process alone)."""

    @click.option("--ray", "ray_address", metavar="auto|ADDRESS",
                  help="Shard the work over a Ray cluster: auto joins a running cluster or starts a local one; ADDRESS "
                       "(host:port or ray://host:port) joins that cluster. Needs the extra: pip install 'engram-eval[ray]'.")
    @click.option("--workers", type=int, help="With --ray: worker processes, each loading the model once [default: as many as "
                                              "the cluster's CPUs (or GPUs, with --gpus-per-worker) allow].")
    @click.option("--gpus-per-worker", type=float, default=0.0, show_default=True, help="With --ray: GPUs each worker takes.")
    @click.option("--threads-per-worker", type=int, default=1, show_default=True,
                  help="With --ray: CPU threads (and Ray CPUs) each worker takes.")
    @functools.wraps(command)
    def wrapper(ray_address: str | None, workers: int | None, gpus_per_worker: float, threads_per_worker: int, **kwargs):
        if ray_address is None:
            for option, value, default in (("--workers", workers, None), ("--gpus-per-worker", gpus_per_worker, 0.0),
                                           ("--threads-per-worker", threads_per_worker, 1)):
                if value != default:
                    raise EngramEvalError(f"{option}: only with --ray")
            return command(ray=None, **kwargs)
        from ..run.distributed import plan_workers

        options = RayOptions(ray_address, workers, gpus_per_worker, threads_per_worker)
        plan_workers(options)  # before any model work: a missing extra, a wrong address, too few CPUs are one line
        return command(ray=options, **kwargs)

    return wrapper
