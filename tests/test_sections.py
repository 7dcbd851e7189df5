"""The report's sections are typed: a renderer finds a heatmap by its figure, never by its title."""

import ast
import dataclasses
import io
from pathlib import Path

from decisive import every_section_frame, every_section_generations, every_section_run, every_section_run_with_probe, every_section_side_effects
from rich.console import Console

import engram_eval.report.html_report as html_report
import engram_eval.report.rendering as rendering
from engram_eval.report.summary import summarize
from engram_eval.report.sections import CountHeatmap, EffectHeatmap, summary_sections

REPO = Path(__file__).resolve().parents[1]


def every_section_summary() -> dict:
    frame = every_section_frame()
    return summarize(frame, every_section_run_with_probe(), generations=every_section_generations(), split=1,
                     side_effects=every_section_side_effects(frame))


def test_keys_are_unique_and_figures_are_the_summarys_own_grids():
    summary = every_section_summary()
    sections = summary_sections(summary)
    keys = [s.key for s in sections]
    assert len(keys) == len(set(keys))
    counts = [s for s in sections if isinstance(s.figure, CountHeatmap)]
    assert [(s.key, s.figure.measure) for s in counts] == [(f"heatmap:{name}:{m}", m) for name in summary["heatmaps"]
                                                           for m in ("flip", "break")]
    assert all(s.figure.heatmap is summary["heatmaps"][s.key.split(":")[1]] and s.right_aligned for s in counts)
    effects = [s for s in sections if isinstance(s.figure, EffectHeatmap)]
    assert [(s.figure.effects, s.figure.label) for s in effects] == [
        (e, label) for e in summary["effects"].values() for label in e["maps"]]
    assert not any(isinstance(s.figure, EffectHeatmap) for s in summary_sections(summary, short=True))


def test_renamed_titles_change_no_figure_and_no_colour(monkeypatch):
    summary = every_section_summary()
    page, coloured = html_report.render_html(summary), coloured_cells(summary)
    renamed = [dataclasses.replace(s, title=f"section {i}") for i, s in enumerate(summary_sections(summary))]
    for module in (rendering, html_report):
        monkeypatch.setattr(module, "summary_sections", lambda summary, short=False: renamed)
    assert html_report.render_html(summary).count("Plotly.newPlot") == page.count("Plotly.newPlot") > 0
    assert coloured_cells(summary) == coloured > 0


def coloured_cells(summary: dict) -> int:
    buffer = io.StringIO()
    rendering.render_table(summary, Console(file=buffer, width=400, color_system="truecolor", force_terminal=True))
    return buffer.getvalue().count("\x1b[37;48;")  # white on a background colour: a shaded heatmap cell


def test_no_renderer_reads_a_title():
    for module in ("rendering.py", "html_report.py"):
        tree = ast.parse((REPO / "engram_eval" / "report" / module).read_text())
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in ("startswith", "removeprefix")]
        assert not calls, module
