import json

from engram_eval.rendering import render_html, render_json, render_markdown
from engram_eval.report import summarize


def test_markdown_json_and_html_carry_the_same_numbers(run):
    frame, meta = run
    summary = summarize(frame, meta, engram_role="all")
    markdown, data, page = render_markdown(summary), json.loads(render_json(summary)), render_html(summary)
    assert data["headline"] == json.loads(json.dumps(summary["headline"]))
    assert set(summary["heatmaps"]) == {"relevant", "anti", "irrelevant", "random"}
    for q in summary["questions"]:
        outcome, cases = [l for l in markdown.splitlines() if l.startswith(f"| {q['question_id']} |")]
        assert outcome.endswith(f"| {q['flips']} | {q['breaks']} |") and cases.endswith(f"| {q['advice']} |")
        assert q["advice"] in page
    assert page.count("<img alt='Heatmap") == 2 * len(summary["heatmaps"])
    assert page.count("data:image/png;base64,iVBOR") == 2 * len(summary["heatmaps"])  # real PNGs
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
