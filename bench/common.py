"""What every benchmark records beside its numbers."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def git_commit() -> str:
    """The short commit the benchmark ran at ("unknown" outside a git checkout)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(result: dict, path: Path) -> None:
    """Write a benchmark's result (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def decode_seconds(engine, seq, clock=time.perf_counter) -> float:
    """Step `engine` (running `seq` alone) to `seq`'s first token, then time the rest of it: the
    decode time, prefill excluded (`clock`: wall-clock, or e.g. time.process_time)."""
    while seq.first_token_time is None:
        engine.step()
    t0 = clock()
    while engine.has_unfinished():
        engine.step()
    return clock() - t0
