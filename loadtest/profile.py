"""``--profile connect|measure``: sample the servers with py-spy during one phase of a run.

py-spy is a sampling profiler that reads another process's stacks from outside (it is a
development tool, not a chatd dependency: ``pip install py-spy``). The harness starts one
``py-spy record`` per server process when the phase begins and stops it (SIGINT, which makes
py-spy write its file) when the phase ends, so the profile covers the connect storm or the
measured phase and nothing else. Stacks are written in py-spy's *raw* (collapsed) format, one
``frame;frame;... count`` line per distinct stack, which flamegraph tools read, and
:func:`summarize` turns into the two lists that matter: where time is spent *in* a function
(self) and *under* it (inclusive).

py-spy stops the server for each sample to read a consistent stack (``--nonblocking`` reads it
while the process runs, and then attributes time to the wrong functions: half-written stacks);
a profiled run's CPU figures are not the ones to quote.

Run ``python -m loadtest.profile FILE`` to print the summary of a file again.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from loadtest.servers import stop_all

#: Samples per second.
RATE = 200


def find_py_spy() -> str | None:
    """py-spy on PATH, or next to this Python (a virtualenv's bin/)."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else None


class Profiler:
    """py-spy recorders for some processes, started and stopped around one phase."""

    def __init__(self, pids: list[int], stem: Path, rate: int = RATE) -> None:
        self.pids = pids
        self.stem = stem
        self.rate = rate
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[Path] = []
        self.binary = find_py_spy()

    def start(self) -> None:
        if self.binary is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        for k, pid in enumerate(self.pids):
            path = self.stem.with_name(f"{self.stem.name}-{k}.folded")
            log = path.with_suffix(".log").open("wb")
            self.procs.append(subprocess.Popen(
                [self.binary, "record", "--pid", str(pid), "--rate", str(self.rate),
                 "--format", "raw", "--function", "--output", str(path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            self.files.append(path)

    def stop_recording(self) -> None:
        self.stop()

    def stop(self) -> list[Path]:
        """Stop the recorders (again: a no-op); the paths of the files they wrote."""
        stop_all(self.procs, signal.SIGINT, timeout=30)  # SIGINT: py-spy writes its file
        self.procs = []
        return [f for f in self.files if f.exists()]


def _frame_name(frame: str) -> str:
    """``handler (chatd/server.py:123)`` -> ``handler (chatd/server.py)``: one row per function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({path})" if path else name


def summarize(path: Path, top: int = 25) -> str:
    """The functions with the most samples, self and inclusive, as percentages of all samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            count = int(count_text)
            frames = [_frame_name(f) for f in stack.split(";") if f]
            if not frames:
                continue
            total += count
            own[frames[-1]] += count
            for f in set(frames):
                incl[f] += count
    if not total:
        return f"{path}: no samples"
    lines = [f"{path.name}: {total} samples",
             "  self %   function"]
    lines += [f"  {100 * n / total:6.1f}   {f}" for f, n in own.most_common(top)]
    lines += ["  incl %   function"]
    lines += [f"  {100 * n / total:6.1f}   {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m loadtest.profile FILE.folded [TOP]", file=sys.stderr)
        return 2
    top = int(args[1]) if len(args) > 1 else 25
    print(summarize(Path(args[0]), top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
