"""How the report writes a number, a rate, a cell: the formats every section and renderer share."""

from __future__ import annotations

import math


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%" + ("!" if value > 0.5 else "")


def fmt_prob(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"


def fmt_probs(p_correct: float | None, p_incorrect: float | None) -> str:
    return f"{fmt_prob(p_correct)} / {fmt_prob(p_incorrect)}"


def fmt_cell_name(cell: dict, show_k: bool = False) -> str:
    return f"L{cell['layer']}, {cell['strength']:g}" + (f", k={cell['chunks']}" if show_k else "")


def fmt_best(best: dict, show_k: bool = False) -> str:
    """The relevant engram's best cell; when no cell beats the baseline ratio, say so rather than call it best."""
    if best["layer"] is None:
        return "-"
    cell = f"{fmt_cell_name(best, show_k)}: {fmt_ratio(best['ratio'])} ({fmt_probs(best['p_correct'], best['p_incorrect'])})"
    return cell if best["improves_on_baseline"] else f"no cell improves on the baseline (highest {cell})"


def fmt_flips(q: dict) -> str:
    if not q["flips"]:
        return "0"
    return f"{q['flips']} ({q['clean_flips']} / {q['flips_p_correct_fell']} / {q['flips_collapsed']})"


def fmt_effect(cell: dict) -> str:
    if cell["mean"] is None:
        return "-"
    interval = "" if cell["ci95"] is None else f" ({cell['ci95'][0]:.2f} to {cell['ci95'][1]:.2f})"
    return f"{cell['mean']:.2f}{interval}"


def fmt_measured(decision: dict) -> str:
    ratio = decision["measured_ratio"]
    if ratio is None:
        return "-"
    where = "baseline" if decision["strength"] is None else f"strength {decision['strength']:g}"
    measured = f"{where}: ratio {fmt_ratio(ratio)} ({'correct' if decision['measured_correct'] else 'wrong'})"
    return measured + ("; the grid measured this as harmful" if decision["contradicted"] else "")


def fmt_difference(d: dict) -> str:
    """A signed difference of two shares with its interval (not a fraction of anything)."""
    if d["difference"] is None:
        return "-"
    interval = "" if d["ci95"] is None else f", 95% CI {d['ci95'][0]:+.2f} to {d['ci95'][1]:+.2f}"
    return f"{d['difference']:+.2f} ({d['questions']} questions{interval})"


def fmt_rate(r: dict) -> str:
    if not r["n"]:
        return f"{r['k']}/0"
    low, high = r["ci95"]
    return f"{r['k']}/{r['n']} ({100 * r['rate']:.0f}%, 95% CI {100 * low:.0f}-{100 * high:.0f}%)"


def fmt_cell(r: dict) -> str:
    return "-" if not r["n"] else f"{r['k']}/{r['n']}"


def fmt_float(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_p(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def fmt_needed(entry: dict) -> str:
    strength = "-" if entry["median_strength"] is None else f"{entry['median_strength']:.3g}"
    return f"{strength} ({entry['series_reaching']}/{entry['series']})"


def fmt_side_effect(at: dict | None) -> str:
    if at is None or at["dose"] is None:
        return "-"
    return f"{at['dose']:.3g} nats" + ("" if at["ppl_ratio"] is None else f", perplexity x{at['ppl_ratio']:.3g}")


def partial_banner(summary: dict) -> str | None:
    partial = summary["header"]["partial"]
    if not partial:
        return None
    of = f" of {partial['questions']}" if partial["questions"] else ""
    return (f"partial: {partial['questions_done']}{of} questions (the sweep has not finished; "
            "rerun it with the same command to complete the run)")


def fmt_interval(interval: list[float] | None, digits: int = 3) -> str:
    return "-" if interval is None else f"{interval[0]:.{digits}f} to {interval[1]:.{digits}f}"


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
