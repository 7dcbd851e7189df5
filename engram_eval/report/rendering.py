"""Rendering: a report's sections (engram_eval.report.sections) -> a rich table, markdown, json or a self-contained html page."""

from __future__ import annotations

import html
import json
import math

from .formatting import partial_banner
from .figures import CountHeatmap, Section
from .run_summary import RunSummary
from .sections import drilldown_sections, side_by_side_sections, summary_sections


def render_table(summary: RunSummary, console) -> None:
    if banner := partial_banner(summary):
        console.print(f"[bold yellow]{banner}[/]")
    print_sections(summary_sections(summary), console)


def print_sections(sections: list[Section], console) -> None:
    """Rich tables; a section with a count heatmap gets coloured cells. Each column is at least as wide as its longest
    word, so rich wraps at spaces and never breaks a word; a table whose columns cannot all be that wide at this width
    is stacked instead: one block per row, each column's header beside its value, so no column is cropped to a stub."""
    from rich.table import Table

    for section in sections:
        widths = column_widths(section, console.width)
        if widths is None:
            console.print(_stacked(section))
            continue
        table = Table(title=section.title, title_justify="left", show_header=True)
        for column, width in zip(section.columns, widths):
            table.add_column(column, justify="right" if section.right_aligned else "left", overflow="fold", width=width)
        figure = section.figure
        for i, row in enumerate(section.rows):
            if isinstance(figure, CountHeatmap):
                grid = figure.heatmap[figure.measure]
                table.add_row(row[0], *[_heat_cell(text, cell, figure.measure) for text, cell in zip(row[1:], grid[i])])
            else:
                table.add_row(*row)
        console.print(table)


def column_widths(section: Section, width: int) -> list[int] | None:
    """Each column's width in a table `width` characters wide: its longest text when everything fits, else at least
    its longest word, with the room left shared in proportion to what each column would still like; None when not
    even the longest words fit (the table is stacked). Rich's own layout crops the last columns of a wide table."""
    extra = 2 if isinstance(section.figure, CountHeatmap) else 0  # a heatmap cell carries a space either side
    texts = [[column, *(row[i] for row in section.rows)] for i, column in enumerate(section.columns)]
    natural = [max(len(t) + (extra if j else 0) for j, t in enumerate(col)) for col in texts]
    least = [max([len(w) + (extra if j else 0) for j, t in enumerate(col) for w in t.split()] + [1]) for col in texts]
    room = width - 3 * len(texts) - 1  # borders and padding: 3 per column, 1 at the end
    if sum(natural) <= room:
        return natural
    if sum(least) > room:
        return None
    wanted = [n - m for n, m in zip(natural, least)]
    spare = room - sum(least)
    widths = [m + spare * w // sum(wanted) for m, w in zip(least, wanted)]
    return widths


def _stacked(section: Section):
    from rich.table import Table

    table = Table(title=section.title, title_justify="left", show_header=False)
    table.add_column("column", style="bold", overflow="fold", min_width=max(len(w) for c in section.columns for w in c.split()))
    table.add_column("value", overflow="fold")
    for row in section.rows:
        for i, (column, value) in enumerate(zip(section.columns, row)):
            table.add_row(column, value, end_section=i == len(row) - 1)
    return table


def _heat_cell(text: str, cell: dict, measure: str) -> str:
    if cell["rate"] is None:
        return text
    colours = ("grey23", "dark_green", "green4", "green3") if measure == "flip" else ("grey23", "dark_red", "red3", "red1")
    colour = colours[min(3, math.ceil(cell["rate"] * 3))]
    return f"[white on {colour}] {text} [/]"


def render_markdown(summary: RunSummary) -> str:
    banner = partial_banner(summary)
    return markdown_page(f"engram-eval report: {summary['header']['bank']} on {summary['header']['model']}",
                         summary_sections(summary, short=True), [f"> **{banner}**"] if banner else [])


def markdown_page(heading: str, sections: list[Section], preface: list[str] = ()) -> str:
    lines = [f"# {heading}", ""] + ([*preface, ""] if preface else [])
    for title, columns, rows in ((s.title, s.columns, s.rows) for s in sections):
        lines += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def render_json(summary: RunSummary) -> str:
    """The RunSummary's record under its schema version (run_summary.SCHEMA_PATH), plus the sections as rendered."""
    return json_page(summary.to_dict(), summary_sections(summary))


def json_page(data: dict, sections: list[Section]) -> str:
    """The data as it is (every number, unrounded), plus the sections as rendered: key, title, columns, rows."""
    return json.dumps({**data, "sections": [section.as_dict() for section in sections]}, indent=2, default=str)


PAGE_STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}"
              "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}th{background:#eee}"
              ".wide{overflow-x:auto;max-width:100%}h1{font-size:1.5em;overflow-wrap:anywhere}h2{font-size:1.2em;margin:1em 0 .3em}"
              "h2,h3,summary{overflow-wrap:anywhere}"
              "details{margin:.4em 0}summary{cursor:pointer;font-weight:bold}.questions{font-size:13px;color:#333;min-height:1.2em}"
              ".flag{background:#fff4d6;border:1px solid #e0c060;padding:.5em .8em;margin:.8em 0}"
              "body.hide-off .off{display:none}")


def html_table(columns: list[str], rows: list[list[str]], marked: set[str] = frozenset()) -> str:
    """A table in a box that scrolls sideways on a narrow screen (the page itself never does); a row whose first cell
    is in `marked` gets class "off" (the page's off-distribution filter hides those)."""
    def row_tag(row: list[str]) -> str:
        return "<tr class='off'>" if row and row[0] in marked else "<tr>"

    return ("<div class='wide'><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
            + "".join(row_tag(row) + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
            + "</table></div>")


def html_page(title: str, body: str, head: str = "") -> str:
    """A self-contained page: the title as heading, the body, and anything the head needs (a script)."""
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style>{head}</head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n{body}\n</body></html>")


def render_side_by_side(comparison: dict, output_format: str, console=None) -> str | None:
    return _render_sections(comparison, side_by_side_sections(comparison), "engram-eval report: runs side by side", output_format, console)


def render_drilldown(drill: dict, output_format: str, console=None) -> str | None:
    return _render_sections(drill, drilldown_sections(drill), f"engram-eval report: question {drill['question_id']}", output_format, console)


def _render_sections(data: dict, sections: list, heading: str, output_format: str, console=None) -> str | None:
    if output_format == "json":
        return json_page(data, sections)
    if output_format == "table":
        return print_sections(sections, console)
    if output_format == "html":
        return html_page(heading, "\n".join(f"<h2>{html.escape(s.title)}</h2>" + html_table(s.columns, s.rows) for s in sections))
    return markdown_page(heading, sections)
