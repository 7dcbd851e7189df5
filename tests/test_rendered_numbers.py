"""The numbers a person reads, parsed back out of the table, markdown and HTML renderings of one run, against the JSON
of `report --format json` (every section; intervals' bounds in order)."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import pytest
from conftest import module_unless_mapping
from decisive import decisive_frame, decisive_run
from rich.console import Console

from engram_eval.report.html_report import render_html
from engram_eval.report.rendering import render_drilldown, render_markdown, render_table
from engram_eval.report.summary import summarize

RATE = re.compile(r"^(\d+)/(\d+) \((\d+)%, 95% CI (\d+)-(\d+)%\)$")


@pytest.fixture(scope=module_unless_mapping)
def summary() -> dict:
    return summarize(decisive_frame(), decisive_run(), split=1)


def markdown_sections(text: str) -> dict[str, list[list[str]]]:
    sections, title = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:]
            sections[title] = []
        elif title and line.startswith("|") and not line.startswith("|---"):
            sections[title].append([cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return {t: rows[1:] for t, rows in sections.items()}  # without the header row


class _Tables(HTMLParser):
    """Rows of each section's table: a section starts at the element with its id (section-KEY) and data-title, and
    ends at the next element with an id (another section, a drill-down, a group heading); on a page without ids,
    at each h2."""

    def __init__(self):
        super().__init__()
        self.sections, self.title, self.cell, self.row, self.in_h2 = {}, None, None, None, False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "h2" and "id" not in attributes:  # a page of sections without ids: drill-down, side by side
            self.in_h2, self.title = True, ""
        elif "id" in attributes:
            self.title = attributes.get("data-title") if attributes["id"].startswith("section-") else None
            if self.title is not None:
                self.sections.setdefault(self.title, [])
        elif tag == "tr" and self.title is not None:
            self.row = []
        elif tag == "td" and self.row is not None:
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "h2" and self.in_h2:
            self.in_h2 = False
            self.sections.setdefault(self.title, [])
        elif tag == "td" and self.cell is not None:
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr" and self.row:
            self.sections[self.title].append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.in_h2:
            self.title += data
        elif self.cell is not None:
            self.cell += data


def html_sections(text: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(text)
    return parser.sections


def table_sections(summary: dict) -> dict[str, list[list[str]]]:
    """The rich tables at a width where nothing wraps, split on their column rules."""
    buffer = io.StringIO()
    render_table(summary, Console(file=buffer, width=4000, color_system=None))
    sections, title, wrapping = {}, None, False
    for line in buffer.getvalue().splitlines():
        stripped = line.strip()
        if stripped and stripped[0] not in "┏┃┡│└━─┗╇":
            if wrapping:  # a title longer than its table wraps onto the next lines
                sections[title + " " + stripped] = sections.pop(title)
                title += " " + stripped
            else:
                title, wrapping = stripped, True
                sections[title] = []
            continue
        wrapping = False
        if stripped.startswith("│") and title is not None:
            sections[title].append([cell.strip() for cell in stripped.strip("│").split("│")])
    return sections


def check_rate(text: str, rate: dict) -> None:
    k, n, percent, low, high = map(int, RATE.match(text).groups())
    assert (k, n) == (rate["k"], rate["n"])
    assert percent == round(100 * rate["rate"]) and (low, high) == (round(100 * rate["ci95"][0]), round(100 * rate["ci95"][1]))
    assert low <= percent <= high


def test_the_three_renderings_show_the_same_cells(summary):
    markdown = markdown_sections(render_markdown(summary))
    page = html_sections(render_html(summary))
    table = table_sections(summary)
    assert set(markdown) <= set(table)
    for title, rows in markdown.items():
        assert table[title] == rows, title
    shared = set(markdown) & set(page)  # the HTML page draws the heatmaps as figures
    assert {f"Headline: {summary['headline']['conclusion']}", "Negative controls (same cells; paired sign-flip test across questions)"} <= shared
    for title in shared:
        assert page[title] == markdown[title], title
    effect_titles = [t for t in page if t.startswith("Effect size")]
    assert effect_titles and all(page[t] == table[t] for t in effect_titles)


def test_rendered_numbers_equal_the_json(summary):
    sections = table_sections(summary)
    hl = summary["headline"]
    by_kind = {row[0]: row for row in sections[f"Headline: {hl['conclusion']}"]}
    assert list(by_kind) == [k["kind"] for k in hl["by_kind"]]
    for entry in hl["by_kind"]:
        row = by_kind[entry["kind"]]
        check_rate(row[1], entry["question_flip_rate"])
        check_rate(row[2], entry["question_fragile_correct_rate"])
        assert row[3] == ("-" if entry["verdict"] is None else f"{entry['verdict']} (p {entry['p_value']:.4f})")
    headline = dict(map(tuple, sections["The relevant engram across the grid, and its best cell"]))
    check_rate(headline["baseline-wrong questions that flip somewhere in the grid"], hl["question_flip_rate"])
    check_rate(headline["... with a clean flip (p(correct) rose, mass kept)"], hl["question_clean_flip_rate"])
    check_rate(headline["baseline-correct questions that break somewhere in the grid"], hl["question_fragile_correct_rate"])
    best = hl["best_cell"]
    (flip_at_best,) = [v for k, v in headline.items() if k.startswith(f"flip rate at the best cell (L{best['layer']}, {best['strength']:g};")]
    check_rate(flip_at_best, best["flip_rate"])

    controls = {row[0]: row for row in sections["Negative controls (same cells; paired sign-flip test across questions)"]}
    for c in summary["controls"]:
        row = controls[c["kind"]]
        assert (int(row[1]), row[2]) == (c["questions"], f"{c['cells_relevant']}/{c['cells_control']}")
        assert [float(v) for v in row[3:6]] == pytest.approx([c["mean_log_improvement_relevant"], c["mean_log_improvement_control"],
                                                             c["mean_difference"]], abs=5e-4)
        assert float(row[6]) == pytest.approx(c["p_value"], abs=5e-5) and row[7] == c["verdict"]
        assert row[8] == f"{c['flips_relevant']}/{c['flips_control']}" and row[9] == f"{c['breaks_relevant']}/{c['breaks_control']}"
        adjusted = c["adjusted_flip_difference"]
        interval = "" if adjusted["ci95"] is None else f", 95% CI {adjusted['ci95'][0]:+.2f} to {adjusted['ci95'][1]:+.2f}"
        assert row[10] == f"{adjusted['difference']:+.2f} ({adjusted['questions']} questions{interval})"

    questions = {row[0]: row for row in next(rows for t, rows in sections.items() if t.startswith("Questions"))}
    for q in summary["questions"]:
        row = questions[q["question_id"]]
        assert float(row[1]) == pytest.approx(q["baseline_ratio"], rel=5e-3) and row[3] == ("yes" if q["correct_before"] else "no")
        assert row[6].split()[0] == str(q["flips"]) and row[7] == str(q["breaks"])
        if q["flips"]:
            assert row[6] == f"{q['flips']} ({q['clean_flips']} / {q['flips_p_correct_fell']} / {q['flips_collapsed']})"

    for measure in ("flip", "break"):
        (rows,) = [rows for t, rows in sections.items() if t.startswith("Heatmap relevant: " + ("flip" if measure == "flip" else "fragile-correct"))]
        grid = summary["heatmaps"]["relevant"][measure]
        for row, cells in zip(rows, grid):
            assert row[1:] == [f"{c['k']}/{c['n']}" for c in cells]

    (tests,) = [rows for t, rows in sections.items() if t.startswith("Per-cell exact tests")]
    survivors = [t for t in summary["tests"] if t["survives"]]
    assert len(tests) == len(survivors) and survivors
    for row, t in zip(tests, survivors):
        assert (row[0], row[1], row[2], row[3]) == (str(t["layer"]), str(t["strength"]), t["control"], t["outcome"])
        assert row[4] == f"{t['relevant_only']} / {t['control_only']}"
        assert float(row[5]) == pytest.approx(t["p_value"], abs=5e-5) and float(row[6]) == pytest.approx(t["q_value"], abs=5e-5)

    for title, rows in sections.items():
        if not title.startswith("Effect size"):
            continue
        label = title.removeprefix("Effect size ").split(":")[0]
        grid = summary["effects"]["all"]["maps"][label]
        for row, cells in zip(rows, grid):
            for text, cell in zip(row[1:], cells):
                mean, low, high = map(float, re.match(r"^(-?[\d.]+) \((-?[\d.]+) to (-?[\d.]+)\)$", text).groups())
                assert mean == pytest.approx(cell["mean"], abs=5.001e-3) and [low, high] == pytest.approx(cell["ci95"], abs=5.001e-3)
                assert low <= high

    sink = {row[0]: row for row in next(rows for t, rows in sections.items() if t.startswith("Semantic sink"))}
    for s in summary["semantic_sink"]:
        row = sink[{True: "yes", False: "no", None: "unlabelled"}[s["related_wrong"]]]
        assert row[1] == str(s["questions"])
        check_rate(row[2], s["flip"])
        check_rate(row[3], s["break"])

    split = summary["split"]
    (rows,) = [rows for t, rows in sections.items() if t.startswith("Held-out best cell")]
    table = {row[0]: row[1:] for row in rows}
    check_rate(table["flip rate"][0], split["flip_rate_where_chosen"])
    check_rate(table["flip rate"][1], split["flip_rate_held_out"])
    check_rate(table["fragile-correct rate"][0], split["break_rate_where_chosen"])
    check_rate(table["fragile-correct rate"][1], split["break_rate_held_out"])
    assert table["questions"] == [", ".join(split["chosen_on"]), ", ".join(split["measured_on"])]


def test_the_side_by_side_rows_equal_the_comparison(summary):
    import json

    import polars as pl

    from engram_eval.report.comparison import summarize_runs
    from engram_eval.report.rendering import render_json, render_side_by_side
    from engram_eval.report.sections import side_by_side_sections, summary_sections

    frame = decisive_frame()
    shallow = frame.filter(pl.col("layer").is_null() | (pl.col("layer") == 1))
    runs = [("a", frame, {**decisive_run(), "num_layers": 4}), ("b", shallow, {**decisive_run(), "num_layers": 2})]
    comparison = summarize_runs(runs)
    sections = side_by_side_sections(comparison)
    title, columns, rows = sections[0].title, sections[0].columns, sections[0].rows
    assert (title, columns) == ("Runs side by side", ["measure", "1: constructed", "2: constructed"])
    table = {row[0]: row[1:] for row in rows}
    assert table["run"] == ["a", "b"] and table["bank"] == ["decisive", "decisive"]
    assert table["layers (relative depth)"] == ["L1 (0.25), L2 (0.50)", "L1 (0.50)"]
    assert table["settings that differ"] == ["none", "none"]
    for i, run in enumerate(comparison["runs"]):
        check_rate(table["baseline accuracy"][i], run["baseline_accuracy"])
        check_rate(table["baseline-wrong questions that flip"][i], run["question_flip_rate"])
        check_rate(table["baseline-correct questions that break"][i], run["question_fragile_correct_rate"])
        for kind, control in run["controls"].items():
            assert table[f"relevant vs {kind}"][i] == f"{control['verdict']} (p {control['p_value']:.4f})"
    assert comparison["runs"][0]["baseline_accuracy"]["k"] == 10
    heat = {s.title: s.rows for s in sections[1:]}
    first = heat["Heatmap relevant of run 1: constructed: flip rate by relative depth"]
    grid = comparison["runs"][0]["heatmaps"]["relevant"]
    assert first == [[f"{d:.2f} (L{layer})", *[f"{c['k']}/{c['n']}" for c in row]]
                     for d, layer, row in zip(grid["depths"], grid["layers"], grid["flip"])]
    assert first[0][0] == "0.25 (L1)" and first[1][2] == "10/10"
    # json: the data as it is, every key kept, plus the sections as rendered
    side = json.loads(render_side_by_side(comparison, "json"))
    assert side.pop("sections") == [s.as_dict() for s in sections]
    assert side == json.loads(json.dumps(comparison, default=str))
    assert render_side_by_side(comparison, "markdown").startswith("# engram-eval report: runs side by side\n\n## Runs side by side")
    page = json.loads(render_json(summary))
    assert page.pop("sections") == json.loads(json.dumps([s.as_dict() for s in summary_sections(summary)]))
    assert page == json.loads(json.dumps(summary.to_dict(), default=str))


def test_runs_that_differ_in_a_setting_are_labelled_with_it():
    """Two runs of one model that differ only in --injection (and a setting both share): the column labels and the
    `settings that differ` row name the injection, nothing else."""
    from engram_eval.report.comparison import summarize_runs
    from engram_eval.report.sections import side_by_side_sections

    frame = decisive_frame()
    settings = {"model": "constructed", "pooling": "mean", "layers": [1, 2]}
    runs = [(name, frame, {**decisive_run(), "num_layers": 4, "settings": {**settings, "injection": injection}})
            for name, injection in (("a", "prefix"), ("b", "actadd"))]
    comparison = summarize_runs(runs)
    assert comparison["differing_settings"] == ["injection"]
    section = side_by_side_sections(comparison)[0]
    assert section.columns == ["measure", "1: constructed (injection prefix)", "2: constructed (injection actadd)"]
    assert {row[0]: row[1:] for row in section.rows}["settings that differ"] == ["injection prefix", "injection actadd"]


def test_the_drill_down_renderings_show_each_cell_of_the_question():
    import json

    import polars as pl

    from engram_eval.report.drilldown import question_drilldown
    from engram_eval.report.rendering import render_drilldown

    frame = decisive_frame().filter(pl.col("question_id") == "q02")
    both = pl.concat([frame.with_columns(context=pl.lit(True)), frame.with_columns(context=pl.lit(False))])
    texts = pl.DataFrame([{"question_id": "q02", "role": "relevant", "engram": "relevant-q02", "layer": 2, "strength": 5.0, "chunks": 16,
                           "context": True, "first_answer": "correct", "verdict": "correct", "text": "a\nb"}])
    drill = question_drilldown(both, "q02", texts)
    page = json.loads(render_drilldown(drill, "json"))
    assert [s["key"] for s in page.pop("sections")] == ["condition:True", "condition:False", "texts"]
    assert page == json.loads(json.dumps(drill, default=str))
    markdown = render_drilldown(drill, "markdown")
    assert markdown.startswith("# engram-eval report: question q02\n")
    sections = markdown_sections(markdown)
    titles = list(sections)
    assert titles[0].startswith("q02 with its context: baseline p(correct) ") and titles[1].startswith("q02 without its context:")
    assert titles[2] == "q02: generated texts" and sections[titles[2]] == [["relevant-q02 L2 x5, with context", "correct", "correct", "a b"]]
    base = frame.filter(pl.col("role") == "baseline").row(0, named=True)
    assert f"ratio {base['ratio']:.3g}" in titles[0] and f"({base['top_correct_variant']!r})" in titles[0]
    rows = sections[titles[0]]
    cells = frame.filter(pl.col("role") != "baseline")
    assert len(rows) == cells.height and rows[0][0].startswith("relevant-q02")  # the relevant engram first
    first = drill["conditions"][0]["cells"][0]
    assert rows[0][1:3] == [f"L{first['layer']}", f"{first['strength']:g}"]
    assert float(rows[0][5]) == pytest.approx(first["ratio"], rel=5e-3)
    assert float(rows[0][6]) == pytest.approx(first["sink_score"], abs=5e-3)
    page = render_drilldown(drill, "html")
    assert html_sections(page)[titles[2]] == sections[titles[2]] and "<title>engram-eval report: question q02</title>" in page
    buffer = io.StringIO()
    render_drilldown(drill, "table", Console(file=buffer, width=4000, color_system=None))
    assert "q02: generated texts" in buffer.getvalue() and "relevant-q02 L2 x5, with context" in buffer.getvalue()


@pytest.fixture(scope=module_unless_mapping)
def every_section() -> dict:
    from decisive import every_section_frame, every_section_generations, every_section_run_with_probe, every_section_side_effects

    frame = every_section_frame()
    return summarize(frame, every_section_run_with_probe(), generations=every_section_generations(), split=1,
                     side_effects=every_section_side_effects(frame))


def terminal(summary: dict, **console) -> str:
    buffer = io.StringIO()
    render_table(summary, Console(file=buffer, width=100, **console))
    return buffer.getvalue()


def terminal_tables(text: str) -> list[tuple[list[str], list[str]]]:
    """(title lines, body lines) of each rich table."""
    tables, title, body = [], [], None
    for line in text.splitlines():
        if line.startswith(("┏", "┌")):  # a table, or a table too wide for the console stacked one row per block
            body = [line]
        elif body is not None:
            body.append(line)
            if line.startswith("└"):
                tables.append((title, body))
                title, body = [], None
        else:
            title.append(line)
    return tables


def terminal_cells(text: str) -> set[str]:
    return set(re.split(r"[\s│┃]+", text))


@pytest.mark.parametrize("width", [60, 80, 100, 120, 160, 250])
def test_the_terminal_tables_fit_the_console_and_keep_words_whole_where_they_can(every_section, width):
    """No table loses its last columns to a narrow console (every row ends with its rule); where the console is wide
    enough, no word of 24 characters or fewer is folded."""
    buffer = io.StringIO()
    render_table(every_section, Console(file=buffer, width=width, color_system=None))
    text = buffer.getvalue()
    assert all(len(line) <= width for line in text.splitlines())
    assert all(line.rstrip().endswith("│") for line in text.splitlines() if line.startswith("│"))
    markdown = markdown_sections(render_markdown(every_section))
    if width >= 200:
        words = terminal_cells(text)
        for title, rows in markdown.items():
            for row in rows:
                for cell in row:
                    assert all(word in words for word in cell.split() if len(word) <= 24), (title, cell)


def test_the_terminal_tables_put_titles_left_headers_on_and_heatmap_counts_right(every_section):
    text = terminal(every_section, color_system=None)
    tables = terminal_tables(text)
    markdown = markdown_sections(render_markdown(every_section))
    assert len(tables) == len(markdown) + sum(t.startswith("Effect size") for t in html_sections(render_html(every_section)))
    for title, body in tables:
        assert title and not title[0].startswith(" ")  # titles start at the left edge, above the table
        if body[0].startswith("┌"):  # stacked: each column's header beside its value
            assert all(len(line.split("│")) == 4 for line in body if line.startswith("│"))
            continue
        header = body[1]
        assert header.startswith("┃") and header.strip("┃ ")  # the header row is shown
        heat = title[0].startswith("Heatmap")
        rows = [line for line in body if line.startswith("│")]
        for line in rows:
            cells = line.split("│")[1:-1]
            if heat:
                assert all(cell.endswith(" ") and not cell.endswith("  ") and cell.startswith("  ") for cell in cells), line
            else:
                assert all(cell.startswith(" ") and (not cell.strip() or cell[1] != " ") for cell in cells), line


def test_the_terminal_heatmaps_are_shaded_by_each_cells_rate(every_section):
    text = terminal(every_section, color_system="256", force_terminal=True)
    backgrounds = re.compile(r"\x1b\[[0-9;]*48;5;(\d+)")
    heat, flat = [], []
    for title, body in terminal_tables(text):
        plain = re.sub(r"\x1b\[[0-9;]*m", "", title[0])
        (heat if plain.startswith("Heatmap") else flat).append((plain, body))
    assert heat and all(not backgrounds.search("\n".join(body)) for _, body in flat)
    for plain, body in heat:
        rows = [line for line in body if line.startswith("│")]
        assert all(len(backgrounds.findall(line)) == 2 for line in rows)  # one shade per strength column
    (_, body), *_ = [(p, b) for p, b in heat if p.startswith("Heatmap relevant k=8: flip")]
    grid = every_section["heatmaps"]["relevant k=8"]["flip"]
    shades = {}
    for line, cells in zip([line for line in body if line.startswith("│")], grid):
        for shade, cell in zip(backgrounds.findall(line), cells):
            shades.setdefault(cell["rate"], set()).add(shade)
    assert all(len(s) == 1 for s in shades.values()) and len(set().union(*shades.values())) == len(shades) >= 2


def test_the_run_questions_and_headline_rows_say_the_summarys_values(every_section):
    """The rows a person reads first, written out from the JSON: the run's grid and status, each question's baseline
    probabilities and labels, the best cells named with their k in a chunk grid."""
    sections = markdown_sections(render_markdown(every_section))
    h = every_section["header"]
    run = dict(map(tuple, sections["Run"]))
    assert run["grid"] == "layers 1, 2 x strengths 1, 5, k = 8, 16"
    assert (h["questions"], h["conditions"]) == (20, 40)  # each question with and without its context: counted once
    assert run["cells"] == f"{h['cells']} rows, 20 questions in 40 conditions (with and without context) (run {h['run_id']}, complete)"
    assert run["duration"] == "1.0 s" and run["scoring"] == "first-token, prefix injection"
    questions = {row[0]: row for row in sections["Questions (probabilities: p(correct) / p(incorrect))"]}
    for q in every_section["questions"]:
        row = questions[q["question_id"]]
        assert row[2] == f"{q['baseline_p_correct']:.3g} / {q['baseline_p_incorrect']:.3g}"
        assert row[4] == {True: "yes", False: "no", None: "-"}[q["related_wrong"]]
        best = q["best"]
        assert row[5].startswith(f"L{best['layer']}, {best['strength']:g}, k={best['chunks']}: ")
    calibration = {row[0]: row for row in next(rows for t, rows in sections.items() if t.startswith("Calibration"))}
    for q in every_section["questions"]:
        assert calibration[q["question_id"]][1] == ", ".join(f"{c} {n}" for c, n in q["cases"].items())
    best = every_section["headline"]["best_cell"]
    headline = [row[0] for row in sections["The relevant engram across the grid, and its best cell"]]
    assert f"flip rate at the best cell (L{best['layer']}, {best['strength']:g}, k={best['chunks']}; chosen after looking" in headline[3]
    assert headline[4] == f"fragile-correct rate at that cell (L{best['layer']}, {best['strength']:g}, k={best['chunks']})"
    split = every_section["split"]
    (held,) = [rows for t, rows in sections.items() if t.startswith("Held-out")]
    assert held[0] == ["cell", f"L{split['cell']['layer']}, {split['cell']['strength']:g}, k={split['cell']['chunks']}", ""]
    unfinished = every_section.replaced(header={**h, "duration_seconds": None, "partial": {"questions_done": 3, "questions": None}})
    run = dict(map(tuple, markdown_sections(render_markdown(unfinished))["Run"]))
    assert run["duration"] == "-" and run["cells"].endswith("(the sweep has not finished; rerun it with the same command to complete the run))")
    assert "partial: 3 questions (the sweep" in run["cells"]


def test_html_tables_are_exactly_the_cells_escaped():
    from engram_eval.report.rendering import html_table

    assert html_table(["a", "b<"], [["1", "<2>"], ["&", ""]]) == (
        "<div class='wide'><table><tr><th>a</th><th>b&lt;</th></tr><tr><td>1</td><td>&lt;2&gt;</td></tr><tr><td>&amp;</td>"
        "<td></td></tr></table></div>")
    assert html_table(["q"], [["a"], ["b"]], {"b"}) == "<div class='wide'><table><tr><th>q</th></tr><tr><td>a</td></tr><tr class='off'><td>b</td></tr></table></div>"


def test_narrow_terminals_fold_cells_rather_than_cut_them(every_section):
    buffer = io.StringIO()
    render_table(every_section, Console(file=buffer, width=60, color_system=None))
    assert "…" not in buffer.getvalue()


def test_drill_down_rows_show_each_cells_probabilities_boosts_and_k():
    import polars as pl
    from decisive import every_section_frame

    from engram_eval.report.drilldown import question_drilldown
    from engram_eval.report.formatting import fmt_prob, fmt_ratio

    drill = question_drilldown(every_section_frame(), "q02")
    sections = markdown_sections(render_drilldown(drill, "markdown"))
    for condition, (title, rows) in zip(drill["conditions"], sections.items()):
        base = condition["baseline"]
        assert title.startswith(f"q02 {'with' if condition['context'] else 'without'} its context: baseline p(correct) "
                                f"{fmt_prob(base['p_correct'])} ({base['top_correct_variant']!r}), p(incorrect) {fmt_prob(base['p_incorrect'])}")
        for row, c in zip(rows, condition["cells"]):
            assert row[1] == f"L{c['layer']} k={c['chunks']}"
            assert row[3] == f"{c['p_correct']:.3g} (x{fmt_ratio(c['boost_correct'])})"
            assert row[4] == f"{c['p_incorrect']:.3g} (x{fmt_ratio(c['boost_incorrect'])})"
            assert row[6] == f"{c['sink_score']:.2f}"
    assert len(sections) == 2 and pl.Series([c["chunks"] for c in drill["conditions"][0]["cells"]]).n_unique() == 2
