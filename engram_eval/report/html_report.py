"""The HTML report: one self-contained page that works offline — plotly's JavaScript inlined, interactive heatmaps
(hover: counts, rate, interval, questions; click a cell: its questions listed under the plot), every table of the
report, a drill-down per question, and the generated texts."""

from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .formatting import fmt_cell, fmt_effect, partial_banner
from .rendering import html_page, html_table
from .figures import CountHeatmap, DoseCurves, EffectHeatmap, KindRates, RocCurves, SinkBars
from .run_summary import RunSummary
from .sections import drilldown_sections, summary_sections

# Plotly's own event API: a click on a heatmap cell lists that cell's questions under the plot.
CLICK = ("var plot = document.getElementById('{plot_id}');"
         "plot.on('plotly_click', function (event) { var point = event.points[0];"
         " document.getElementById('{plot_id}-questions').textContent ="
         " point.y + ', strength ' + point.x + ': ' + (point.customdata[2] || 'no questions'); });")


VERDICT = ("headline", "off-distribution", "sink", "controls")  # the first screen: what the run says, and how far to trust it
PER_QUESTION = ("questions",)
KIND_RATES_TITLE = "Per engram kind: questions that flip somewhere and questions that break somewhere (95% Wilson intervals)"
LONG = 12  # rows: a longer table starts collapsed, its row count in its title


def render_html(summary: RunSummary, drills: list[dict] = ()) -> str:
    """The page shows before it lists: the verdict (headline per kind, the off-distribution questions flagged once
    with a filter, the sink, the controls); then the plots; then the questions and their drill-downs; then every other
    table, a long one collapsed with its row count."""
    header = summary["header"]
    title = f"engram-eval report: {header['bank']} on {header['model']}"
    off = set(header["off_distribution"])
    sections = summary_sections(summary)
    by_key = {section.key: section for section in sections}
    body = []
    if banner := partial_banner(summary):
        body.append(f"<p><strong>{html.escape(banner)}</strong></p>")
    for key in VERDICT:
        if (section := by_key.get(key)) is not None:
            body.append(_off_distribution(section) if key == "off-distribution" else _open(section, off))
    body.append("<h2 id='plots'>Plots</h2>")
    bound = _effect_bound(summary)
    figures = [s for s in sections if s.figure is not None]
    numbers = {s.key: i for i, s in enumerate(s for s in figures if isinstance(s.figure, (CountHeatmap, EffectHeatmap)))}
    for section in sorted(figures, key=_plot_order):
        own = isinstance(section.figure, KindRates)  # a title of its own; the others repeat their section's
        body.append(f"<h3{'' if own else ' class=figure'}>{html.escape(KIND_RATES_TITLE if own else section.title)}</h3>"
                    f"<div class='wide'>{_draw(section, numbers.get(section.key), bound)}</div>")
        if section.key not in VERDICT:
            body.append(_collapsed(section, off, "the numbers"))
    body.append("<h2 id='per-question'>Per question</h2>")
    for key in PER_QUESTION:
        if (section := by_key.get(key)) is not None:
            body.append(_open(section, off, level=3))
    if drills:
        body.append("<h3>Each question cell by cell: probabilities, boosts against the baseline, sink score, texts</h3>")
        body.extend(_drilldown(drill, off) for drill in drills)
    rest = [s for s in sections if s.figure is None and s.key not in (*VERDICT, *PER_QUESTION)]
    body.append("<h2 id='tables'>More tables</h2>")
    body.extend(_collapsed(s, off) if len(s.rows) > LONG else _open(s, off, level=3) for s in rest)
    if summary.get("generation"):
        texts = summary["generation"]["texts"]
        body.append(f"<details id='generated-texts'><summary>Generated texts ({len(texts)} rows)</summary>"
                    + html_table(["question", "cell", "ratio", "first answer", "verdict", "text"],
                                 [[t["question_id"], t["cell"], f"{t['ratio']:.3g}", t["first_answer"], t["verdict"], t["text"]]
                                  for t in texts], off) + "</details>")
    return html_page(title, "\n".join(body), head=f"<script type='text/javascript'>{get_plotlyjs()}</script>")


def _plot_order(section) -> int:
    """The per-kind rates first, then the relevant-minus-control maps, the relevant engram's own maps, the trade-off
    and dose curves, calibration, the sink (sorted is stable: the report's order within each)."""
    figure = section.figure
    if isinstance(figure, KindRates):
        return 0
    if isinstance(figure, EffectHeatmap):
        return 1 if " - " in figure.label else 2
    return {CountHeatmap: 3, DoseCurves: 4, RocCurves: 5, SinkBars: 6}[type(figure)]


def _draw(section, number: int | None, bound: float) -> str:
    """The section's figure; a heatmap is numbered in the report's order (heatmap-0: the first flip map)."""
    figure = section.figure
    if isinstance(figure, KindRates):
        return _kind_rates(figure, "kind-rates")
    if isinstance(figure, CountHeatmap):
        return _count_heatmap(figure.heatmap, figure.measure, f"heatmap-{number}")
    if isinstance(figure, EffectHeatmap):
        return _effect_heatmap(figure.effects, figure.label, f"heatmap-{number}", bound)
    if isinstance(figure, RocCurves):
        return _roc_curves(figure.curves, "roc-curves")
    if isinstance(figure, DoseCurves):
        return _tradeoff(figure, "tradeoff") + _dose_curves(figure, "dose-curves")
    return _sink_bars(figure, "sink-bars")


def _open(section, off: set[str], level: int = 2) -> str:
    return (f"<h{level} {_anchor(section)}>{html.escape(section.title)}</h{level}>"
            + html_table(section.columns, section.rows, off))


def _collapsed(section, off: set[str], name: str | None = None) -> str:
    rows = f"{len(section.rows)} row{'s' if len(section.rows) != 1 else ''}"
    label = f"{name} ({rows})" if name else f"{section.title} ({rows})"
    return (f"<details {_anchor(section)}><summary>{html.escape(label)}</summary>"
            + html_table(section.columns, section.rows, off) + "</details>")


def _anchor(section) -> str:
    """Where a section's table starts: its key as the element's id, its title as data-title (a collapsed table's
    summary says something shorter)."""
    return f"id='section-{html.escape(section.key, quote=True)}' data-title='{html.escape(section.title, quote=True)}'"


def _off_distribution(section) -> str:
    """Flagged once: the count, a switch that hides those questions' rows everywhere on the page, the list."""
    return (f"<div class='flag' id='off-distribution'><strong>{html.escape(section.title)}</strong><br>"
            "<label><input type='checkbox' id='hide-off' onchange=\"document.body.classList.toggle('hide-off', this.checked)\">"
            " hide them in the tables and drill-downs below</label>"
            + _collapsed(section, set(), "which") + "</div>")


def _count_heatmap(heatmap: dict, measure: str, div_id: str) -> str:
    """Flip (or break) counts per layer x strength: colour by rate, each cell labelled k/n."""
    grid = heatmap[measure]
    customdata = [[[f"{100 * c['rate']:.0f}%" if c["rate"] is not None else "-",
                    "-" if not c["ci95"] else f"{100 * c['ci95'][0]:.0f}-{100 * c['ci95'][1]:.0f}%",
                    ", ".join(c["questions"])] for c in row] for row in grid]
    figure = go.Figure(go.Heatmap(
        z=[[c["rate"] for c in row] for row in grid], x=[f"{s:g}" for s in heatmap["strengths"]],
        y=[f"L{layer}" for layer in heatmap["layers"]], zmin=0, zmax=1, colorscale="Greens" if measure == "flip" else "Reds",
        text=[[fmt_cell(c) for c in row] for row in grid], texttemplate="%{text}", textfont=CELL_FONT, customdata=customdata,
        hovertemplate="%{y}, strength %{x}<br>%{text} = %{customdata[0]} (95% CI %{customdata[1]})<br>"
                      "questions: %{customdata[2]}<extra></extra>",
        colorbar={"title": f"{measure} rate"},
    ))
    return _figure(figure, div_id)


CELL_FONT = {"size": 12}  # in-cell labels readable at a glance (plotly's default is smaller)


def _effect_bound(summary: dict) -> float:
    """One colour scale for every effect-size map of the page: symmetric around 0, to the largest |mean| anywhere."""
    means = [abs(cell["mean"]) for effects in (summary.get("effects") or {}).values() for grid in effects["maps"].values()
             for row in grid for cell in row if cell["mean"] is not None]
    return max(means, default=0.0) or 1.0


def spans_zero(cell: dict) -> bool:
    return cell["ci95"] is not None and cell["ci95"][0] <= 0 <= cell["ci95"][1]


def _effect_heatmap(effects: dict, label: str, div_id: str, bound: float) -> str:
    """A mean log-improvement heatmap on the page's shared colour scale (diverging, symmetric around 0); a cell whose
    bootstrap interval spans 0 says so in the cell; hover with the interval."""
    grid = effects["maps"][label]
    figure = go.Figure(go.Heatmap(
        z=[[c["mean"] for c in row] for row in grid], x=[f"{s:g}" for s in effects["strengths"]],
        y=[f"L{layer}" for layer in effects["layers"]], zmin=-bound, zmax=bound, zmid=0, colorscale="RdBu",
        text=[[fmt_effect(c) + ("<br>CI spans 0" if spans_zero(c) else "") for c in row] for row in grid],
        texttemplate="%{text}", textfont=CELL_FONT,
        customdata=[[c["n"] for c in row] for row in grid],
        hovertemplate="%{y}, strength %{x}<br>%{text}<br>questions: %{customdata}<extra></extra>",
        colorbar={"title": "log-improvement"},
    ))
    return _figure(figure, div_id, clickable=False)


def _roc_curves(curves: dict, div_id: str) -> str:
    """Every calibration signal's ROC curve on one plot, with the chance diagonal."""
    figure = go.Figure([go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line={"dash": "dot", "color": "grey"})]
                       + [go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=name,
                                     line={"shape": "hv"}) for name, points in curves.items()])
    figure.update_layout(height=460, width=560, margin={"t": 20, "b": 50, "l": 60, "r": 20},
                         xaxis={"title": "false positive rate (wrong baselines kept)", "range": [0, 1]},
                         yaxis={"title": "true positive rate (correct baselines kept)", "range": [0, 1]})
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def _dose_curves(curves: DoseCurves, div_id: str) -> str:
    """Mean log-improvement against dose, one line per engram kind through its grid strengths (each marked with its
    strength; the dose there is the median over the kind's cells), the target doses as dotted lines."""
    figure = _lines_against_dose(curves, "mean_log_improvement", "mean log-improvement %{y:.3f}")
    for target in curves.targets:
        figure.add_vline(x=target, line={"dash": "dot", "color": "grey"})
    figure.update_layout(height=460, width=720, margin={"t": 20, "b": 50, "l": 60, "r": 20},
                         xaxis={"title": f"dose: median {curves.measure} (nats, log scale)", "type": "log"},
                         yaxis={"title": "mean log-improvement"})
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def _lines_against_dose(curves: DoseCurves, measure: str, hover: str) -> go.Figure:
    """One line per engram kind: `measure` at each grid strength against its median dose, the strength marked."""
    return go.Figure([go.Scatter(x=[p["dose"] for p in points], y=[p[measure] for p in points],
                                 mode="lines+markers+text", name=kind, text=[f"x{p['strength']:g}" for p in points],
                                 textposition="top center",
                                 hovertemplate=kind + ", strength %{text}<br>dose %{x:.3g} nats<br>" + hover + "<extra></extra>")
                      for kind, points in curves.curves.items()])


def _kind_rates(rates: KindRates, div_id: str) -> str:
    """Per engram kind, the question flip rate and the fragile-correct rate side by side, with their Wilson 95%
    intervals as error bars."""
    kinds = [k["kind"] for k in rates.by_kind]

    def bars(key: str, name: str, colour: str) -> go.Bar:
        cells = [k[key] for k in rates.by_kind]
        return go.Bar(name=name, x=kinds, y=[c["rate"] for c in cells], marker_color=colour,
                      text=[f"{c['k']}/{c['n']}" for c in cells], textposition="outside",
                      error_y={"type": "data", "symmetric": False,
                               "array": [0.0 if not c["ci95"] else c["ci95"][1] - c["rate"] for c in cells],
                               "arrayminus": [0.0 if not c["ci95"] else c["rate"] - c["ci95"][0] for c in cells]})

    figure = go.Figure([bars("question_flip_rate", "baseline-wrong questions that flip somewhere", "#2e8b57"),
                        bars("question_fragile_correct_rate", "baseline-correct questions that break somewhere", "#c0392b")])
    figure.update_layout(barmode="group", height=380, width=200 + 120 * len(kinds), margin={"t": 20, "b": 50, "l": 60, "r": 20},
                         yaxis={"title": "share of questions (95% Wilson interval)", "range": [0, 1.05]},
                         legend={"orientation": "h", "y": -0.2})
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def _tradeoff(curves: DoseCurves, div_id: str) -> str:
    """The trade-off: the flip rate (flipped cells over baseline-wrong cells) against the dose, one line per engram
    kind through its grid strengths."""
    figure = _lines_against_dose(curves, "flip_rate", "flip rate %{y:.2f}")
    figure.update_layout(height=420, width=720, margin={"t": 20, "b": 50, "l": 60, "r": 20},
                         xaxis={"title": f"side effect: median {curves.measure} (nats, log scale)", "type": "log"},
                         yaxis={"title": "flip rate (flipped / baseline-wrong cells)", "range": [0, 1.05]})
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def _sink_bars(bars: SinkBars, div_id: str) -> str:
    """The three Δ log p per engram kind, grouped, with their 95% intervals as error bars."""
    roles = (("correct", "correct"), ("related", "related wrong"), ("unrelated", "unrelated wrong"))
    kinds = [k["kind"] for k in bars.by_kind]

    def errors(key: str, side: int) -> list[float]:
        return [0.0 if k[key]["ci95"] is None else abs(k[key]["ci95"][side] - k[key]["mean"]) for k in bars.by_kind]

    figure = go.Figure([go.Bar(name=f"Δ log p({label})", x=kinds, y=[k[key]["mean"] for k in bars.by_kind],
                               error_y={"type": "data", "symmetric": False, "array": errors(key, 1), "arrayminus": errors(key, 0)})
                        for key, label in roles])
    figure.update_layout(barmode="group", height=420, width=160 + 150 * len(kinds), margin={"t": 20, "b": 50, "l": 60, "r": 20},
                         yaxis={"title": "Δ log p against the baseline (nats)"})
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def _figure(figure: go.Figure, div_id: str, clickable: bool = True) -> str:
    figure.update_layout(height=120 + 40 * len(figure.data[0].y), width=180 + 110 * len(figure.data[0].x),
                         margin={"t": 20, "b": 40, "l": 60, "r": 20}, xaxis_title="strength", yaxis={"autorange": "reversed"})
    page = figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, post_script=CLICK if clickable else None,
                          config={"displaylogo": False})
    return page + (f"<div class='questions' id='{div_id}-questions'>click a cell to list its questions</div>" if clickable else "")


def _drilldown(drill: dict, off: set[str] = frozenset()) -> str:
    inner = "".join(f"<h3>{html.escape(s.title)}</h3>" + html_table(s.columns, s.rows) for s in drilldown_sections(drill))
    qid = drill["question_id"]
    marked = bool(off & {qid, f"{qid} +context", f"{qid} -context"})  # off-distribution in either context condition
    return (f"<details id='question-{html.escape(qid)}'{' class=off' if marked else ''}><summary>{html.escape(qid)}</summary>"
            f"{inner}</details>")
