"""What the trace costs a big map on a terminal: a map over N items run with
the cute trace on stderr, stderr a pseudo-terminal, progress lines on
against progress off (a line per event, as before), with no trace at all
for scale. Each run is a fresh process; the time is Engine.run's, measured
inside it. The runs take turns, and ratios are paired by repetition.

    python bench/progress_cost.py               # N = 100,000, 5 repetitions
    python bench/progress_cost.py 10000 9

Linux and macOS (it needs the pty module). Standard library only.
"""
import os
import pty
import statistics
import struct
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import sys, time
sys.path.insert(0, "bench")
from map_cost import mapped_flow       # the same 1 -> N -> 1 map that map_cost.py times
from pyoco import Engine

n, mode = int(sys.argv[1]), sys.argv[2]
flow = mapped_flow(n)
engine = Engine(workers=8, store=False, trace=mode != "none", progress=mode == "on")
t0 = time.perf_counter()
run = engine.run(flow)
took = time.perf_counter() - t0
assert run.results["total"] == n * (n - 1), run.results["total"]
print(took)
"""

MODES = ("on", "off", "none")
LABELS = {"on": "progress on", "off": "progress off (a line per event)",
          "none": "no trace (trace=False)"}


def one_run(n, mode, columns=120):
    """(seconds inside Engine.run, bytes the terminal received) of one child."""
    import fcntl
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING="utf-8", TERM="xterm")
    env = {k: v for k, v in env.items() if k not in ("PYOCO_PROGRESS", "PYOCO_CUTE",
                                                      "PYOCO_HOME")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(n), mode], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    received = [0]

    def drain():                # a terminal that keeps up: read everything at once
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:     # EIO: the child closed the terminal
                return
            if not chunk:
                return
            received[0] += len(chunk)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=600)
    reader.join(10)
    os.close(master)
    if proc.returncode != 0:
        raise SystemExit("the %s run failed (exit %s)" % (mode, proc.returncode))
    return float(out.split()[-1]), received[0]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    times = {mode: [] for mode in MODES}
    sizes = {mode: [] for mode in MODES}
    for mode in MODES:              # once each, untimed: the .pyc, the disk cache
        one_run(min(n, 1000), mode)
    for _ in range(reps):
        for mode in MODES:
            took, size = one_run(n, mode)
            times[mode].append(took)
            sizes[mode].append(size)
    print("map over %d items, workers=8, store off, stderr a pseudo-terminal (120 columns),"
          " median of %d interleaved runs" % (n, reps))
    for mode in MODES:
        median = statistics.median(times[mode])
        print("  %-32s %7.3f s  %6.2f us/item  %10d bytes to the terminal"
              % (LABELS[mode], median, median / n * 1e6, statistics.median(sizes[mode])))
    for a, b in (("on", "off"), ("on", "none"), ("off", "none")):
        ratio = statistics.median(x / y for x, y in zip(times[a], times[b]))
        print("  %s / %s (paired): %.2fx" % (a, b, ratio))


if __name__ == "__main__":
    main()
