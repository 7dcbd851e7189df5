"""The HTML report: one self-contained page that works offline — plotly's JavaScript inlined, interactive heatmaps
(hover: counts, rate, interval, questions; click a cell: its questions listed under the plot), every table of the
report, a drill-down per question, and the generated texts."""

from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .formatting import fmt_cell, fmt_effect, partial_banner
from .rendering import html_page, html_table
from .figures import CountHeatmap, DoseCurves, EffectHeatmap, RocCurves, SinkBars
from .run_summary import RunSummary
from .sections import drilldown_sections, summary_sections

# Plotly's own event API: a click on a heatmap cell lists that cell's questions under the plot.
CLICK = ("var plot = document.getElementById('{plot_id}');"
         "plot.on('plotly_click', function (event) { var point = event.points[0];"
         " document.getElementById('{plot_id}-questions').textContent ="
         " point.y + ', strength ' + point.x + ': ' + (point.customdata[2] || 'no questions'); });")


def render_html(summary: RunSummary, drills: list[dict] = ()) -> str:
    header = summary["header"]
    title = f"engram-eval report: {header['bank']} on {header['model']}"
    body = []
    if banner := partial_banner(summary):
        body.append(f"<p><strong>{html.escape(banner)}</strong></p>")
    figures = 0
    bound = _effect_bound(summary)
    for section in summary_sections(summary):
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if isinstance(section.figure, CountHeatmap):
            body.append(_count_heatmap(section.figure.heatmap, section.figure.measure, f"heatmap-{figures}"))
            figures += 1
        elif isinstance(section.figure, EffectHeatmap):
            body.append(_effect_heatmap(section.figure.effects, section.figure.label, f"heatmap-{figures}", bound))
            figures += 1
        elif isinstance(section.figure, RocCurves):
            body.append(_roc_curves(section.figure.curves, "roc-curves"))
        elif isinstance(section.figure, DoseCurves):
            body.append(_dose_curves(section.figure, "dose-curves"))
        elif isinstance(section.figure, SinkBars):
            body.append(_sink_bars(section.figure, "sink-bars"))
        body.append(html_table(section.columns, section.rows))
    if drills:
        body.append("<h2>Per question: each cell's probabilities, boosts against the baseline, sink score and texts</h2>")
        for drill in drills:
            body.append(_drilldown(drill))
    if summary.get("generation"):
        texts = summary["generation"]["texts"]
        body.append(f"<h2>Generated texts</h2><details id='generated-texts'><summary>{len(texts)} texts (click to show)</summary>"
                    + html_table(["question", "cell", "ratio", "first answer", "verdict", "text"],
                                 [[t["question_id"], t["cell"], f"{t['ratio']:.3g}", t["first_answer"], t["verdict"], t["text"]]
                                  for t in texts]) + "</details>")
    return html_page(title, "\n".join(body), head=f"<script type='text/javascript'>{get_plotlyjs()}</script>")


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
    figure = go.Figure([go.Scatter(x=[p["dose"] for p in points], y=[p["mean_log_improvement"] for p in points],
                                   mode="lines+markers+text", name=kind, text=[f"x{p['strength']:g}" for p in points],
                                   textposition="top center",
                                   hovertemplate=kind + ", strength %{text}<br>dose %{x:.3g} nats<br>mean log-improvement %{y:.3f}"
                                                 "<extra></extra>")
                       for kind, points in curves.curves.items()])
    for target in curves.targets:
        figure.add_vline(x=target, line={"dash": "dot", "color": "grey"})
    figure.update_layout(height=460, width=720, margin={"t": 20, "b": 50, "l": 60, "r": 20},
                         xaxis={"title": f"dose: median {curves.measure} (nats, log scale)", "type": "log"},
                         yaxis={"title": "mean log-improvement"})
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


def _drilldown(drill: dict) -> str:
    inner = "".join(f"<h3>{html.escape(s.title)}</h3>" + html_table(s.columns, s.rows) for s in drilldown_sections(drill))
    return f"<details id='question-{html.escape(drill['question_id'])}'><summary>{html.escape(drill['question_id'])}</summary>{inner}</details>"
