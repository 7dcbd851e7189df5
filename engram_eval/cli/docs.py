"""Generate docs/cli.md from the commands' --help text, so the docs cannot drift: `python -m engram_eval.cli.docs`."""

from __future__ import annotations

import click
from click.testing import CliRunner

from .app import cli


def _commands(group: click.Group, prefix: list[str]) -> list[list[str]]:
    paths = [prefix]
    for name in sorted(group.commands):
        command = group.commands[name]
        paths += _commands(command, prefix + [name]) if isinstance(command, click.Group) else [prefix + [name]]
    return paths


def cli_reference() -> str:
    runner = CliRunner()
    parts = ["# Command-line reference", "", "Generated from `--help` by `make docs`; do not edit by hand.", ""]
    for path in _commands(cli, []):
        result = runner.invoke(cli, [*path, "--help"], prog_name="engram-eval", terminal_width=100)
        parts += [f"## engram-eval {' '.join(path)}".rstrip(), "", "```", result.output.rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(cli_reference(), end="")
