"""Benchmark `lightopd demo` at its full size: seconds per step and in total; prints JSON.

The demo's timing was once a test assertion; it is measured here instead, where a loaded machine
makes a slow number, not a failed build. Its accuracies are printed too, to tie the timing to a
run that did the real work.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lightopd.demo_config import DemoConfig  # noqa: E402
from lightopd.memory import release_freed_memory  # noqa: E402
from lightopd.stages import demo  # noqa: E402


def main() -> None:
    release_freed_memory()  # as the CLI does
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = demo.run(DemoConfig.of(out=str(Path(tmp) / "demo"), seed=args.seed, device="cpu"))
    print(json.dumps({"benchmark": "demo", "machine": machine(), "seed": args.seed,
                      "seconds": result["seconds"], "accuracy": result["accuracy"]}))


if __name__ == "__main__":
    main()
