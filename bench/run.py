#!/usr/bin/env python3
"""Benchmarks for pyoco against plain-Python ways of running the same DAG.

What is measured is what a user's run costs: the FIRST run of a freshly
built flow. Every repetition builds new task functions, new task objects and
a new Flow (outside the timing), so no plan compiled in an earlier
repetition can help; compiling and validating the flow happen inside
Engine.run and so inside the timing. The second run of the same flow in the
same process is kept as the "warm" column.

    python bench/run.py              # the default set (about 2.5 minutes on 2 cores)
    python bench/run.py --quick      # a smoke run: small sizes, 2 repetitions, targets not judged
    python bench/run.py --no-big     # without the 100,000-task workloads
    python bench/run.py --reps 11    # more repetitions of the 10k workloads
    python bench/run.py --only chain,sleep
    python bench/run.py --no-cold    # skip the cold-process `pyoco run` row
    python bench/run.py --no-import  # skip the import-time measurement

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
import compileall
import datetime
import gc
import graphlib
import importlib.util
import itertools
import json
import os
import platform
import random
import shutil
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
# Each task is its own closure, shared by every runner of one repetition: the
# same function objects run in the sequential loop, the thread pool, pyoco
# and dask. A task records a start and an end number from one counter; `ctr`
# is a one-item list holding the counter's __next__ so a run can start a
# fresh counter without rebuilding the functions.
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
#
# A Shape is a DAG (who runs after whom, who passes data to whom), built once.
# An Instance is one fresh copy of it to run: new task functions, new
# start/end records, and a new pyoco Flow of new task objects. Every
# repetition makes new Instances, so pyoco compiles every flow it times.
# ---------------------------------------------------------------------------

class Shape:
    """``preds[i]``: task numbers task i runs after. ``src[i]``: the task whose
    output is passed to task i as its ``data`` argument, or None. Task
    numbers are a topological order (every parent has a smaller number).
    """

    def __init__(self, key, label, preds, kind="plain", src=None, sleep=0.0):
        self.key, self.label, self.kind, self.sleep = key, label, kind, sleep
        self.n = len(preds)
        self.preds = preds
        self.src = src or [None] * self.n
        self.names = ["t%d" % i for i in range(self.n)]
        self.graph = {i: ps for i, ps in enumerate(preds)}      # graphlib: node -> predecessors

    def instance(self, with_dask=False):
        return Instance(self, with_dask)

    def expected_last(self):
        last = self.n - 1
        if self.kind == "data":
            return {"step": last, "total": last * (last + 1) // 2,
                    "tail": list(range(max(0, last - 3), last + 1))}
        return last


class Instance:
    """One fresh, runnable copy of a Shape (see above)."""

    def __init__(self, shape, with_dask=False):
        self.shape = shape
        n = self.n = shape.n
        self.key, self.label, self.kind = shape.key, shape.label, shape.kind
        self.preds, self.src, self.names, self.graph = shape.preds, shape.src, shape.names, shape.graph
        self.start = [None] * n
        self.end = [None] * n
        self.ctr = [None]
        preds, src, start, end, ctr = shape.preds, shape.src, self.start, self.end, self.ctr
        fns = self.fns = []
        for i in range(n):
            if self.kind == "plain":
                fn = make_plain(i, start, end, ctr)
            elif self.kind == "sleep":
                fn = make_plain(i, start, end, ctr) if not preds[i] or i == n - 1 \
                    else make_sleep(i, start, end, ctr, shape.sleep)
            elif self.kind == "data":
                fn = make_data_source(i, start, end, ctr) if src[i] is None \
                    else make_data_step(i, start, end, ctr)
            else:
                raise ValueError(self.kind)
            fn.__name__ = fn.__qualname__ = shape.names[i]
            fns.append(fn)
        self.flow = self._build_flow()
        self.dask_graph = self._build_dask_graph() if with_dask else None
        self.reset()

    def _build_flow(self):
        """Decorate every function and wire the flow: the user's part, not timed."""
        flow = pyoco.Flow(name=self.key)
        nodes = []
        names = self.names
        for i, fn in enumerate(self.fns):
            s = self.src[i]
            if s is None:
                node = pyoco.task(fn, name=names[i])
            else:
                node = pyoco.task(fn, name=names[i], inputs={"data": "$node.%s.output" % names[s]})
            nodes.append(node)
            ps = self.preds[i]
            flow.add(node, after=[nodes[p] for p in ps] if ps else ())
        return flow

    def _build_dask_graph(self):
        dsk = {}
        for i, name in enumerate(self.names):
            s = self.src[i]
            deps = [self.names[p] for p in self.preds[i] if p != s]
            if s is not None:
                deps.insert(0, self.names[s])
            dsk[name] = (_dask_call(self.fns[i], name, s is not None),) + tuple(deps)
        return dsk

    def reset(self):
        """Clear the recorded numbers and start a fresh counter (before every run)."""
        blank = [None] * self.n
        self.start[:] = blank
        self.end[:] = blank
        self.ctr[0] = itertools.count().__next__

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
            expected = self.shape.expected_last()
            last = results.get(names[-1], "<missing>")
            if last != expected:
                problems.append("last task returned %r, expected %r" % (last, expected))
            if self.kind != "data":
                wrong = [nm for i, nm in enumerate(names) if results.get(nm) != i]
                if wrong:
                    problems.append("%d tasks have a wrong result, e.g. %s"
                                    % (len(wrong), ", ".join(wrong[:5])))
        if problems:
            raise BenchError("%s on %s: %s" % (who, self.label, "; ".join(problems)))


def build_chain(n):
    return Shape("chain", "chain %s" % human(n), [[]] + [[i - 1] for i in range(1, n)])


def build_fanout(width):
    # 1 -> width -> 1
    preds = [[]] + [[0] for _ in range(width)] + [list(range(1, width + 1))]
    return Shape("fanout", "fan-out/join %s" % human(width), preds)


def build_layered(layers, per_layer, parents=3, seed=20261130):
    rng = random.Random(seed)
    preds = [[] for _ in range(per_layer)]
    for layer in range(1, layers):
        base = (layer - 1) * per_layer
        for _ in range(per_layer):
            preds.append(sorted(base + j for j in rng.sample(range(per_layer), parents)))
    return Shape("layered", "layered %dx%d" % (layers, per_layer), preds)


def build_sleep(width, seconds):
    preds = [[]] + [[0] for _ in range(width)] + [list(range(1, width + 1))]
    return Shape("sleep", "sleep %dx%gs" % (width, seconds), preds, kind="sleep", sleep=seconds)


def build_data_chain(n):
    preds = [[]] + [[i - 1] for i in range(1, n)]
    src = [None] + list(range(n - 1))
    return Shape("data", "data chain %s" % human(n), preds, kind="data", src=src)


def human(n):
    if n >= 1000 and n % 1000 == 0:
        return "%dk" % (n // 1000)
    return str(n)


# ---------------------------------------------------------------------------
# Runners: each takes an Instance and returns the results dict (name -> output)
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


class PyocoTraceStore:
    """pyoco with what `pyoco run` turns on: the trace (cute, written to a file)
    and a run store. Each call gets a new trace file and a new, empty store
    folder; both are deleted after the run, outside the timing (see cleanup)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.count = itertools.count()
        self.last = None

    def __call__(self, w):
        k = next(self.count)
        trace_path = os.path.join(self.tmp, "trace-%d.log" % k)
        store = os.path.join(self.tmp, "store-%d" % k)
        self.last = (trace_path, store)
        with open(trace_path, "w", encoding="utf-8") as trace:
            run = pyoco.Engine(workers=WORKERS, trace=trace, cute=True, store=store).run(w.flow)
        if run.status != pyoco.RunState.COMPLETED:
            raise BenchError("pyoco run ended %s" % run.status)
        return run.results

    def check(self, w):
        """After validate(): the trace and the record must be there (not timed)."""
        trace_path, store = self.last
        with open(trace_path, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        if lines < 2 * w.n:
            raise BenchError("trace+store on %s: %d trace lines for %d tasks" % (w.label, lines, w.n))
        runs = os.listdir(os.path.join(store, "runs"))
        if len(runs) != 1:
            raise BenchError("trace+store on %s: %d runs in a fresh store" % (w.label, len(runs)))
        with open(os.path.join(store, "runs", runs[0], "run.json"), encoding="utf-8") as f:
            status = json.load(f)["status"]
        if status != pyoco.RunState.COMPLETED:
            raise BenchError("trace+store on %s: the record says %s" % (w.label, status))

    def cleanup(self):
        trace_path, store = self.last
        os.unlink(trace_path)
        shutil.rmtree(store)


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
        values = get(w.dask_graph, w.names, num_workers=WORKERS)    # graph built untimed
        return dict(zip(w.names, values))
    return run_dask


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def timed(fn, w, who, after=None):
    w.reset()
    gc.collect()                # start each run from a collected heap; the GC stays on
    t0 = time.perf_counter()
    results = fn(w)
    elapsed = time.perf_counter() - t0
    w.validate(who, results)
    if after is not None:
        after(w)
    return elapsed


def bench(shape, runners, reps, warmup, with_dask):
    """``reps`` repetitions; in each, the runners take turns on fresh instances.

    ``runners``: (key, fn, instance slot, after-check or None, cleanup or None),
    in the order they run. Each repetition builds one fresh Instance per slot
    (not timed), just before the first runner of that slot, and drops it after
    the last one, so only one copy of the graph is alive at a time. Slot "a"
    is shared by seq, tpe, pyoco and the warm pyoco run right after it; slot
    "b" is trace+store's own flow, so its first run compiles a plan too.
    (Building a task or a flow marks every compiled plan stale, so nothing is
    built between a first run and its warm run.)
    With ``warmup`` one extra repetition runs first and is not counted.
    Returns {runner: [seconds per rep]}.
    """
    samples = {r[0]: [] for r in runners}
    for rep in range(reps + (1 if warmup else 0)):
        slot, inst = None, None
        for key, fn, want, check, cleanup in runners:
            if want != slot:
                slot, inst = want, None
                gc.collect()
                inst = shape.instance(with_dask)
            t = timed(fn, inst, key, check)
            if cleanup is not None:
                cleanup()
            if rep >= (1 if warmup else 0):
                samples[key].append(t)
        del inst
    return samples


def sort_time(shape, reps):
    """Median seconds of graphlib's static_order alone: a part of every seq run."""
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        for _ in graphlib.TopologicalSorter(shape.graph).static_order():
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_ratio(a, b):
    """Median over repetitions of a[k] / b[k] (rep k of both ran back to back)."""
    return statistics.median(x / y for x, y in zip(a, b))


def peak_per_task(shape, fn):
    """tracemalloc peak of the first run of ``fn`` on a fresh instance (so pyoco's
    includes compiling the plan), per task, in bytes."""
    w = shape.instance()
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


def clean_env():
    """The environment for child interpreters: bytecode caching on, no import profiling."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def precompile():
    """Write __pycache__/pyoco.*.pyc now, so no timed process compiles pyoco.py."""
    path = os.path.join(ROOT, "pyoco.py")
    compileall.compile_file(path, quiet=1)
    return os.path.exists(importlib.util.cache_from_source(path))


def import_times(reps):
    """Median seconds: `import pyoco` measured inside a fresh interpreter, a bare
    interpreter start, and the same start plus `import pyoco` (wall clock)."""
    setup = "import sys, time; sys.path.insert(0, %r); " % ROOT
    inner = setup + ("n = len(sys.modules); t = time.perf_counter(); import pyoco; "
                     "print(time.perf_counter() - t, len(sys.modules) - n)")
    bare = setup + "pass"
    cmd = [sys.executable, "-c"]
    env = clean_env()

    def call(code):
        t0 = time.perf_counter()
        out = subprocess.run(cmd + [code], cwd=ROOT, env=env, check=True,
                             stdout=subprocess.PIPE, universal_newlines=True).stdout
        return time.perf_counter() - t0, out

    call(inner)             # a .pyc is there (precompile); this warms the OS's file cache
    inside, starts, with_import, modules = [], [], [], 0
    for _ in range(reps):
        starts.append(call(bare)[0])
        wall, out = call(inner)
        with_import.append(wall)
        secs, modules = out.split()
        inside.append(float(secs))
    return {"inside": statistics.median(inside), "bare": statistics.median(starts),
            "with": statistics.median(with_import), "modules": int(modules)}


# The hand-written counterpart of examples/hello_pyoco.py: the same three
# tasks, each passing its result on, on a ThreadPoolExecutor(8).
PLAIN_HELLO = '''\
from concurrent.futures import ThreadPoolExecutor


def fetch_data():
    print("\\U0001f430 Fetching data...")
    return {"id": 1, "value": "carrot"}


def process_data(data):
    print(f"\\U0001f955 Processing: {data['value']}")
    return data["value"].upper()


def save_result(result):
    print(f"\\u2728 Saved: {result}")


if __name__ == "__main__":
    with ThreadPoolExecutor(max_workers=8) as pool:
        data = pool.submit(fetch_data).result()
        result = pool.submit(process_data, data).result()
        pool.submit(save_result, result).result()
'''

HELLO_LINES = ("Fetching data...", "Processing: carrot", "Saved: CARROT")


def cold_times(reps, tmp):
    """Whole-process wall time, median of ``reps``, interleaved: `python -m pyoco
    run examples/hello_pyoco.py` (trace to stderr, a run store in a fresh
    PYOCO_HOME each time) and `python plain_hello.py` (PLAIN_HELLO), both from
    the same empty working folder, with the same environment."""
    cwd = os.path.join(tmp, "cold-cwd")
    os.mkdir(cwd)
    plain = os.path.join(tmp, "plain_hello.py")
    with open(plain, "w", encoding="utf-8") as f:
        f.write(PLAIN_HELLO)
    example = os.path.join(ROOT, "examples", "hello_pyoco.py")
    env = clean_env()
    for key in [k for k in env if k.startswith("PYOCO_")]:
        del env[key]
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    homes = itertools.count()

    def call(cmd, home=None):
        e = env
        if home is not None:
            e = dict(env, PYOCO_HOME=home)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - t0
        out = proc.stdout.decode("utf-8", "replace")
        if proc.returncode != 0 or [ln for ln in HELLO_LINES if ln in out] != list(HELLO_LINES) \
                or not (out.index(HELLO_LINES[0]) < out.index(HELLO_LINES[1])
                        < out.index(HELLO_LINES[2])):
            raise BenchError("cold %s: exit %s, stdout %r, stderr %r"
                             % (" ".join(cmd[1:]), proc.returncode, out[-300:],
                                proc.stderr.decode("utf-8", "replace")[-500:]))
        return elapsed

    def run_pyoco_cli():
        home = os.path.join(tmp, "home-%d" % next(homes))
        t = call([sys.executable, "-m", "pyoco", "run", example], home)
        runs = os.listdir(os.path.join(home, "runs"))
        if len(runs) != 1:
            raise BenchError("cold pyoco run: %d records in a fresh PYOCO_HOME" % len(runs))
        with open(os.path.join(home, "runs", runs[0], "run.json"), encoding="utf-8") as f:
            status = json.load(f)["status"]
        if status != pyoco.RunState.COMPLETED:
            raise BenchError("cold pyoco run: the record says %s" % status)
        shutil.rmtree(home)
        return t

    def run_plain():
        return call([sys.executable, plain])

    def run_bare():
        return call([sys.executable, "-c", "print(%r)" % "\n".join(HELLO_LINES)])

    run_pyoco_cli()     # untimed: compiles the example's .pyc, warms the OS's file cache
    run_plain()
    samples = {"pyoco": [], "plain": [], "bare": []}
    for _ in range(reps):
        samples["bare"].append(run_bare())
        samples["plain"].append(run_plain())
        samples["pyoco"].append(run_pyoco_cli())
    return samples


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def make_cached_step(i):
    def fn(ctx, data):
        return data + 1
    fn.__name__ = "c%d" % i
    return fn


def cache_times(n, reps, tmp):
    """A chain of n cache=True tasks, each given its upstream's output, in a run
    store: (first-run seconds, fully reused second-run seconds) per repetition.

    Each repetition uses a fresh store: the first run finds no earlier run and
    runs every task (and records its fingerprint and output); the second run
    of the same flow reuses every task. Both runs are checked.
    """
    first, second = [], []
    for k in range(reps):
        tasks = [pyoco.task(cache=True, name="c%d" % i)(make_cached_step(i)) for i in range(n)]
        tasks[0].task.inputs = {"data": 0}
        for i in range(1, n):
            tasks[i].task.inputs = {"data": "$node.c%d.output" % (i - 1)}
        flow = pyoco.Flow(name="cached-chain")
        flow >> tasks[0]
        for i in range(1, n):
            flow.add(tasks[i], after=[tasks[i - 1]])
        store = os.path.join(tmp, "cache-store-%d" % k)
        engine = pyoco.Engine(workers=WORKERS, trace=False, store=store)
        runs = []
        for times in (first, second):
            gc.collect()
            t0 = time.perf_counter()
            runs.append(engine.run(flow))
            times.append(time.perf_counter() - t0)
        ran, again = runs
        if ran.results["c%d" % (n - 1)] != n or again.results["c%d" % (n - 1)] != n:
            raise BenchError("cached chain: wrong last output")
        reused = [t.reused_from for t in again.tasks.values()]
        if any(t.reused_from for t in ran.tasks.values()) or reused != [ran.run_id] * n:
            raise BenchError("cached chain: the first run must run every task and the"
                             " second reuse every one (%d of %d reused)"
                             % (sum(r == ran.run_id for r in reused), n))
        shutil.rmtree(store)
    return first, second


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
    """The workloads to run: (key, builder, repetitions, warm-up repetition)."""
    sleep_shape = sleep_parameters(args)
    r = args.reps
    if args.quick:
        return [
            ("chain", lambda: build_chain(500), r, True),
            ("fanout", lambda: build_fanout(500), r, True),
            ("layered", lambda: build_layered(10, 50), r, True),
            ("data", lambda: build_data_chain(200), r, True),
            ("sleep", lambda: build_sleep(*sleep_shape), r, False),
            ("chain-big", lambda: build_chain(5000), r, False),
            ("fanout-big", lambda: build_fanout(5000), r, False),
        ]
    return [
        ("chain", lambda: build_chain(10000), r, True),
        ("fanout", lambda: build_fanout(10000), r, True),
        ("layered", lambda: build_layered(100, 100), r, True),
        ("data", lambda: build_data_chain(1000), 3 * r, True),
        ("sleep", lambda: build_sleep(*sleep_shape), min(3, r), False),
        ("chain-big", lambda: build_chain(100000), min(3, r), False),
        ("fanout-big", lambda: build_fanout(100000), min(3, r), False),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark pyoco's first run of a fresh flow against plain-Python DAG runners.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small sizes, 2 repetitions, targets shown but not judged")
    parser.add_argument("--big", action=argparse.BooleanOptionalAction, default=True,
                        help="run the 100,000-task chain and fan-out/join (the default);"
                             " --no-big skips them, and with them the 10k-vs-100k checks")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions of the 10k workloads (default 7; 2 with --quick);"
                             " the 1k data chain gets 3x, sleep and the 100k ones at most 3")
    parser.add_argument("--cold-reps", type=int, default=None,
                        help="repetitions of the cold-process row (default 11; 3 with --quick)")
    parser.add_argument("--only", default=None,
                        help="comma-separated workloads: chain, fanout, layered, data, sleep,"
                             " chain-big, fanout-big")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-process row")
    parser.add_argument("--no-cache", action="store_true",
                        help="skip the cached-chain rows (first run and fully reused rerun)")
    parser.add_argument("--no-import", action="store_true", help="skip the import-time check")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 7
    if args.cold_reps is None:
        args.cold_reps = 3 if args.quick else 11
    if args.reps < 1 or args.cold_reps < 1:
        parser.error("--reps and --cold-reps must be at least 1")
    only = set(args.only.split(",")) if args.only else None
    work = plan(args)
    keys = [item[0] for item in work] + ["cache"]
    if only and only - set(keys):
        parser.error("--only: unknown workload %s; the workloads are %s"
                     % (", ".join(sorted(only - set(keys))), ", ".join(keys)))
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
    print("runners: seq, tpe, pyoco, pyoco trace+store%s" % (", dask" if dask_get else ""))
    sys.stdout.flush()

    failed = []
    rows, results = [], {}
    mem = {}
    checks = []     # (target text, measured text, met)
    with tempfile.TemporaryDirectory(prefix="pyoco-bench-") as tmp:
        ts_runner = PyocoTraceStore(tmp)
        runners = [("seq", run_seq, "a", None, None),
                   ("tpe", run_tpe, "a", None, None),
                   ("pyoco", run_pyoco, "a", None, None),
                   ("pyoco-warm", run_pyoco, "a", None, None),
                   ("ts", ts_runner, "b", ts_runner.check, ts_runner.cleanup),
                   ("ts-warm", ts_runner, "b", ts_runner.check, ts_runner.cleanup)]
        if dask_get is not None:
            runners.insert(4, ("dask", dask_runner(dask_get), "a", None, None))
        for key, builder, reps, warmup in work:
            if only and key not in only:
                continue
            t0 = time.perf_counter()
            shape = builder()
            try:
                samples = bench(shape, runners, reps, warmup, dask_get is not None)
                if key in ("chain", "chain-big"):
                    mem[key] = (shape.n, peak_per_task(shape, run_pyoco),
                                peak_per_task(shape, run_seq))
            except Exception as exc:
                kind = "VALIDATION FAILED" if isinstance(exc, BenchError) else "ERROR"
                print("\n!!! %s: %s: %s: %s\n" % (kind, shape.label, type(exc).__name__, exc),
                      file=sys.stderr)
                failed.append(shape.label)
                continue
            med = {k: statistics.median(v) for k, v in samples.items()}
            results[key] = (shape.n, med, samples)
            sort_s = sort_time(shape, min(reps, 5))

            def row_for(label, who, warm_who, base=True):
                t = samples[who]
                row = [label, shape.n, reps,
                       fmt_s(med["seq"]) if base else "", fmt_s(sort_s) if base else "",
                       fmt_s(med["tpe"]) if base else "", fmt_s(med[who]),
                       "%s..%s" % (fmt_s(min(t)), fmt_s(max(t))),
                       fmt_x(paired_ratio(t, samples["seq"])),
                       fmt_x(paired_ratio(t, samples["tpe"])),
                       "%.2f" % (med[who] / shape.n * 1e6),
                       "" if base else fmt_x(paired_ratio(t, samples["pyoco"])),
                       fmt_s(med[warm_who]),
                       fmt_x(paired_ratio(samples[warm_who], samples["seq"]))]
                if dask_get is not None:
                    row += [fmt_s(med["dask"]) if base else "",
                            fmt_x(paired_ratio(t, samples["dask"]))]
                return row
            rows.append(row_for(shape.label, "pyoco", "pyoco-warm"))
            rows.append(row_for("  pyoco trace+store", "ts", "ts-warm", base=False))
            print("  done: %-22s measured in %.1f s" % (shape.label, time.perf_counter() - t0))
            sys.stdout.flush()
            del shape
            gc.collect()

        cached = None
        if not args.no_cache and (not only or "cache" in only):
            cache_n = 1000 if args.quick else 10000
            try:
                cached = (cache_n, cache_times(cache_n, min(3, args.reps), tmp))
            except Exception as exc:
                kind = "VALIDATION FAILED" if isinstance(exc, BenchError) else "ERROR"
                print("\n!!! %s: cached chain: %s: %s\n" % (kind, type(exc).__name__, exc),
                      file=sys.stderr)
                failed.append("cached chain")
        pyc = precompile()
        cold = None
        if not args.no_cold:
            try:
                cold = cold_times(args.cold_reps, tmp)
            except Exception as exc:
                kind = "VALIDATION FAILED" if isinstance(exc, BenchError) else "ERROR"
                print("\n!!! %s: cold process: %s: %s\n" % (kind, type(exc).__name__, exc),
                      file=sys.stderr)
                failed.append("cold process")
        it = None
        if not args.no_import:
            it = import_times(3 if args.quick else 7)

    print()
    header = ["workload", "tasks", "reps", "seq s", "(sort s)", "tpe s", "1st run s",
              "1st min..max", "1st/seq", "1st/tpe", "us/task", "/bare", "warm s", "warm/seq"]
    if dask_get is not None:
        header += ["dask s", "1st/dask"]
    print_table(header, rows)
    print("\nseconds are medians; ratios are medians of per-repetition ratios (the runners"
          " took turns, so rep k of each ran back to back).\n"
          "1st run = the first run of a flow built fresh for that repetition (compiling it is"
          " timed); warm = the same flow run again right after.\n"
          "seq = graphlib static_order then a plain loop; (sort s) = the static_order part of"
          " it alone; tpe = graphlib get_ready/done + ThreadPoolExecutor(%d);\n"
          "pyoco = Engine(workers=%d, trace=False, store=False); 'pyoco trace+store' ="
          " Engine(trace=<file>, cute=True, store=<new folder>) on its own fresh flow;\n"
          "/bare = trace+store first run / bare pyoco first run; us/task = 1st run s per task"
          " in microseconds." % (WORKERS, WORKERS))

    if cached is not None:
        n, (first, second) = cached
        print("\ncached chain %s (cache=True tasks, each given its upstream's output; a run"
              " store; trace off), median of %d fresh stores:" % (human(n), len(first)))
        print_table(["run", "s", "min..max", "us/task"], [
            [label, fmt_s(statistics.median(t)), "%s..%s" % (fmt_s(min(t)), fmt_s(max(t))),
             "%.1f" % (statistics.median(t) / n * 1e6)]
            for label, t in (("first run (every task runs)", first),
                             ("second run (every task reused)", second))])

    if cold is not None:
        cm = {k: statistics.median(v) for k, v in cold.items()}
        cr = paired_ratio(cold["pyoco"], cold["plain"])
        print("\ncold process, whole wall time, median of %d interleaved (pyoco.py .pyc %s):"
              % (args.cold_reps, "present" if pyc else "MISSING"))
        print_table(["process", "s", "min..max", "/plain"], [
            ["python -c print(...) (interpreter start)", "%.4f" % cm["bare"],
             "%.4f..%.4f" % (min(cold["bare"]), max(cold["bare"])),
             fmt_x(paired_ratio(cold["bare"], cold["plain"]))],
            ["python plain_hello.py (ThreadPoolExecutor)", "%.4f" % cm["plain"],
             "%.4f..%.4f" % (min(cold["plain"]), max(cold["plain"])), "1.00x"],
            ["python -m pyoco run examples/hello_pyoco.py", "%.4f" % cm["pyoco"],
             "%.4f..%.4f" % (min(cold["pyoco"]), max(cold["pyoco"])), fmt_x(cr)],
        ])
        print("(pyoco run - plain script: %+.1f ms)" % ((cm["pyoco"] - cm["plain"]) * 1e3))

    # -- scaling and memory
    if "chain" in results and "chain-big" in results:
        n1, m1, _ = results["chain"]
        n2, m2, _ = results["chain-big"]
        scale = m2["pyoco"] / m1["pyoco"]
        print("\nchain scaling, first runs: pyoco %s/%s time = %.2fx (warm %.2fx, seq loop %.2fx,"
              " tpe %.2fx)" % (human(n2), human(n1), scale, m2["pyoco-warm"] / m1["pyoco-warm"],
                               m2["seq"] / m1["seq"], m2["tpe"] / m1["tpe"]))
        checks.append(("chain %s first run at most 11x chain %s" % (human(n2), human(n1)),
                       "%.2fx" % scale, scale <= 11))
    if mem:
        print("\npeak traced memory of a first run (tracemalloc, fresh flow, so pyoco's includes"
              " its plan), bytes per task\n(both include the benchmark's own start/end numbers,"
              " about 56 B/task):")
        for key in ("chain", "chain-big"):
            if key in mem:
                n, p, s = mem[key]
                print("  chain %-5s pyoco %7.0f B/task   seq loop %7.0f B/task" % (human(n), p, s))
        if "chain" in mem and "chain-big" in mem:
            p1, p2 = mem["chain"][1], mem["chain-big"][1]
            checks.append(("chain %s no more memory per task than %s"
                           % (human(mem["chain-big"][0]), human(mem["chain"][0])),
                           "%.0f vs %.0f B/task (%.2fx)" % (p2, p1, p2 / p1), p2 <= p1))

    if it is not None:
        print("\nimport pyoco (median of %d fresh interpreters, .pyc %s): %.2f ms inside the"
              " interpreter, %d modules added; process start %.1f ms bare, %.1f ms with the"
              " import (+%.1f ms)"
              % (3 if args.quick else 7, "present" if pyc else "MISSING",
                 it["inside"] * 1e3, it["modules"], it["bare"] * 1e3, it["with"] * 1e3,
                 (it["with"] - it["bare"]) * 1e3))

    # -- targets
    sleep_shape = sleep_parameters(args)

    def ratio(key, who, against):
        return paired_ratio(results[key][2][who], results[key][2][against])
    if "chain" in results:
        r = ratio("chain", "pyoco", "seq")
        checks.append(("chain %s first run at most 1.5x sequential loop"
                       % human(results["chain"][0]), fmt_x(r), r <= 1.5))
    for key, limit in (("fanout", 0.4), ("layered", 0.6)):
        if key in results:
            r = ratio(key, "pyoco", "tpe")
            checks.append(("%s first run at most %gx graphlib+TPE" % (key, limit), fmt_x(r),
                           r <= limit))
    if "data" in results:
        r = ratio("data", "pyoco", "seq")
        checks.append(("data chain %s first run at most 2.5x sequential loop"
                       % human(results["data"][0]), fmt_x(r), r <= 2.5))
    if "sleep" in results:
        s = results["sleep"][1]["pyoco"]
        # 0.42 s for 64 sleeps of 0.05 s on 8 workers: 5% over the ideal 8 waves x 0.05 s
        ideal = -(-sleep_shape[0] // WORKERS) * sleep_shape[1]
        limit = round(ideal * 1.05, 4)
        checks.append(("sleep %dx%gs first run at most %g s (ideal %g s)"
                       % (sleep_shape[0], sleep_shape[1], limit, ideal), "%.3f s" % s, s <= limit))
    if it is not None:
        checks.append(("import pyoco under 3 ms (.pyc cached)", "%.2f ms" % (it["inside"] * 1e3),
                       it["inside"] < 0.003))
    for key in ("chain", "layered"):
        if key in results:
            r = ratio(key, "ts", "pyoco")
            checks.append(("%s trace(file)+store at most 2x bare engine" % key, fmt_x(r),
                           r <= 2))
    if cold is not None:
        checks.append(("`pyoco run` hello at most 1.1x cold plain TPE script", fmt_x(cr),
                       cr <= 1.1))
    print("\ntargets%s:" % (" (quick run: sizes differ from the targets', shown only, not judged)"
                            if args.quick else ""))
    for text, value, met in checks:
        verdict = "-" if args.quick else ("met" if met else "MISSED")
        print("  %-58s %-28s %s" % (text, value, verdict))

    print("\ntotal time %.1f s" % (time.perf_counter() - t_begin))
    if failed:
        print("FAILED: %s" % ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
