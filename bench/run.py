#!/usr/bin/env python3
"""Benchmarks for pyoco against plain-Python ways of running the same DAG.

    python bench/run.py              # the default set (under 1.5 minutes on 2 cores)
    python bench/run.py --quick      # a smoke run: small sizes, 1-2 repetitions
    python bench/run.py --no-big     # without the 100,000-task workloads (about 25 s)
    python bench/run.py --reps 11    # more repetitions of the 10k workloads
    python bench/run.py --only chain,sleep

Standard library only. pyoco is imported from the folder above this one, so
the script works from the repository root and from bench/. Optional peers
(dask's threaded scheduler) are timed when they are importable and skipped
silently otherwise; nothing is ever installed.

Every run of every runner is checked: each task records a sequence number
(from one itertools.count, whose next() is atomic in CPython) when it starts
and when it ends; afterwards every task must have exactly one start and one
end, and every task must start after all its parents ended. A failed check
stops that workload, is printed loudly, and makes the script exit 1.

See bench/README.md for what the workloads and runners are and how to read
the table.
"""

import argparse
import datetime
import gc
import graphlib
import itertools
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pyoco  # noqa: E402  (needs the sys.path line above)

WORKERS = 8


class BenchError(Exception):
    """A runner did not run the flow correctly (wrong count, wrong order, wrong result)."""


# ---------------------------------------------------------------------------
# Task functions
#
# Each task is its own closure, shared by every runner: the same function
# objects run in the sequential loop, the thread pool, pyoco and dask. A task
# records a start and an end number from one counter; `ctr` is a one-item
# list holding the counter's __next__ so a run can start a fresh counter
# without rebuilding the functions.
# ---------------------------------------------------------------------------

def make_plain(i, start, end, ctr):
    def fn(ctx):
        start[i] = ctr[0]()
        end[i] = ctr[0]()
        return i
    return fn


def make_sleep(i, start, end, ctr, seconds):
    def fn(ctx):
        start[i] = ctr[0]()
        time.sleep(seconds)
        end[i] = ctr[0]()
        return i
    return fn


def make_data_source(i, start, end, ctr):
    def fn(ctx):
        start[i] = ctr[0]()
        out = {"step": i, "total": 0, "tail": [i]}
        end[i] = ctr[0]()
        return out
    return fn


def make_data_step(i, start, end, ctr):
    def fn(ctx, data):
        start[i] = ctr[0]()
        out = {"step": i, "total": data["total"] + i, "tail": data["tail"][-3:] + [i]}
        end[i] = ctr[0]()
        return out
    return fn


class Ctx:
    """What the baseline runners pass as ``ctx``: a small object per task, like
    pyoco's Context (the task functions here do not look at it)."""

    __slots__ = ("task_name", "results")

    def __init__(self, task_name, results):
        self.task_name = task_name
        self.results = results


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

class Workload:
    """One DAG, built once: task functions, a graphlib graph, a pyoco Flow.

    ``preds[i]``: task numbers task i runs after. ``src[i]``: the task whose
    output is passed to task i as its ``data`` argument, or None. Task
    numbers are a topological order (every parent has a smaller number).
    """

    def __init__(self, key, label, preds, kind="plain", src=None, sleep=0.0):
        self.key, self.label = key, label
        n = self.n = len(preds)
        self.preds = preds
        self.src = src or [None] * n
        self.names = ["t%d" % i for i in range(n)]
        self.start = [None] * n
        self.end = [None] * n
        self.ctr = [None]
        self.sleep = sleep
        self.fns = []
        for i in range(n):
            if kind == "plain":
                fn = make_plain(i, self.start, self.end, self.ctr)
            elif kind == "sleep":
                fn = make_plain(i, self.start, self.end, self.ctr) if not preds[i] or i == n - 1 \
                    else make_sleep(i, self.start, self.end, self.ctr, sleep)
            elif kind == "data":
                fn = make_data_source(i, self.start, self.end, self.ctr) if self.src[i] is None \
                    else make_data_step(i, self.start, self.end, self.ctr)
            else:
                raise ValueError(kind)
            fn.__name__ = fn.__qualname__ = self.names[i]
            self.fns.append(fn)
        self.kind = kind
        # graphlib wants node -> predecessors
        self.graph = {i: ps for i, ps in enumerate(preds)}
        self.flow = self._build_flow()
        self.dask_graph = None
        self.reset()

    def _build_flow(self):
        flow = pyoco.Flow(name=self.key)
        nodes = []
        for i, fn in enumerate(self.fns):
            s = self.src[i]
            if s is None:
                node = pyoco.task(fn, name=self.names[i])
            else:
                node = pyoco.task(fn, name=self.names[i],
                                  inputs={"data": "$node.%s.output" % self.names[s]})
            nodes.append(node)
            ps = self.preds[i]
            flow.add(node, after=[nodes[p] for p in ps] if ps else ())
        return flow

    def reset(self):
        """Clear the recorded numbers and start a fresh counter (before every run)."""
        blank = [None] * self.n
        self.start[:] = blank
        self.end[:] = blank
        self.ctr[0] = itertools.count().__next__

    def expected_last(self):
        last = self.n - 1
        if self.kind == "data":
            return {"step": last, "total": last * (last + 1) // 2,
                    "tail": list(range(max(0, last - 3), last + 1))}
        return last

    def validate(self, who, results):
        """Raise BenchError unless every task ran exactly once, after its parents."""
        n, names = self.n, self.names
        steps = self.ctr[0]()       # numbers handed out so far = 2 per task run
        start, end = self.start, self.end
        problems = []
        if steps != 2 * n:
            problems.append("%d start/end records for %d tasks (expected %d): some task ran"
                            " more than once or not at all" % (steps, n, 2 * n))
        missing = [names[i] for i in range(n) if start[i] is None or end[i] is None]
        if missing:
            problems.append("%d tasks never ran, e.g. %s" % (len(missing), ", ".join(missing[:5])))
        else:
            for i, ps in enumerate(self.preds):
                si = start[i]
                for p in ps:
                    if not end[p] < si:
                        problems.append("task %s started (#%d) before its parent %s ended (#%d)"
                                        % (names[i], si, names[p], end[p]))
                        break
                if len(problems) > 5:
                    break
        if results is None or len(results) != n:
            problems.append("results hold %s entries, expected %d"
                            % ("no" if results is None else len(results), n))
        else:
            last = results.get(names[-1], "<missing>")
            if last != self.expected_last():
                problems.append("last task returned %r, expected %r"
                                % (last, self.expected_last()))
            if self.kind != "data":
                wrong = [nm for i, nm in enumerate(names) if results.get(nm) != i]
                if wrong:
                    problems.append("%d tasks have a wrong result, e.g. %s"
                                    % (len(wrong), ", ".join(wrong[:5])))
        if problems:
            raise BenchError("%s on %s: %s" % (who, self.label, "; ".join(problems)))


def build_chain(n):
    return Workload("chain", "chain %s" % human(n), [[]] + [[i - 1] for i in range(1, n)])


def build_fanout(width):
    # 1 -> width -> 1
    preds = [[]] + [[0] for _ in range(width)] + [list(range(1, width + 1))]
    return Workload("fanout", "fan-out/join %s" % human(width), preds)


def build_layered(layers, per_layer, parents=3, seed=20261130):
    rng = random.Random(seed)
    preds = [[] for _ in range(per_layer)]
    for layer in range(1, layers):
        base = (layer - 1) * per_layer
        for _ in range(per_layer):
            preds.append(sorted(base + j for j in rng.sample(range(per_layer), parents)))
    return Workload("layered", "layered %dx%d" % (layers, per_layer), preds)


def build_sleep(width, seconds):
    preds = [[]] + [[0] for _ in range(width)] + [list(range(1, width + 1))]
    return Workload("sleep", "sleep %dx%gs" % (width, seconds), preds, kind="sleep",
                    sleep=seconds)


def build_data_chain(n):
    preds = [[]] + [[i - 1] for i in range(1, n)]
    src = [None] + list(range(n - 1))
    return Workload("data", "data chain %s" % human(n), preds, kind="data", src=src)


def human(n):
    if n >= 1000 and n % 1000 == 0:
        return "%dk" % (n // 1000)
    return str(n)


# ---------------------------------------------------------------------------
# Runners: each takes a Workload and returns the results dict (name -> output)
# ---------------------------------------------------------------------------

def run_seq(w):
    """graphlib's static order, then call each function in a plain loop."""
    results = {}
    names, fns, src = w.names, w.fns, w.src
    for i in graphlib.TopologicalSorter(w.graph).static_order():
        name = names[i]
        s = src[i]
        if s is None:
            results[name] = fns[i](Ctx(name, results))
        else:
            results[name] = fns[i](Ctx(name, results), results[names[s]])
    return results


def run_tpe(w):
    """graphlib get_ready()/done() driving a ThreadPoolExecutor(8), wait(FIRST_COMPLETED)."""
    results = {}
    names, fns, src = w.names, w.fns, w.src
    ts = graphlib.TopologicalSorter(w.graph)
    ts.prepare()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        running = {}
        while ts.is_active():
            for i in ts.get_ready():
                name = names[i]
                s = src[i]
                if s is None:
                    fut = pool.submit(fns[i], Ctx(name, results))
                else:
                    fut = pool.submit(fns[i], Ctx(name, results), results[names[s]])
                running[fut] = i
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                i = running.pop(fut)
                results[names[i]] = fut.result()
                ts.done(i)
    return results


def run_pyoco(w):
    """pyoco as a library user who wants speed runs it: no trace, no store."""
    run = pyoco.Engine(workers=WORKERS, trace=False, store=False).run(w.flow)
    if run.status != pyoco.RunState.COMPLETED:
        raise BenchError("pyoco run ended %s" % run.status)
    return run.results


class PyocoDefaults:
    """pyoco as ``pyoco run`` sets it up: trace on (to a file here) and a run store."""

    def __init__(self, tmp):
        self.trace_path = os.path.join(tmp, "trace.log")
        self.store = os.path.join(tmp, "store")

    def __call__(self, w):
        with open(self.trace_path, "w", encoding="utf-8") as trace:
            run = pyoco.Engine(trace=trace, store=self.store).run(w.flow)
        if run.status != pyoco.RunState.COMPLETED:
            raise BenchError("pyoco run ended %s" % run.status)
        return run.results


def load_dask():
    """dask.threaded.get, or None when dask is not importable."""
    try:
        from dask.threaded import get
    except Exception:
        return None
    return get


def _dask_call(fn, name, with_data):
    if with_data:
        def call(data, *_):
            return fn(Ctx(name, None), data)
    else:
        def call(*_):
            return fn(Ctx(name, None))
    return call


def dask_runner(get):
    def run_dask(w):
        if w.dask_graph is None:        # built once per workload, outside the timing
            dsk = {}
            for i, name in enumerate(w.names):
                s = w.src[i]
                deps = [w.names[p] for p in w.preds[i] if p != s]
                if s is not None:
                    deps.insert(0, w.names[s])
                dsk[name] = (_dask_call(w.fns[i], name, s is not None),) + tuple(deps)
            w.dask_graph = dsk
        values = get(w.dask_graph, w.names, num_workers=WORKERS)
        return dict(zip(w.names, values))
    return run_dask


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def timed(fn, w, who):
    w.reset()
    gc.collect()                # start each run from a collected heap; the GC stays on
    t0 = time.perf_counter()
    results = fn(w)
    elapsed = time.perf_counter() - t0
    w.validate(who, results)
    return elapsed


def bench(w, runners, reps, warm=True):
    """Run every runner ``reps`` times, interleaved: A, B, C, A, B, C, ...

    Before that, each runner runs once untimed (checked all the same); pyoco's
    first run also compiles the flow's plan, so its time is kept as "1st".
    Returns {runner: [seconds per rep]}, {runner: first-run seconds}.
    """
    firsts = {}
    if warm:
        for key, fn in runners:
            if key == "seq" and w.key == "sleep":
                continue        # nothing to warm in a loop of sleeps; it would cost 3 s
            firsts[key] = timed(fn, w, key)
    samples = {key: [] for key, _ in runners}
    for _ in range(reps):
        for key, fn in runners:
            samples[key].append(timed(fn, w, key))
    return samples, firsts


def sort_time(w, reps):
    """Median seconds of graphlib's static_order alone: a part of every seq run."""
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        for _ in graphlib.TopologicalSorter(w.graph).static_order():
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_ratio(a, b):
    """Median over repetitions of a[k] / b[k] (rep k of both ran back to back)."""
    return statistics.median(x / y for x, y in zip(a, b))


def peak_per_task(w, fn):
    """tracemalloc peak of one run of ``fn`` (plan already compiled), per task, in bytes."""
    w.reset()
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        results = fn(w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    w.validate("memory run", results)
    return (peak - base) / w.n


def import_times(reps):
    """Median seconds: `import pyoco` measured inside a fresh interpreter, a bare
    interpreter start, and the same start plus `import pyoco` (wall clock)."""
    setup = "import sys, time; sys.path.insert(0, %r); " % ROOT
    inner = setup + ("n = len(sys.modules); t = time.perf_counter(); import pyoco; "
                     "print(time.perf_counter() - t, len(sys.modules) - n)")
    bare = setup + "pass"
    cmd = [sys.executable, "-c"]
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPROFILEIMPORTTIME", None)

    def call(code):
        t0 = time.perf_counter()
        out = subprocess.run(cmd + [code], cwd=ROOT, env=env, check=True,
                             stdout=subprocess.PIPE, universal_newlines=True).stdout
        return time.perf_counter() - t0, out

    call(inner)             # writes __pycache__/pyoco.*.pyc if it is missing or stale
    inside, starts, with_import, modules = [], [], [], 0
    for _ in range(reps):
        starts.append(call(bare)[0])
        wall, out = call(inner)
        with_import.append(wall)
        secs, modules = out.split()
        inside.append(float(secs))
    import importlib.util
    pyc = importlib.util.cache_from_source(os.path.join(ROOT, "pyoco.py"))
    return {"inside": statistics.median(inside), "bare": statistics.median(starts),
            "with": statistics.median(with_import), "modules": int(modules),
            "pyc": os.path.exists(pyc)}


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def fmt_s(t):
    return "%.4f" % t if t < 10 else "%.2f" % t


def fmt_x(r):
    return "%.2fx" % r


def print_table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: " | ".join(  # noqa: E731
        str(c).ljust(wd) if k == 0 else str(c).rjust(wd)
        for k, (c, wd) in enumerate(zip(cells, widths)))
    print(line(header))
    print("-|-".join("-" * wd for wd in widths))
    for row in rows:
        print(line(row))


def machine_line():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for text in f:
                if text.startswith("model name"):
                    cpu = text.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%s cores (nproc), CPU %s, Python %s (%s), %s, pyoco %s" % (
        os.cpu_count(), cpu, platform.python_version(), platform.python_implementation(),
        datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), pyoco.__version__)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def sleep_parameters(args):
    """(tasks, seconds each) of the sleep-parallel workload."""
    return (16, 0.01) if args.quick else (64, 0.05)


def plan(args):
    """The workloads to run: (key, builder, repetitions, with the trace+store runner)."""
    sleep_shape = sleep_parameters(args)
    r = args.reps
    few = min(3, r)
    if args.quick:
        return [
            ("chain", lambda: build_chain(500), r, True),
            ("fanout", lambda: build_fanout(500), r, False),
            ("layered", lambda: build_layered(10, 50), r, False),
            ("data", lambda: build_data_chain(200), r, False),
            ("sleep", lambda: build_sleep(*sleep_shape), r, False),
            ("chain-big", lambda: build_chain(5000), r, False),
            ("fanout-big", lambda: build_fanout(5000), r, False),
        ]
    work = [
        ("chain", lambda: build_chain(10000), r, True),
        ("fanout", lambda: build_fanout(10000), r, False),
        ("layered", lambda: build_layered(100, 100), r, False),
        ("data", lambda: build_data_chain(1000), 3 * r, False),
        ("sleep", lambda: build_sleep(*sleep_shape), few, False),
        ("chain-big", lambda: build_chain(100000), min(5, r), False),
        ("fanout-big", lambda: build_fanout(100000), few, False),
    ]
    return work


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark pyoco against plain-Python DAG runners.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small sizes, 1-2 repetitions, targets not judged")
    parser.add_argument("--big", action=argparse.BooleanOptionalAction, default=True,
                        help="run the 100,000-task chain and fan-out/join (the default:"
                             " the whole set still runs in under 2 minutes); --no-big skips"
                             " them, and with them the 10k-vs-100k checks")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions of the 10k workloads (default 7; 2 with --quick);"
                             " the 1k data chain gets 3x, the 100k chain at most 5, sleep and the"
                             " 100k fan-out at most 3")
    parser.add_argument("--only", default=None,
                        help="comma-separated workloads: chain, fanout, layered, data, sleep,"
                             " chain-big, fanout-big")
    parser.add_argument("--no-import", action="store_true", help="skip the import-time check")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 7
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    only = set(args.only.split(",")) if args.only else None
    work = plan(args)
    if only and only - {item[0] for item in work}:
        parser.error("--only: unknown workload %s; the workloads are %s"
                     % (", ".join(sorted(only - {item[0] for item in work})),
                        ", ".join(item[0] for item in work)))
    if not args.big:
        work = [item for item in work if not item[0].endswith("-big")]

    t_begin = time.perf_counter()
    print("pyoco benchmark: %s" % machine_line())
    import hashlib
    with open(os.path.join(ROOT, "pyoco.py"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    print("pyoco from %s (sha256 %s...); GC on (collected before each timed run); workers=%d"
          % (os.path.join(ROOT, "pyoco.py"), digest, WORKERS))
    dask_get = load_dask()
    runners_base = [("seq", run_seq), ("tpe", run_tpe), ("pyoco", run_pyoco)]
    if dask_get is not None:
        runners_base.append(("dask", dask_runner(dask_get)))
    print("runners: %s" % ", ".join(k for k, _ in runners_base))
    sys.stdout.flush()

    failed = []
    rows, results = [], {}
    mem = {}
    with tempfile.TemporaryDirectory(prefix="pyoco-bench-") as tmp:
        defaults = PyocoDefaults(tmp)
        for key, builder, reps, with_defaults in work:
            if only and key not in only:
                continue
            t0 = time.perf_counter()
            w = builder()
            built = time.perf_counter() - t0
            runners = list(runners_base)
            if with_defaults:
                runners.append(("pyoco-run", defaults))
            try:
                samples, firsts = bench(w, runners, reps)
                if key in ("chain", "chain-big"):
                    mem[key] = (w.n, peak_per_task(w, run_pyoco), peak_per_task(w, run_seq))
            except Exception as exc:
                kind = "VALIDATION FAILED" if isinstance(exc, BenchError) else "ERROR"
                print("\n!!! %s: %s: %s: %s\n" % (kind, w.label, type(exc).__name__, exc),
                      file=sys.stderr)
                failed.append(w.label)
                continue
            med = {k: statistics.median(v) for k, v in samples.items()}
            results[key] = (w.n, med, samples)
            sort_s = sort_time(w, min(reps, 5))

            def row_for(label, who, base=True):
                t = samples[who]
                row = [label, w.n, reps,
                       fmt_s(med["seq"]) if base else "", fmt_s(sort_s) if base else "",
                       fmt_s(med["tpe"]) if base else "", fmt_s(med[who]),
                       "%s..%s" % (fmt_s(min(t)), fmt_s(max(t))),
                       fmt_x(paired_ratio(t, samples["seq"])),
                       fmt_x(paired_ratio(t, samples["tpe"])),
                       "%.2f" % (med[who] / w.n * 1e6), fmt_s(firsts[who])]
                if dask_get is not None:
                    row += [fmt_s(med["dask"]) if base else "",
                            fmt_x(paired_ratio(t, samples["dask"]))]
                return row
            rows.append(row_for(w.label, "pyoco"))
            if with_defaults:
                rows.append(row_for("  same, pyoco trace+store", "pyoco-run", base=False))
            print("  done: %-22s built in %.2f s, measured in %.1f s"
                  % (w.label, built, time.perf_counter() - t0))
            sys.stdout.flush()
            del w
            gc.collect()

    print()
    header = ["workload", "tasks", "reps", "seq s", "(sort s)", "tpe s", "pyoco s",
              "pyoco min..max", "pyoco/seq", "pyoco/tpe", "us/task", "pyoco 1st s"]
    if dask_get is not None:
        header += ["dask s", "pyoco/dask"]
    print_table(header, rows)
    print("\nseconds are medians; ratios are medians of per-repetition ratios (the runners"
          " took turns, so rep k of each ran back to back).\nseq = graphlib static_order"
          " then a plain loop; (sort s) = the static_order part of it alone; tpe = graphlib"
          " get_ready/done + ThreadPoolExecutor(%d);\npyoco = Engine(workers=%d, trace=False,"
          " store=False); us/task = pyoco s per task in microseconds; 1st = pyoco's untimed"
          " first run, which also compiles the flow;\n'trace+store' = Engine(trace=<file>,"
          " store=<folder>), what `pyoco run` does." % (WORKERS, WORKERS))

    # -- scaling and memory
    checks = []     # (target text, measured text, met)
    if "chain" in results and "chain-big" in results:
        n1, m1, _ = results["chain"]
        n2, m2, _ = results["chain-big"]
        scale = m2["pyoco"] / m1["pyoco"]
        print("\nchain scaling: pyoco %s/%s time = %.2fx (seq loop %.2fx, tpe %.2fx)"
              % (human(n2), human(n1), scale, m2["seq"] / m1["seq"], m2["tpe"] / m1["tpe"]))
        checks.append(("chain %s at most 11x the %s chain" % (human(n2), human(n1)),
                       "%.2fx" % scale, scale <= 11))
    if mem:
        print("\npeak traced memory of one run (tracemalloc), bytes per task (both include"
              " the benchmark's own start/end numbers, about 56 B/task):")
        for key in ("chain", "chain-big"):
            if key in mem:
                n, p, s = mem[key]
                print("  chain %-5s pyoco %7.0f B/task   seq loop %7.0f B/task"
                      % (human(n), p, s))
        if "chain" in mem and "chain-big" in mem:
            p1, p2 = mem["chain"][1], mem["chain-big"][1]
            checks.append(("chain %s no more memory per task than %s"
                           % (human(mem["chain-big"][0]), human(mem["chain"][0])),
                           "%.0f vs %.0f B/task (%.2fx)" % (p2, p1, p2 / p1), p2 <= p1))

    if not args.no_import:
        it = import_times(3 if args.quick else 7)
        print("\nimport pyoco (median of %d fresh interpreters, .pyc %s): %.2f ms inside the"
              " interpreter, %d modules added; process start %.1f ms bare, %.1f ms with the"
              " import (+%.1f ms)"
              % (3 if args.quick else 7, "present" if it["pyc"] else "MISSING",
                 it["inside"] * 1e3, it["modules"], it["bare"] * 1e3, it["with"] * 1e3,
                 (it["with"] - it["bare"]) * 1e3))

    # -- targets
    sleep_shape = sleep_parameters(args)

    def ratio(key, against):
        n, med, samples = results[key]
        return paired_ratio(samples["pyoco"], samples[against])
    if "chain" in results:
        r = ratio("chain", "seq")
        checks.append(("chain %s within 1.5x the sequential loop" % human(results["chain"][0]),
                       fmt_x(r), r <= 1.5))
    for key in ("fanout", "layered"):
        if key in results:
            r = ratio(key, "tpe")
            checks.append(("%s at most 0.6x graphlib+TPE" % key, fmt_x(r), r <= 0.6))
    if "data" in results:
        r = ratio("data", "seq")
        checks.append(("data chain %s within 2.5x the sequential loop"
                       % human(results["data"][0]), fmt_x(r), r <= 2.5))
    if "sleep" in results:
        s = results["sleep"][1]["pyoco"]
        # 0.42 s for 64 sleeps of 0.05 s on 8 workers: 5% over the ideal 8 waves x 0.05 s
        ideal = -(-sleep_shape[0] // WORKERS) * sleep_shape[1]
        limit = round(ideal * 1.05, 4)
        checks.append(("sleep-parallel at most %g s (ideal %g s)" % (limit, ideal),
                       "%.3f s" % s, s <= limit))
    print("\ntargets%s:" % (" (quick run: sizes differ from the targets', shown only)"
                            if args.quick else ""))
    for text, value, met in checks:
        print("  %-50s %-28s %s" % (text, value, "met" if met else "MISSED"))

    print("\ntotal time %.1f s" % (time.perf_counter() - t_begin))
    if failed:
        print("FAILED: %s" % ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
