"""The HTML report in a real headless browser (Debian's chromium and chromedriver; .ci/run installs them)."""

import os
import shutil
import tempfile

import pytest

from engram_eval.report.drilldown import question_drilldown
from engram_eval.report.html_report import render_html
from engram_eval.report.summary import summarize


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("ENGRAM_EVAL_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (ENGRAM_EVAL_REQUIRE_BROWSER is set)")
        pytest.skip("no chromium/chromedriver: `apt-get install chromium chromium-driver` (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--window-size=1400,1000",
                 f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(options=options, service=Service(driver))  # a given driver: nothing is downloaded
    yield session
    session.quit()


def open_page(browser, page) -> None:
    """Navigate and wait until the page is parsed and its headings are there: the second test once found no heading
    right after navigating (3 of about 25 runs, none of it standalone), so the tests wait rather than race."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page.as_uri())
    WebDriverWait(browser, 30).until(lambda b: b.current_url == page.as_uri() and b.find_elements("tag name", "h2")
                                     and b.execute_script("return document.readyState") == "complete")


def test_the_report_loads_offline_without_console_errors_and_shows_the_numbers(browser, run, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    frame, meta = run
    summary = summarize(frame, meta, engram_role="all")
    page = tmp_path / "report.html"
    page.write_text(render_html(summary, [question_drilldown(frame, q) for q in ("q1", "q2", "q3")]))
    assert "<script src" not in page.read_text()  # self-contained: plotly inlined, nothing fetched
    open_page(browser, page)
    assert [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")] == []
    heatmaps = 2 * len(summary["heatmaps"]) + sum(len(e["maps"]) for e in summary["effects"].values())
    assert len(browser.find_elements("css selector", ".js-plotly-plot .main-svg")) >= heatmaps  # plotly drew every figure
    text = browser.find_element("tag name", "body").text
    headline = summary["headline"]["question_flip_rate"]
    assert f"{headline['k']}/{headline['n']} ({100 * headline['rate']:.0f}%" in text
    for question in summary["questions"]:
        assert question["question_id"] in text and question["decision"]["advice"] in text
    assert len(browser.find_elements("css selector", "details[id^=question-]")) == 3
    # Click the flip heatmap's cell with the most flips: its questions appear under the plot.
    heatmap = summary["heatmaps"]["relevant"]
    i, j = max(((i, j) for i in range(len(heatmap["layers"])) for j in range(len(heatmap["strengths"]))),
               key=lambda ij: heatmap["flip"][ij[0]][ij[1]]["k"])
    area = browser.find_element("css selector", "#heatmap-0 .nsewdrag")
    width, height = area.size["width"], area.size["height"]
    x = -width / 2 + (j + 0.5) * width / len(heatmap["strengths"])
    y = -height / 2 + (i + 0.5) * height / len(heatmap["layers"])
    ActionChains(browser).move_to_element_with_offset(area, int(x), int(y)).click().perform()
    listed = browser.find_element("id", "heatmap-0-questions").text
    expected = ", ".join(heatmap["flip"][i][j]["questions"]) or "no questions"
    assert listed == f"L{heatmap['layers'][i]}, strength {heatmap['strengths'][j]:g}: {expected}"
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []


def test_the_page_opens_on_the_per_kind_headline_with_one_readable_colour_scale(browser, run, tmp_path):
    """The first heading is the headline per engram kind with its conclusion; every effect-size map shares one colour
    scale symmetric around 0 (the largest |mean| on the page, recomputed here); in-cell labels are at least 11 px;
    a cell whose interval spans 0 says so."""
    from decisive import every_section_frame, every_section_generations, every_section_run

    frame, meta = run
    summary = summarize(frame, meta, engram_role="all")
    page = tmp_path / "report.html"
    page.write_text(render_html(summary))
    open_page(browser, page)
    first = browser.find_elements("tag name", "h2")[0].text
    assert first == f"Headline: {summary['headline']['conclusion']}"
    bound = max(abs(c["mean"]) for e in summary["effects"].values() for grid in e["maps"].values() for row in grid for c in row
                if c["mean"] is not None)
    scales = browser.execute_script(
        "return Array.from(document.querySelectorAll('.js-plotly-plot')).filter(p => p.data[0].colorscale && p.data[0].zmid === 0)"
        ".map(p => [p.data[0].zmin, p.data[0].zmax]);")
    assert scales and all(low == pytest.approx(-bound) and high == pytest.approx(bound) for low, high in scales)
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('.js-plotly-plot .heatmaplayer text, .js-plotly-plot g.textpoint text,"
        " .js-plotly-plot .texttemplate text')).map(t => parseFloat(getComputedStyle(t).fontSize));")
    assert sizes and min(sizes) >= 11
    spans = sum(c["ci95"] is not None and c["ci95"][0] <= 0 <= c["ci95"][1]
                for e in summary["effects"].values() for grid in e["maps"].values() for row in grid for c in row)
    assert page.read_text().count("CI spans 0") == spans
    texts = render_html(summarize(every_section_frame(), every_section_run(), generations=every_section_generations()))
    assert "<details id='generated-texts'><summary>" in texts  # the long texts table starts collapsed


def test_the_dose_figure_draws_one_line_per_engram_kind_through_its_strengths(browser, tmp_path):
    """Mean log-improvement against dose: one trace per kind whose points are the summary's (median dose, mean
    log-improvement) at each grid strength, marked with the strength; a dotted line at each target dose; log x axis."""
    from decisive import every_section_frame, every_section_run_with_probe, every_section_side_effects

    frame = every_section_frame()
    summary = summarize(frame, every_section_run_with_probe(), side_effects=every_section_side_effects(frame))
    page = tmp_path / "report.html"
    page.write_text(render_html(summary))
    open_page(browser, page)
    drawn = browser.execute_script(
        "var p = document.getElementById('dose-curves'); return {traces: p.data.map(t => [t.name, t.x, t.y, t.text]),"
        " shapes: p.layout.shapes.map(s => s.x0), type: p._fullLayout.xaxis.type,"
        " points: p.querySelectorAll('.scatterlayer .point').length};")
    curves = summary["dose_matched"]["curves"]
    assert [t[0] for t in drawn["traces"]] == list(curves)
    for name, x, y, text in drawn["traces"]:
        assert x == pytest.approx([p["dose"] for p in curves[name]]) and y == pytest.approx([p["mean_log_improvement"] for p in curves[name]])
        assert text == [f"x{p['strength']:g}" for p in curves[name]]
    assert drawn["shapes"] == pytest.approx(summary["dose_matched"]["targets"]) and drawn["type"] == "log"
    assert drawn["points"] == sum(len(points) for points in curves.values())
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []


@pytest.fixture
def off_page(tmp_path):
    """A report with two questions (conditions) off-distribution, and every question's drill-down."""
    from decisive import every_section_frame, every_section_generations, every_section_run_with_probe, every_section_side_effects

    frame = every_section_frame()
    questions = sorted(frame["question_id"].unique().to_list())
    labels = [q["question_id"] for q in summarize(frame, every_section_run_with_probe())["questions"]]  # per condition
    off = {labels[2]: "its answers hold 5.0% of the probability", labels[6]: "the top token is '<|im_end|>'"}
    summary = summarize(frame, {**every_section_run_with_probe(), "off_distribution": off},
                        generations=every_section_generations(), side_effects=every_section_side_effects(frame))
    page = tmp_path / "report.html"
    page.write_text(render_html(summary, [question_drilldown(frame, q) for q in questions]))
    return page, summary, off, sorted({label.split()[0] for label in off})


def test_the_page_shows_before_it_lists(browser, off_page):
    """Verdict (headline, off-distribution flag, controls), then the plots, then the questions and their drill-downs,
    then the other tables; a table over 12 rows starts collapsed with its row count in its title, and each figure's
    numbers sit collapsed under it."""
    from engram_eval.report.html_report import LONG
    from engram_eval.report.sections import summary_sections

    page, summary, off, _ = off_page
    open_page(browser, page)
    order = browser.execute_script(
        "return Array.from(document.querySelectorAll('h2, #off-distribution, .js-plotly-plot, details[id^=question-]'))"
        ".map(e => e.tagName == 'H2' ? 'h2:' + e.id : e.id.startsWith('question-') ? 'drill' : e.id == 'off-distribution' ? 'flag' : 'plot');")
    positions = {name: order.index(name) for name in ("h2:section-headline", "flag", "h2:section-controls", "h2:plots",
                                                       "h2:per-question", "drill", "h2:tables")}
    assert list(positions.values()) == sorted(positions.values())
    assert order[positions["h2:plots"] + 1] == "plot" and "plot" not in order[positions["h2:per-question"]:]
    sections = {s.key: s for s in summary_sections(summary)}
    for key, section in sections.items():
        if section.figure is None and key not in ("headline", "off-distribution", "sink", "controls", "questions"):
            element = browser.find_element("id", f"section-{key}")
            if len(section.rows) > LONG:
                assert element.tag_name == "details" and element.get_attribute("open") is None
                assert element.find_element("tag name", "summary").text == f"{section.title} ({len(section.rows)} rows)"
            else:
                assert element.tag_name == "h3" and element.is_displayed()
        elif section.figure is not None and key not in ("headline", "sink"):
            numbers = browser.find_element("id", f"section-{key}")
            assert numbers.find_element("tag name", "summary").text.startswith(f"the numbers ({len(section.rows)} row")


def test_off_distribution_questions_are_flagged_once_and_filtered_everywhere(browser, off_page):
    page, summary, off, ids = off_page
    text = page.read_text()
    assert text.count("off-distribution") >= 1 and "(answers off-distribution)" not in text
    open_page(browser, page)
    flag = browser.find_element("id", "off-distribution")
    assert flag.text.startswith(f"Off-distribution: {len(off)} of {summary['header']['conditions']} questions")
    marked = browser.execute_script("return Array.from(document.querySelectorAll('.off')).map(e => e.tagName == 'TR' ?"
                                    " e.cells[0].textContent : e.id);")
    assert set(marked) == set(off) | {f"question-{q}" for q in ids}
    assert sum(m in off for m in marked) >= 2 * len(off)  # the questions table and the calibration table, at least
    assert all(e.is_displayed() for e in browser.find_elements("css selector", "#section-questions + .wide tr.off"))
    browser.find_element("id", "hide-off").click()
    assert not any(e.is_displayed() for e in browser.find_elements("css selector", "tr.off, details.off"))
    kept = [r.find_element("tag name", "td").get_attribute("textContent")
            for r in browser.find_elements("css selector", "#section-questions + .wide tr")[1:] if r.is_displayed()]
    assert kept and not set(kept) & set(off) and len(kept) == summary["header"]["conditions"] - len(off)
    browser.find_element("id", "hide-off").click()
    assert len([r for r in browser.find_elements("css selector", "#section-questions + .wide tr")[1:] if r.is_displayed()]) == \
        summary["header"]["conditions"]


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
def test_the_page_fits_the_screen_and_opens_on_the_headline(browser, off_page, width, height, tmp_path):
    """Emulated screens (Chromium's device metrics): the page never scrolls sideways (wide tables and figures scroll in
    their own box); at 1280 x 800 the whole headline table is on the first screen. Screenshots kept for a look."""
    page, summary, _, _ = off_page
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    try:
        open_page(browser, page)
        measured = browser.execute_script(
            "return {inner: window.innerWidth, scroll: document.documentElement.scrollWidth,"
            " bottom: document.querySelector('#section-headline + .wide table').getBoundingClientRect().bottom};")
        browser.save_screenshot(str(tmp_path / f"report-{width}.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert measured["inner"] == width and measured["scroll"] <= width
    if width == 1280:
        assert measured["bottom"] <= height
    assert (tmp_path / f"report-{width}.png").stat().st_size > 10_000
