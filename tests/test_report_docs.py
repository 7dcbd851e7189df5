"""docs/report.md lists every section the report renders, with its title and columns (and its fixed row labels): the
renderings of a constructed run with every section are checked against it, in both directions, and in order."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from conftest import module_unless_mapping
from decisive import (every_section_answers, every_section_ensembled, every_section_frame, every_section_frame_with_variants, every_section_generations,
                      every_section_run,
                      every_section_run_with_probe, every_section_side_effects)
from rich.color import Color

from engram_eval.report.comparison import summarize_runs
from engram_eval.report.drilldown import question_drilldown
from engram_eval.report.html_report import render_html
from engram_eval.report.rendering import _heat_cell, render_drilldown, render_markdown, render_side_by_side
from engram_eval.report.summary import summarize

DOCS = Path(__file__).parent.parent / "docs" / "report.md"
CODE = re.compile(r"`([^`]*)`")


def documented() -> dict[str, dict]:
    """Group (the page's ## heading) -> its markdown heading template and [(title, columns, rows)] in order."""
    groups, group, entry = {}, None, None
    for line in DOCS.read_text().splitlines():
        if line.startswith("## "):
            group = groups.setdefault(line[3:], {"heading": None, "sections": []})
        elif line.startswith("Markdown heading: "):
            group_heading = CODE.findall(line)[0]
            if group is None:
                groups["heading"] = group_heading
            else:
                group["heading"] = group_heading
        elif line.startswith("### `"):
            entry = {"title": CODE.findall(line)[0], "columns": [], "rows": []}
            group["sections"].append(entry)
        elif line.startswith("Columns: ") and entry is not None:
            columns, _, rows = line.removeprefix("Columns: ").partition("Rows: ")
            entry["columns"], entry["rows"] = CODE.findall(columns), CODE.findall(rows)
    return groups


def pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{[^}]*\}", template)
    return re.compile(".+?".join(map(re.escape, parts)) + r"\Z" if len(parts) > 1 else re.escape(template) + r"\Z", re.S)


def fits(templates: list[str], values: list[str]) -> bool:
    """values, in order, against templates; a template written `x...` stands for one or more values."""
    if not templates:
        return not values
    head, rest = templates[0], templates[1:]
    if head.endswith("..."):
        regex = pattern(head.removesuffix("..."))
        return any(all(regex.match(v) for v in values[:n]) and fits(rest, values[n:]) for n in range(1, len(values) + 1))
    return bool(values) and bool(pattern(head).match(values[0])) and fits(rest, values[1:])


def markdown_tables(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(title, columns, first cells of the rows) of each ## section."""
    tables = []
    for block in text.split("\n## ")[1:]:
        lines = block.splitlines()
        cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]
                 for row in lines[1:] if row.startswith("|") and not row.startswith("|---")]
        tables.append((lines[0], cells[0], [row[0] for row in cells[1:]]))
    return tables


class _Headings(HTMLParser):
    """(title, the header cells of its table) of each section of the page (the element with id section-KEY and its
    data-title) and of each heading the page adds (h2, h3, and the summary of a folded part that is not a section,
    outside drill-downs; a figure's heading, class "figure", repeats its section's title and is skipped)."""

    def __init__(self):
        super().__init__()
        self.sections, self.tag, self.text, self.current, self.header_read, self.drill = [], None, "", None, False, 0
        self.titled_details = False

    def _start(self, title: str) -> None:
        self.current, self.header_read = [title, []], False
        self.sections.append(self.current)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "details" and attributes.get("id", "").startswith("question-"):
            self.drill += 1
        if self.drill:
            return
        if attributes.get("id", "").startswith("section-"):
            self._start(attributes["data-title"])
        elif tag == "details":
            self.titled_details = True  # a folded part of the page that is not a section: its summary is its title
        elif tag == "summary" and self.titled_details:
            self.tag, self.text, self.titled_details = tag, "", False
        elif tag in ("h2", "h3") and attributes.get("class") != "figure":
            self.tag, self.text = tag, ""
        elif tag == "th" and self.current is not None and not self.header_read:
            self.tag, self.text = tag, ""

    def handle_endtag(self, tag):
        if tag == "details" and self.drill:
            self.drill -= 1
            return
        if self.drill:
            return
        if tag == self.tag and tag in ("h2", "h3", "summary"):
            self._start(self.text)
        elif tag == "th" and self.tag == "th":
            self.current[1].append(self.text)
        elif tag == "tr" and self.current is not None and self.current[1]:
            self.header_read = True
        if tag == self.tag:
            self.tag = None

    def handle_data(self, data):
        if self.tag:
            self.text += data


def match(rendered: list[tuple[str, list[str], list[str] | None]], entries: list[dict]) -> list[int]:
    """The documented entry of each rendered section: exactly one entry's title, and its columns and row labels (rows
    None: not read)."""
    found = []
    for title, columns, rows in rendered:
        hits = [i for i, e in enumerate(entries) if pattern(e["title"]).match(title)]
        assert len(hits) == 1, f"{title!r}: documented {len(hits)} times in docs/report.md"
        entry = entries[hits[0]]
        assert fits(entry["columns"], columns), f"{title!r}: columns {columns} against docs/report.md's {entry['columns']}"
        if entry["rows"] and rows is not None:
            assert fits(entry["rows"], rows), f"{title!r}: rows {rows} against docs/report.md's {entry['rows']}"
        found.append(hits[0])
    return found


@pytest.fixture(scope=module_unless_mapping)
def summary() -> dict:
    frame = every_section_frame_with_variants()
    off = {"q02 +context": "its answers hold 5.0% of the probability"}  # the off-distribution section is rendered
    return summarize(frame, {**every_section_run_with_probe(), "off_distribution": off}, generations=every_section_generations(), split=1,
                     side_effects=every_section_side_effects(frame), ensembled=every_section_ensembled(),
                     answers=every_section_answers(frame))


def test_the_pattern_matcher():
    assert fits(["a", "L{x}..."], ["a", "L1", "L2"]) and not fits(["a", "L{x}..."], ["a"]) and not fits(["a"], ["a", "b"])
    assert pattern("Heatmap {e}: flip").match("Heatmap relevant k=8: flip") and not pattern("Run").match("Runs")


def test_every_section_of_a_run_is_documented_in_order(summary):
    docs = documented()
    run_sections = docs["A run's sections"]["sections"]
    markdown = render_markdown(summary)
    assert pattern(docs["heading"]).match(markdown.splitlines()[0].removeprefix("# "))
    found = match(markdown_tables(markdown), run_sections)
    in_order = list(dict.fromkeys(found))  # a section repeated (per engram, per k) stays in its place
    assert in_order == sorted(in_order), "sections out of the documented order"
    effect = [i for i, e in enumerate(run_sections) if e["title"].startswith("Effect size")]
    assert set(found) == set(range(len(run_sections))) - set(effect)  # markdown leaves the effect sizes out

    drill = question_drilldown(every_section_frame(), "q02")
    parser = _Headings()
    parser.feed(render_html(summary, [drill]))
    html_only = docs["What the HTML page adds"]["sections"]
    found = match([(title, columns, None) for title, columns in parser.sections], run_sections + html_only)
    assert set(found) == set(range(len(run_sections) + len(html_only)))  # the page's order: tests/test_html_report.py


def test_the_partial_banner_is_the_documented_one(summary):
    partial = summary.replaced(header={**summary["header"], "partial": {"questions_done": 3, "questions": 20}})
    first = render_markdown(partial).split("\n\n")[1]
    banner = re.search(r"`(partial: [^`]*)`", DOCS.read_text()).group(1)
    assert pattern(banner).match(first.removeprefix("> **").removesuffix("**"))


def test_side_by_side_sections_are_documented():
    docs = documented()["Runs side by side (`report RUN1 RUN2 ...`)"]
    frame, run = every_section_frame(), every_section_run()
    comparison = summarize_runs([("a", frame, {**run, "num_layers": 4}), ("b", frame, {**run, "num_layers": 2})])
    markdown = render_side_by_side(comparison, "markdown")
    assert pattern(docs["heading"]).match(markdown.splitlines()[0].removeprefix("# "))
    assert set(match(markdown_tables(markdown), docs["sections"])) == set(range(len(docs["sections"])))


def test_drill_down_sections_are_documented():
    docs = documented()["One question (`report RUN --question ID`)"]
    frame = every_section_frame()
    texts = every_section_generations().filter(pl.col("question_id") == "q02")
    drill = question_drilldown(frame, "q02", texts)
    markdown = render_drilldown(drill, "markdown")
    assert pattern(docs["heading"]).match(markdown.splitlines()[0].removeprefix("# "))
    tables = markdown_tables(markdown)
    assert [t[0].split(":")[0] for t in tables] == ["q02 with its context", "q02 without its context", "q02"]
    assert set(match(tables, docs["sections"])) == set(range(len(docs["sections"])))


@pytest.mark.parametrize("measure", ["flip", "break"])
def test_heatmap_cells_are_shaded_in_four_documented_steps(measure):
    """docs/report.md: four steps of the rate (none, up to a third, up to two thirds, more), green for flips, red for
    breaks; a cell without a rate is left as it is."""
    shades = []
    for rate in (0.0, 0.2, 1 / 3, 0.5, 2 / 3, 0.9, 1.0):
        text = _heat_cell("3/9", {"rate": rate}, measure)
        style, inner = re.fullmatch(r"\[white on ([\w]+)\] (.*) \[/\]", text).groups()
        assert inner == "3/9"
        Color.parse(style)  # a colour rich knows
        shades.append(style)
    none, third, two_thirds, more = shades[0], shades[2], shades[4], shades[6]
    assert shades == [none, third, third, two_thirds, two_thirds, more, more]
    assert len({none, third, two_thirds, more}) == 4
    assert all(("green" if measure == "flip" else "red") in s for s in (third, two_thirds, more))
    other = [re.search(r"on (\w+)", _heat_cell("x", {"rate": r}, "break" if measure == "flip" else "flip")).group(1) for r in (0.2, 0.5, 0.9)]
    assert not set(other) & {third, two_thirds, more}
    assert _heat_cell("-", {"rate": None}, measure) == "-"
