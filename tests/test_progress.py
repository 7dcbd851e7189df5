"""Progress: a bar on a terminal, plain lines when piped, nothing when silenced (engram_eval.core.progress)."""

import io

import engram_eval.core.progress as progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(stream, steps: int = 4, **options) -> str:
    with progress.progress_bar(steps, "sweep", "cell", stream=stream, **options) as bar:
        for _ in range(steps):
            bar.update()
    return stream.getvalue()


def test_piped_each_status_is_one_whole_line_with_rate_and_eta(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_SECONDS", 0.0)
    lines = run(io.StringIO()).splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"sweep: {n}/4 cells" for n in range(5)]
    assert all("\r" not in line and ", ETA " in line and "cell/s" in line and "elapsed" in line for line in lines)
    assert lines[-1].startswith("sweep: 4/4 cells (100%), ")


def test_piped_a_job_shorter_than_the_interval_prints_nothing(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_SECONDS", 1e6)
    assert run(io.StringIO()) == ""


def test_on_a_terminal_the_bar_redraws_in_place():
    drawn = run(Terminal())
    assert "\r" in drawn and "4/4" in drawn and "cell/s" in drawn


def test_disabled_or_silenced_it_prints_nothing(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_SECONDS", 0.0)
    assert run(Terminal(), enabled=False) == "" and run(io.StringIO(), enabled=False) == ""
    with progress.silenced():
        assert run(Terminal()) == ""
        with progress.silenced(False):  # an inner command cannot turn the outer --quiet off
            assert run(io.StringIO()) == ""
    with progress.silenced(False):
        assert run(io.StringIO()) != ""


def test_plain_lines_drop_carriage_returns_repeated_counts_and_padding():
    out = io.StringIO()
    lines = progress.PlainLines(out)
    lines.write("\rsweep: 1/2 (50%),  3.0cell/s")
    lines.write("\rsweep: 1/2 (50%), 2.9cell/s, loss=1")
    lines.write("\rsweep: 2/2 (100%), 3.1cell/s\n")
    assert out.getvalue() == "sweep: 1/2 (50%), 3.0cell/s\nsweep: 2/2 (100%), 3.1cell/s\n"
