"""Helpers shared by the test modules: running the real CLI (in a subprocess or in this process),
running stages with flat options, and reading what they wrote. Fixtures live in conftest.py;
independent float64 references in reference.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightopd.cli import main
from lightopd.config import RolloutConfig, ScoreConfig
from lightopd.data.reader import iter_batches
from lightopd.layering import train_settings


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_cli(*args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """Run `python -m lightopd ARGS` in a subprocess, as a user's shell script would (`env` adds to
    the environment)."""
    proc = subprocess.run([sys.executable, "-m", "lightopd", *args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"lightopd {' '.join(args)} exited {proc.returncode}\n{proc.stderr}")
    return proc


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (fast) exactly as the console script does: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lightopd", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_workers(*args: str, workers: int = 2) -> list[dict]:
    """`python -m lightopd ARGS --worker I/N` for I = 0..N-1, all at once; their JSON results."""
    procs = [subprocess.Popen([sys.executable, "-m", "lightopd", *args, "--worker", f"{i}/{workers}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(workers)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def do_rollout(model, prompts, out, **options) -> dict:
    """The rollout stage with flat options (`n=2`, `temperature=0.6`, ...)."""
    from lightopd.stages import rollout

    return rollout.run(RolloutConfig.of(model=str(model), prompts=str(prompts), out=str(out), **options))


def do_score(teacher, rollouts, out, **options) -> dict:
    from lightopd.stages import score

    return score.run(ScoreConfig.of(teacher=str(teacher), data=str(rollouts), out=str(out), **options))


def do_train(student, data, out, sets=(), **flags):
    """The train stage as if run with these flags (and `--set` pairs); returns (result, config)."""
    from lightopd.stages import train

    data = tuple(map(str, data)) if isinstance(data, (tuple, list)) else str(data)  # several stores, or one
    cfg, params = train_settings({"student": str(student), "data": data, "out": str(out), **flags}, None,
                                 list(sets))
    return train.run(cfg, params), cfg


def read_rows(store: Path) -> list[dict]:
    return [row for batch in iter_batches(store) for row in batch.to_pylist()]


def weights(directory) -> dict:
    """A trained model directory's tensors."""
    from safetensors.torch import load_file

    return load_file(Path(directory) / "model.safetensors")


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


class Exploit:
    """What an attacker pickles into a file lightopd reads: unpickling it would run a shell command that
    creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
