"""Progress a batch job's log can read: with stderr not a terminal, plain lines at a steady interval
(also while no item finishes), the count and ETA in each; and `inspect --show`'s rows on stdout."""

from __future__ import annotations

import re
import time

import pytest

from lightopd.progress import StageProgress
from tests.helpers import last_json, run_cli, write_jsonl

LINE = re.compile(r"^([\w -]+): (\d+)/(\d+) \(\d+%\) [\d,-]+ tok/s .*elapsed \d+:\d\d:\d\d "
                  r"eta (\d+:\d\d:\d\d|-:--:--)$")


def test_the_interval_is_a_positive_number_or_thirty_seconds(monkeypatch):
    from lightopd.progress import interval

    for value, want in (("0.5", 0.5), ("0", 30.0), ("-3", 30.0), ("soon", 30.0), ("nan", 30.0)):
        monkeypatch.setenv("LIGHTOPD_PROGRESS_SECONDS", value)
        assert interval() == want, value


def test_a_stuck_stage_keeps_writing_its_count(capsys, monkeypatch):
    monkeypatch.setenv("LIGHTOPD_PROGRESS_SECONDS", "0.02")
    with StageProgress("score-teacher", total=3) as bar:
        bar.advance(1, tokens=10)
        time.sleep(0.3)  # no item finishes: the timer still writes
    lines = capsys.readouterr().err.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert sum(line.startswith("score-teacher: 1/3 (33%)") for line in lines) >= 4
    assert lines[0].startswith("score-teacher: 0/3") and "eta -:--:--" in lines[0]


@pytest.mark.slow
def test_a_redirected_run_logs_plain_progress_lines(tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"w{i} w{i + 1}"} for i in range(6)])
    proc = run_cli("rollout", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(tmp_path / "r"),
                   "--n", "2", "--max-new-tokens", "24", env={"LIGHTOPD_PROGRESS_SECONDS": "0.01"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rollout: ")]
    assert len(lines) >= 3 and all(LINE.match(line) for line in lines), proc.stderr
    counts = [int(LINE.match(line).group(2)) for line in lines]
    assert counts == sorted(counts) and lines[-1].startswith("rollout: 12/12 (100%)")
    assert "━" not in proc.stderr  # no bar frames in a log
    shown = run_cli("inspect", str(tmp_path / "r"), "--show", "2")
    assert shown.stdout.count("completion: ") == 2 and "completion: " not in shown.stderr  # the rows: stdout
    assert len(last_json(shown)["show"]) == 2  # and the JSON line last
