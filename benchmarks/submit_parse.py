"""How long a big explicit ``tasks`` list holds the master's reactor: read at once
(``json.loads`` and the spec, as before) against read a slice per turn
(:mod:`dsml.master.jobparse`), in one run, on a ``task.Clock``.

    .venv/bin/python benchmarks/submit_parse.py [--tasks 100000]
"""

from __future__ import annotations

import argparse
import json
import time

from twisted.internet.task import Clock

from dsml.master.jobparse import PARSE_SLICE, job_spec_from_payload, job_spec_in_slices
from dsml.master.jobs.slices import Slicer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100_000)
    n = p.parse_args().tasks
    tasks = [{"command": ["train", f"--seed={i}"], "env": {"I": str(i)}} for i in range(n)]
    payload = json.dumps({"name": "sweep", "tasks": tasks}).encode()

    start = time.perf_counter()
    once = job_spec_from_payload(payload)
    at_once_ms = (time.perf_counter() - start) * 1000

    clock = Clock()
    slicer = Slicer(clock)
    run = slicer._run
    turns: list[float] = []

    def timed() -> None:
        t = time.perf_counter()
        run()
        turns.append((time.perf_counter() - t) * 1000)

    slicer._run = timed  # type: ignore[method-assign]
    got: list[object] = []
    job_spec_in_slices(payload, slicer).addBoth(got.append)
    clock.advance(0)
    assert got == [once], "the slices read another job"
    ordered = sorted(turns) or [0.0]  # (a payload under PARSE_AT_ONCE is read at once)
    print(f"{n:,} explicit tasks, {len(payload) / 1e6:.1f} MB of JSON")
    print(f"  {'read':<28}{'longest turn':>14}{'median turn':>13}{'turns':>7}{'total':>10}")
    print(f"  {'at once (before)':<28}{at_once_ms:>11.1f} ms{at_once_ms:>10.1f} ms{1:>7}"
          f"{at_once_ms:>7.0f} ms")
    print(f"  {f'{PARSE_SLICE} tasks per turn (now)':<28}{ordered[-1]:>11.1f} ms"
          f"{ordered[len(ordered) // 2]:>10.1f} ms{len(turns):>7}{sum(turns):>7.0f} ms")


if __name__ == "__main__":
    main()
