"""Tests for pyoco, written against SPEC.md and grouped under the sections of
pyoco.py, in its order: import cost; states and events; console lines; output
capture; the model (tasks, expressions, flows); compile; run state;
scheduling; calling a task on each executor; signals; the observers (trace,
run store, webhooks); the engine (resume); the read side (metrics, the HTTP
server); plugins; the CLI (with the tutorial's and the README's examples);
the pyoco.core.* aliases; the browser page. One harness at the top serves
them all.

Real parts, not mocks: subprocesses of the CLI, real signals, the real
server on 127.0.0.1 port 0, real webhook receivers, promtool and a real
Prometheus, headless Chromium, pip-installed plugins and a Dask cluster (each
skipped only when its program or package is missing). Tests synchronise on
Events, Barriers, observed events, files and marker lines; a ``time.sleep``
inside a task only ever stands for work, and a time bound is a generous hang
guard or, where the bound is the point, measured from the event it follows.
Run with ``python -m pytest -q test_pyoco.py``.
"""

import base64
import collections
import contextlib
import hashlib
import hmac
import http.client
import inspect
import io
import json
import logging
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

import pyoco
from pyoco import Engine, Flow, FlowError, RunCancelled, RunFailed, RunStore, Skip, Task, task

HERE = Path(__file__).resolve().parent      # pyoco.py, examples/ and docs/ are here
WAIT = 10.0     # the longest a test waits for what must come: an Event, a line, a file, an answer
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")      # every time in a record
RUN_KEYS = {"run_id", "flow", "status", "params", "started_at", "ended_at", "duration_ms",
            "reason", "resumed_from", "scheduled_for", "executor", "tasks", "events"}


# ---------------------------------------------------------------------------
# Harness: settings, engines, subprocesses, lines, servers, receivers
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def no_pyoco_env():
    """No PYOCO_* settings inside the block (for module-scoped fixtures, which
    cannot use the per-test monkeypatch)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("PYOCO_"):
                mp.delenv(key)
        yield mp


@pytest.fixture(autouse=True)
def no_pyoco_settings():
    """Every test starts from no PYOCO_* settings (no run store, no webhooks,
    the cute default) and leaves no webhook delivery behind."""
    with no_pyoco_env():
        yield
    pyoco.drain_webhooks()


def quiet(**options):
    """An engine that prints nothing."""
    return Engine(trace=False, **options)


def run_quiet(flow, params=None, **options):
    return quiet().run(flow, params, **options)


@pytest.fixture(params=["thread", "pool"])
def make_engine(request):
    """Makes quiet engines on the default thread runner, or (``pool``) on a
    ``concurrent.futures`` executor instance, which pyoco drives differently."""
    pools = []

    def make(**options):
        options.setdefault("trace", False)
        if request.param == "pool":
            from concurrent.futures import ThreadPoolExecutor
            # more threads than workers: the engine, not the pool, must bound them
            pool = ThreadPoolExecutor(max(16, options.get("workers", 8)),
                                      thread_name_prefix="test-pool")
            pools.append(pool)
            options["executor"] = pool
        return Engine(**options)

    yield make
    for pool in pools:
        pool.shutdown(wait=True)


def write(path, source):
    """Write ``source`` (dedented) to ``path``: a flow file, a script, a module."""
    path = Path(path)
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def hello_flow(name, says):
    """Source of a flow file ``name`` whose one task, hello, prints ``says`` and returns 1."""
    return ("from pyoco import task, Flow\n\n@task\ndef hello(ctx):\n    print(%r)\n"
            "    return 1\n\nflow = Flow(name=%r)\nflow >> hello\n" % (says, name))


def child_env(*paths, plain=False, **settings):
    """The environment of a subprocess: pyoco (and ``paths``) importable, UTF-8
    pipes, no bytecode written, none of the caller's PYOCO_* or Python path
    settings; ``plain``: the plain trace on unbuffered pipes; then ``settings``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYOCO_") and k not in ("PYTHONPATH", "PYTHONHOME",
                                                        "PYTHONSTARTUP", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in paths] + [str(HERE)])
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if plain:
        env.update(PYOCO_CUTE="0", PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


def run_python(cwd, *args, env=None, timeout=6 * WAIT, python=None, **settings):
    """``python ARGS`` in ``cwd`` to its end (killed after ``timeout`` s): the
    CompletedProcess, as text. ``python``: another interpreter than this one;
    ``env`` defaults to ``child_env(**settings)``."""
    return subprocess.run([python or sys.executable] + [str(a) for a in args], cwd=str(cwd),
                          env=env or child_env(**settings), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, encoding="utf-8", timeout=timeout)


def cli(cwd, *args, main_py=False, python_flags=(), **options):
    """The command line, ``python -m pyoco ARGS`` (or ``python pyoco.py ARGS``),
    in ``cwd``; ``options`` as run_python takes them."""
    head = [HERE / "pyoco.py"] if main_py else ["-m", "pyoco"]
    return run_python(cwd, *python_flags, *head, *args, **options)


def explain(proc):
    return "exit %s\n--- stdout\n%s\n--- stderr\n%s" % (proc.returncode, proc.stdout,
                                                        proc.stderr)


def ok(proc, code=0):
    """``proc`` after checking its exit code (showing both streams when it is wrong)."""
    assert proc.returncode == code, explain(proc)
    return proc


def usage_error(proc, *words):
    """``proc`` after checking it is a usage error: exit 2, each of ``words`` on
    stderr, no traceback."""
    assert proc.returncode == 2, explain(proc)
    for word in words:
        assert word in proc.stderr, explain(proc)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def no_traceback(result):
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


def run_id_of(trace):
    """The run id from a trace (its start line names it)."""
    match = re.search(r"run_id=(\S+)", trace)
    assert match, "no run_id in the trace:\n%s" % trace
    return match.group(1)


def task_states(record):
    """{task name: state} of a run record."""
    return {name: t["state"] for name, t in record["tasks"].items()}


def wait_until(probe, timeout=WAIT, what="condition"):
    """Call ``probe`` until it returns something truthy, and return that; fail
    after ``timeout`` s. For files and HTTP answers, where nothing can be waited on."""
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s (last: %r)"
                                 % (timeout, what, last))
        time.sleep(0.05)


class Events:
    """An observer keeping every event with the time.monotonic() it came at, so
    that a test can wait for one and time what follows from it."""

    def __init__(self):
        self.seen = []              # (time.monotonic(), Event)
        self.cond = threading.Condition()

    def __call__(self, run, event):
        with self.cond:
            self.seen.append((time.monotonic(), event))
            self.cond.notify_all()

    def _first(self, kind, task):
        for at, event in self.seen:
            if event[1] == kind and (task is None or event[2] == task):
                return at
        return None

    def wait_for(self, kind, task=None, timeout=WAIT):
        """When the first ``kind`` event (of ``task``, if given) came; fails at the deadline."""
        with self.cond:
            at = self.cond.wait_for(lambda: self._first(kind, task), timeout)
        assert at is not None, "no %s event%s within %.1f s" % (
            kind, "" if task is None else " of %r" % task, timeout)
        return at

    def since(self, kind, task=None):
        """Seconds from the first ``kind`` event (of ``task``) until now."""
        return time.monotonic() - self.wait_for(kind, task)


def epoch(stamp):
    """A record's ISO UTC time (``2026-01-02T03:04:05.678Z``) as time.time() seconds."""
    import datetime
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


class Proc:
    """A running ``python ARGS`` whose output lines are read on threads as they
    come, so that a test can wait for a marker line with a deadline."""

    def __init__(self, cwd, args, env, read=("stdout", "stderr"), python=None):
        self.proc = subprocess.Popen(
            [python or sys.executable] + [str(a) for a in args], cwd=str(cwd), env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            encoding="utf-8", errors="replace")
        self.lines = {"stdout": [], "stderr": []}
        self.seen = {"stdout": 0, "stderr": 0}     # lines up to the last one matched
        self.ended = set()
        self.cond = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                        for name in read]
        for reader in self.readers:
            reader.start()

    def _read(self, name):
        for line in getattr(self.proc, name):
            with self.cond:
                self.lines[name].append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.ended.add(name)
            self.cond.notify_all()

    def text(self, name="stdout"):
        with self.cond:
            return "\n".join(self.lines[name])

    def wait_for(self, pattern, stream="stdout", timeout=WAIT):
        """The match of ``pattern`` in the first line of ``stream`` after the
        line the last wait matched; fails when the stream ends or at the deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                lines = self.lines[stream]
                for i in range(self.seen[stream], len(lines)):
                    match = regex.search(lines[i])
                    if match:
                        self.seen[stream] = i + 1
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or stream in self.ended:
                    pytest.fail("no line matching %r on %s\n--- stdout:\n%s\n--- stderr:\n%s"
                                % (pattern, stream, "\n".join(self.lines["stdout"]),
                                   "\n".join(self.lines["stderr"])))
                self.cond.wait(left)

    def wait(self, timeout=WAIT):
        """The exit code, once every line is read; fails when the process is
        still running at the deadline."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail("still running after %.1f s\n--- stderr:\n%s"
                        % (timeout, self.text("stderr")))
        for reader in self.readers:
            reader.join(WAIT)
        return rc

    def stop(self):
        """SIGTERM (then SIGKILL after WAIT s) if still running; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        rc = self.proc.wait()
        for reader in self.readers:
            reader.join(WAIT)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        return rc


@pytest.fixture
def spawn():
    """Start ``python -m pyoco ARGS`` (``module=None``: ``python ARGS``) as a
    Proc, under ``python`` (another interpreter) if given; any still running at
    the end of the test is stopped."""
    started = []

    def start(cwd, *args, env=None, module="pyoco", read=("stdout", "stderr"), python=None,
              **settings):
        head = ["-m", module] if module else []
        proc = Proc(cwd, head + list(args), env or child_env(**settings), read=read,
                    python=python)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


# ---------------------------------------------------------------------------
# Harness: servers, metrics samples, webhook receivers
# ---------------------------------------------------------------------------

SRV_WEBHOOK_KEYS = {"event", "run_id", "flow", "status", "started_at", "ended_at",
                    "duration_ms", "tasks"}
SRV_WEIRD = 'we"ird\\\nname'       # a quote, a backslash and a newline


_SRV_CLOSING = []       # threads closing servers


def srv_close_later(server):
    """Close a Server on a thread: close() waits up to 0.5 s for serve_forever's
    poll, which would cost every test half a second. Joined at the module's end."""
    closing = threading.Thread(target=server.close, daemon=True)
    closing.start()
    _SRV_CLOSING.append(closing)


@pytest.fixture(scope="module", autouse=True)
def srv_servers_closed_at_the_end():
    yield
    while _SRV_CLOSING:
        _SRV_CLOSING.pop().join(10)


def srv_request(base, method, path, body=None, headers=None, timeout=WAIT):
    """One HTTP request; returns (status, headers with lower-case keys, body bytes)."""
    url = urlsplit(base)
    headers = dict(headers or {})
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode("utf-8")
        headers.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def srv_json(base, method, path, body=None, headers=None):
    """(status, decoded JSON) of a request whose answer must be JSON."""
    status, head, data = srv_request(base, method, path, body, headers)
    assert head["content-type"].startswith("application/json"), (status, head, data)
    return status, json.loads(data)


_SRV_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_SRV_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def srv_unescape(value):
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def srv_parse_metrics(text):
    """Samples of a Prometheus text exposition as (name, labels dict, float)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SRV_SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        labels = {k: srv_unescape(v) for k, v in _SRV_LABEL.findall(m.group(2) or "")}
        samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def srv_value(samples, name, **labels):
    """The value of the one sample with exactly these labels, or None."""
    found = [v for n, l, v in samples if n == name and l == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def srv_metrics(base):
    status, head, data = srv_request(base, "GET", "/metrics")
    assert status == 200, (status, data)
    text = data.decode("utf-8")
    return head, text, srv_parse_metrics(text)


def srv_check_histogram(samples, name):
    """Each series: buckets cumulative, ascending, ending at +Inf == _count; a _sum."""
    series = {}
    for n, labels, value in samples:
        if n == name + "_bucket":
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            series.setdefault(key, []).append((labels["le"], value))
    assert series, "no %s series" % name
    for key, buckets in series.items():
        bounds = [float(le) for le, _ in buckets]
        counts = [v for _, v in buckets]
        assert buckets[-1][0] == "+Inf", (key, buckets[-1])
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), (key, bounds)
        assert counts == sorted(counts), "buckets of %s %s are not cumulative" % (name, key)
        count = srv_value(samples, name + "_count", **dict(key))
        assert count == counts[-1], (key, count, counts[-1])
        assert srv_value(samples, name + "_sum", **dict(key)) is not None, key
    return series


def srv_waiting_task(name, started, seen):
    """A task that notes its run id in ``seen``, sets ``started`` and waits for a cancel."""
    def wait(ctx):
        seen["run_id"] = ctx.run_id
        started.set()
        ctx.cancelled.wait(WAIT)
    return task(name=name)(wait)


def srv_run_cancelled(engine, flow_name="cancels"):
    """A run that is CANCELLED through engine.cancel while its task is running."""
    started = threading.Event()
    seen = {}
    flow = Flow(flow_name)
    flow >> srv_waiting_task("waiter", started, seen)

    def cancel():
        if started.wait(WAIT):
            engine.cancel(seen["run_id"])
    canceller = threading.Thread(target=cancel)
    canceller.start()
    run = engine.run(flow, raise_on_failure=False)
    canceller.join(WAIT)
    assert run.status == "CANCELLED"
    return run


def srv_make_outcomes(store):
    """A store with runs of every final status; returns {label: Run}.

    The completed flow has the awkward name SRV_WEIRD and a task that needs
    one retry; the completed flow ``twice`` runs two times.
    """
    engine = quiet(store=str(store))

    @task
    def ok(ctx):
        time.sleep(0.002)           # work
        return 1

    @task(retries=1, retry_delay=0.01)
    def flaky(ctx):
        if ctx.attempt == 1:
            raise ValueError("first try fails")
        return 2

    @task
    def bad(ctx):
        time.sleep(0.002)           # work
        raise ValueError("boom")

    @task
    def step(ctx):
        time.sleep(0.002)           # work
        return 3

    weird = Flow(SRV_WEIRD)
    weird >> ok >> flaky
    fails = Flow("fails")
    fails >> bad
    twice = Flow("twice")
    twice >> step
    runs = {"weird": engine.run(weird),
            "failed": engine.run(fails, raise_on_failure=False),
            "twice-1": engine.run(twice),
            "twice-2": engine.run(twice),
            "cancelled": srv_run_cancelled(engine)}
    assert runs["failed"].status == "FAILED"
    return runs


@pytest.fixture
def srv_serve():
    """Start in-process Servers (port 0); they are closed at the end of the test."""
    servers = []

    def start(store, **options):
        server = pyoco.Server(str(store), port=0, **options).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        srv_close_later(server)


@pytest.fixture
def srv_cli_serve(spawn, tmp_path):
    """Start ``pyoco serve --port 0 --store DIR [OPTION ...] FLOW.py ...``
    subprocesses (Procs); ``url``, ``port`` and ``first_line`` come from its first line."""
    def start(store, *flow_files, options=(), **env):
        server = spawn(tmp_path, "serve", "--port", "0", "--store", store, *options,
                       *flow_files, **env)
        found = server.wait_for(r"http://(?:127\.0\.0\.1|\[[0-9a-f:]+\]):(\d+)")
        server.first_line = server.lines["stdout"][0]
        server.url, server.port = found.group(0), int(found.group(1))
        return server
    return start


@pytest.fixture(scope="module")
def srv_outcomes(tmp_path_factory):
    """(server, runs) over a store with COMPLETED, FAILED and CANCELLED runs.

    Shared by the tests of this module, which only read it.
    """
    store = tmp_path_factory.mktemp("outcomes") / "store"
    with no_pyoco_env():
        runs = srv_make_outcomes(store)
        server = pyoco.Server(str(store), port=0).start()
    yield server, runs
    srv_close_later(server)


def srv_flow_file(folder, name="greet", body=None):
    """Write a flow file for subprocesses; by default one task that prints a line."""
    return write(Path(folder) / ("%s.py" % name), body or """\
        from pyoco import task, Flow

        @task
        def hello(ctx, who="world"):
            print("hello", who)
            return who

        flow = Flow("greet")
        flow >> hello
        """)


class SrvReceiver:
    """A webhook receiver on a local http.server thread, answering ``status``
    (with ``headers``) to a POST or a GET; ``on_post(body)``, when given, is
    called with each body before the answer goes out."""

    def __init__(self, status=200, headers=None, on_post=None):
        self.requests = []          # (path, headers with lower-case keys, raw body)
        self.times = []             # time.monotonic() of each request
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if on_post is not None:
                    on_post(body)
                with receiver.changed:
                    receiver.times.append(time.monotonic())
                    receiver.requests.append(
                        (self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.changed.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()

            do_GET = do_POST        # a followed redirect may arrive as a GET

            def log_message(self, format, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.host = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.url = self.host + "/hooks/s3cret-path"     # paths often carry secrets
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def wait_for(self, n, timeout=WAIT):
        with self.changed:
            self.changed.wait_for(lambda: len(self.requests) >= n, timeout)
            return list(self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class SrvHangingReceiver:
    """Accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = "http://127.0.0.1:%d/hook" % self.sock.getsockname()[1]
        self.conns = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()

    def accept(self):
        while not self.stopping.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self):
        self.stopping.set()
        self.thread.join(WAIT)
        self.sock.close()
        for conn in self.conns:
            conn.close()


class SrvTricklingReceiver:
    """Reads one request, then answers one byte every 0.25 s: never a timeout
    between two reads, yet a whole answer takes about 10 s."""

    ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.host = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.url = self.host + "/hook"
        self.asked = threading.Event()      # a whole request arrived
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn = self.sock.accept()[0]
        except OSError:
            return
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.asked.set()
            for byte in self.ANSWER:
                if self.stopping.wait(0.25):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self):
        self.stopping.set()
        self.sock.close()
        self.thread.join(WAIT)


@pytest.fixture
def srv_receiver():
    """Factory of webhook receivers; all are closed at the end of the test."""
    made = []

    def make(status=200, headers=None, on_post=None):
        receiver = SrvReceiver(status, headers, on_post)
        made.append(receiver)
        return receiver
    yield make
    for receiver in made:
        receiver.close()


def srv_webhook_events(store, run_id):
    record = pyoco.RunStore(str(store)).get(run_id)
    return [e for e in record["events"] if e["event"].startswith("webhook.")]


# ---------------------------------------------------------------------------
# Harness: run records, signal flows
# ---------------------------------------------------------------------------

STORE_TASK_KEYS = {"state", "attempts", "started_at", "ended_at", "duration_ms", "error",
                   "traceback", "reason", "artifacts", "reused_from"}
STORE_EVENT_KEYS = {"ts", "event", "task", "state"}
STORE_UNKNOWN_ID = "20990101-000000-deadbeef"


def store_files(root):
    """Every file under root, as paths relative to it (str, with /)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)).replace(os.sep, "/")
                  for p in root.rglob("*") if p.is_file())


# A flow whose first task prints "MARK <run id>" and then waits: for a cancel
# (the default, cooperative), or in time.sleep (-p mode=stubborn), or not at
# all (-p mode=quick, which prints no marker). It writes the marker with
# sys.stdout.write and a flush, so the test sees it at once.
STORE_SIGNAL_FLOW = """\
    import sys
    import time
    from pyoco import task, Flow

    @task
    def work(ctx):
        mode = ctx.params.get("mode", "cooperative")
        if mode == "quick":
            return "quick"
        sys.stdout.write("MARK %s\\n" % ctx.run_id)
        if mode == "stubborn":
            time.sleep(30)
            return "slept"
        stopped = ctx.cancelled.wait(30)
        return "stopped early" if stopped else "waited 30 s"

    @task
    def after(ctx, work):
        sys.stdout.write("AFTER RAN\\n")
        return work

    @task
    def last(ctx, after):
        return after

    flow = Flow(name="signals")
    flow >> work >> after >> last
"""


def store_stubborn_run(folder, spawn):
    """``pyoco run`` of the signal flow whose task ignores cancels, once that
    task runs: (its Proc, the run id)."""
    store_signal_flow(folder)
    proc = spawn(folder, "run", "signal_flow.py", "-p", "mode=stubborn", plain=True)
    return proc, proc.wait_for(r"^MARK (\S+)$").group(1)


def store_interrupted(proc, folder, run_id):
    """SIGINT to a running ``pyoco run`` in ``folder``: it exits 130 within 3 s;
    the run's record, CANCELLED."""
    sent = time.monotonic()
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130
    assert time.monotonic() - sent < 3.0
    record = RunStore(folder / ".pyoco").get(run_id)
    assert record["status"] == "CANCELLED"
    return record


def store_signal_flow(folder):
    return write(folder / "signal_flow.py", STORE_SIGNAL_FLOW)


# ===========================================================================
# Module state: what import pyoco costs
# ===========================================================================


# ---------------------------------------------------------------------------
# Import cost
# ---------------------------------------------------------------------------

IMPORT_PROBE = r'''
import sys, signal
before_out, before_err = sys.stdout, sys.stderr
int_handler, term_handler = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
heavy = ("argparse", "http.server", "urllib.request", "importlib.metadata",
         "concurrent.futures", "logging")
preloaded = [m for m in heavy if m in sys.modules]
import pyoco
report = {
    "preloaded": preloaded,
    "loaded": [m for m in heavy if m in sys.modules],
    "stdout_same": sys.stdout is before_out and sys.stderr is before_err,
    "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler
                      and int_handler is signal.default_int_handler,
    "sigterm_same": signal.getsignal(signal.SIGTERM) == term_handler,
}
print(repr(report))
'''


def test_import_pyoco_is_cheap_and_has_no_side_effects(tmp_path):
    # -S: this machine's site .pth files pre-import some of these modules
    proc = run_python(tmp_path, "-S", "-c", IMPORT_PROBE, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    import ast
    report = ast.literal_eval(proc.stdout)
    assert report["preloaded"] == []
    assert report["loaded"] == []
    assert report["stdout_same"]
    assert report["sigint_default"]
    assert report["sigterm_same"]
    assert list(tmp_path.iterdir()) == []           # no file created


def test_import_pyoco_takes_under_25_ms(tmp_path):
    # Time it like an installed copy: from a folder where its bytecode can be cached.
    shutil.copy(str(HERE / "pyoco.py"), str(tmp_path / "pyoco.py"))
    env = child_env(PYTHONPATH=str(tmp_path))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    code = ("import time; t = time.perf_counter(); import pyoco; "
            "print(time.perf_counter() - t)")
    timings = []
    for _ in range(4):
        out = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(tmp_path), env=env,
                             stdout=subprocess.PIPE, encoding="utf-8", timeout=30).stdout
        timings.append(float(out))
    assert min(timings[1:]) < 0.025, timings


# ===========================================================================
# States and events
# ===========================================================================


# ---------------------------------------------------------------------------
# Results, states and events
# ---------------------------------------------------------------------------


def assert_recent_utc(stamp):
    """``stamp`` (2026-11-29T05:10:11.123Z) is UTC and within a minute of now."""
    import calendar
    seconds = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    assert abs(seconds - time.time()) < 60, stamp


def _hello_flow(name="hello"):
    @task
    def fetch(ctx):
        return {"id": 1, "value": "carrot"}

    @task(name="shout")
    def process(ctx, data):
        return data["value"].upper()

    flow = Flow(name=name)
    flow >> fetch >> process
    process.task.inputs = {"data": "$node.fetch.output"}
    return flow


def test_run_returns_results_id_status_and_task_records(make_engine):
    run = make_engine(workers=8).run(_hello_flow(), params={"day": "2026-11-29"})
    assert run.status == "COMPLETED" == pyoco.RunState.COMPLETED
    assert run.results == {"fetch": {"id": 1, "value": "carrot"}, "shout": "CARROT"}
    assert isinstance(run.run_id, str) and run.run_id
    assert run.params == {"day": "2026-11-29"}
    record = run.tasks["shout"]
    assert record.state == "SUCCEEDED" == pyoco.TaskState.SUCCEEDED
    assert record.attempts == 1
    assert record.error is None
    assert record.duration is not None and record.duration >= 0
    assert list(run.tasks) == ["fetch", "shout"]
    assert "shout" in run.tasks and "nope" not in run.tasks
    with pytest.raises(KeyError):
        run.tasks["nope"]


def test_each_run_gets_a_new_run_id_unless_given(make_engine):
    flow = _hello_flow()
    ids = {make_engine().run(flow).run_id for _ in range(5)}
    assert len(ids) == 5
    assert make_engine().run(flow, run_id="my-id").run_id == "my-id"


def test_task_duration_measures_the_task(make_engine):
    @task
    def work(ctx):
        time.sleep(0.1)

    flow = Flow("duration")
    flow >> work
    duration = make_engine().run(flow).tasks["work"].duration
    assert 0.09 <= duration < WAIT


def test_events_record_every_transition_with_timestamps(make_engine):
    @task
    def ok(ctx):
        return 1

    @task(retries=1)
    def flaky(ctx):
        if ctx.attempt == 1:
            raise ValueError("first try")
        return 2

    @task(fail_policy="isolate")
    def boom(ctx):
        raise KeyError("k")

    @task
    def after_boom(ctx):
        return 3

    flow = Flow("events")
    flow >> ok >> flaky
    flow >> boom >> after_boom
    run = make_engine(workers=1).run(flow, raise_on_failure=False)   # one at a time: ordered stamps
    events = run.events
    assert all(ISO.match(e["ts"]) for e in events)
    assert_recent_utc(events[0]["ts"])
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    assert events[0]["event"] == "run.started" and events[0]["task"] is None
    assert events[0]["state"] == "RUNNING"
    assert events[-1] == dict(events[-1], event="run.failed", task=None, state="FAILED")
    for e in events:
        if e["task"] is None:
            assert e["event"].startswith("run.")
    by_task = {}
    for e in events:
        if e["task"] is not None:
            by_task.setdefault(e["task"], []).append(e["state"])
    assert by_task["ok"] == ["RUNNING", "SUCCEEDED"]
    assert by_task["flaky"] == ["RUNNING", "RUNNING", "SUCCEEDED"]   # started, retrying, done
    assert by_task["boom"] == ["RUNNING", "FAILED"]
    assert by_task["after_boom"] == ["SKIPPED"]
    for name, record in run.tasks.items():
        assert by_task[name][-1] == record.state
    failed = [e for e in events if e["event"] == "task.failed"]
    assert failed[0]["task"] == "boom" and "KeyError" in failed[0]["error"]


def test_observers_receive_event_records_naming_the_task(make_engine):
    seen = []

    @task(retries=1)
    def flaky(ctx):
        if ctx.attempt == 1:
            raise ValueError("first try")
        return [1, 2]

    @task
    def double(ctx, item):
        return item * 2

    @task
    def gate(ctx):
        ctx.skip("nothing new")

    @task
    def after_gate(ctx):
        return None

    flow = Flow("records")
    flow >> flaky >> double.map("$node.flaky.output")
    flow >> gate >> after_gate
    run = make_engine(observers=[lambda run, ev: seen.append(ev)]).run(flow)
    assert seen and all(isinstance(ev, pyoco.Event) for ev in seen)
    assert {ev.kind for ev in seen} <= set(pyoco.EVENT_KINDS)
    names = set(run.tasks)
    for ev in seen:
        assert isinstance(ev.ts, float) and abs(ev.ts - time.time()) < 60
        assert ev.data is None or isinstance(ev.data, dict)
        if ev.kind.startswith("run."):
            assert ev.task is None and ev.state in ("RUNNING", "COMPLETED")
        else:
            assert ev.task in names, ev         # the name, not a task number
    assert (seen[0].kind, seen[-1].kind) == ("run.started", "run.completed")
    assert seen[-1].state == run.status
    by_kind = collections.defaultdict(list)
    for ev in seen:
        by_kind[ev.kind].append(ev)
    [retry] = by_kind["task.retrying"]
    assert (retry.task, retry.state) == ("flaky", "RUNNING")
    assert (retry.data["attempt"], retry.data["of"]) == (2, 2)
    assert "first try" in retry.data["error"]
    skips = {ev.task: ev for ev in by_kind["task.skipped"]}
    assert skips["gate"].data["reason"] == "nothing new" and skips["gate"].state == "SKIPPED"
    assert {ev.task for ev in by_kind["task.succeeded"]} == {"flaky", "double", "double[0]",
                                                              "double[1]"}

    records = run.events
    assert [(r["event"], r["task"], r["state"]) for r in records] == [
        (ev.kind, ev.task, ev.state) for ev in seen]
    for record, ev in zip(records, seen):
        assert {"ts", "event", "task", "state"} <= set(record)
        assert ISO.match(record["ts"])
        assert record == dict(ev.data or {}, ts=record["ts"], event=ev.kind, task=ev.task,
                              state=ev.state)
    assert json.loads(json.dumps(records)) == records


def test_empty_flow_completes(make_engine):
    run = make_engine().run(Flow("empty"))
    assert run.status == "COMPLETED" and run.results == {}


# ===========================================================================
# Console lines, files and JSON
# ===========================================================================


# ---------------------------------------------------------------------------
# Whole lines, whoever writes
# ---------------------------------------------------------------------------

class _CharByCharStream(io.StringIO):
    """A stream that writes one character at a time, letting other threads in between."""

    def write(self, text):
        for ch in text:
            super().write(ch)
            time.sleep(0)
        return len(text)


@pytest.mark.parametrize("cute", [True, False], ids=["cute", "plain"])
def test_64_parallel_tasks_never_mix_trace_lines(cute):
    barrier = threading.Barrier(64, timeout=WAIT)

    def meet(ctx):
        barrier.wait()
        return None

    flow = Flow("many")
    for i in range(64):
        flow >> task(name="n%02d" % i)(meet)
    stream = _CharByCharStream()
    run = Engine(workers=64, trace=stream, cute=cute).run(flow)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 + 64 * 2
    if cute:
        pattern = re.compile(r"(🐇 pyoco > start flow=many run_id=\S+|🥕 done flow=many"
                             r"|🏃 start node=n\d\d|✅ done node=n\d\d \(\d+\.\d\d m?s\))")
        for line in lines:
            assert pattern.fullmatch(line), line
    else:
        _assert_plain(lines, run)


def map_flow(name, n, body, options="", items="items", work="work", arg="x", total=None,
             main=None):
    """Source of a flow file ``items >> work.map(...)`` (``>> total`` when its
    body is given): ``items`` returns range(n), ``work(ctx, arg)`` runs ``body``,
    ``total`` gets their outputs; ``main``: the Engine(...) arguments of its
    ``if __name__ == "__main__"`` block."""
    def indented(code):
        return textwrap.indent(textwrap.dedent(code).strip("\n"), "    ")

    parts = ["import sys, time", "from pyoco import Engine, Flow, task", "",
             "@task", "def %s(ctx):" % items, "    return list(range(%d))" % n, "",
             "@task" + options, "def %s(ctx, %s):" % (work, arg), indented(body), ""]
    chain = 'flow >> %s >> %s.map("$node.%s.output")' % (items, work, items)
    if total:
        parts += ["@task", "def total(ctx, %s):" % work, indented(total), ""]
        chain += " >> total"
    parts += ["flow = Flow(%r)" % name, chain]
    if main:
        parts += ["", 'if __name__ == "__main__":', "    Engine(%s).run(flow)" % main]
    return "\n".join(parts) + "\n"


HARVEST_FLOW = map_flow("harvest", 60, items="rows", work="harvest_row", arg="row", body="""
    print("\U0001f955 row %d gave %d carrots" % (row, row * 5))
    print("   washed row", row)
    print("   boxed row %d" % row, file=sys.stderr)
    sys.stdout.write("   shed row %d" % row)      # no newline: ends with the attempt
    return row * 5
""", total='print("total", sum(harvest_row))',
    main="store=False")       # not recorded, still traced to stderr
HARVEST_TASK_LINE = re.compile(r"(\U0001f955 row (\d+) gave \d+ carrots|   washed row (\d+)"
                               r"|   boxed row (\d+)|   shed row (\d+)|total 8850)")
HARVEST_TRACE_LINE = re.compile(r"\U0001f407 pyoco > start flow=harvest run_id=\S+"
                                r"|\U0001f955 done flow=harvest"
                                r"|\U0001f3c3 start node=(rows|harvest_row(\[\d+\])?|total)"
                                r"|\u2705 done node=(rows|harvest_row(\[\d+\])?|total)"
                                r" \([\d.]+ m?s\)")


@pytest.mark.parametrize("how", ["cli", "script"])
def test_trace_lines_and_task_output_on_one_pipe_never_share_a_line(tmp_path, how):
    write(tmp_path / "harvest.py", HARVEST_FLOW)
    command = ["-m", "pyoco", "run", "harvest.py", "--workers", "8"] if how == "cli" else [
        "harvest.py"]
    for attempt in range(5):
        proc = subprocess.run([sys.executable] + command, cwd=str(tmp_path), env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              encoding="utf-8", timeout=60)
        assert proc.returncode == 0, proc.stdout
        lines = proc.stdout.splitlines()
        mixed = [line for line in lines
                 if not (HARVEST_TASK_LINE.fullmatch(line) or HARVEST_TRACE_LINE.fullmatch(line))]
        assert mixed == [], "run %d: lines shared by trace and task output:\n%s" % (
            attempt, "\n".join(mixed[:10]))
        task_lines = [line for line in lines if HARVEST_TASK_LINE.fullmatch(line)]
        assert len(task_lines) == 60 * 4 + 1
        assert len(lines) - len(task_lines) == 2 + 63 * 2       # the flow's, each task's


FORK_WHILE_WRITING_SCRIPT = """\
    import os, select, signal, sys, threading
    import pyoco

    r, w = os.pipe()
    sys.stdout = os.fdopen(w, "w", buffering=1)
    pyoco._tee_install()                # as during a traced run
    held, release = threading.Event(), threading.Event()

    def write_a_long_line():            # a thread inside a write, holding the output lock
        with pyoco._write_lock:
            held.set()
            release.wait()

    threading.Thread(target=write_a_long_line, daemon=True).start()
    held.wait()
    pid = os.fork()                     # as a process pool starts a worker
    if pid == 0:
        print("the worker printed")
        os._exit(0)
    os.close(w)
    release.set()
    ready, _, _ = select.select([r], [], [], 10)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    sys.stderr.write(os.read(r, 100).decode() if ready else "the worker hung\\n")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_worker_forked_while_another_thread_writes_can_still_print(tmp_path):
    write(tmp_path / "fork.py", FORK_WHILE_WRITING_SCRIPT)
    # From 3.12 the parent warns about fork() in a multi-threaded process; that warning
    # would wait for the lock the script holds on purpose, so it is turned off here.
    proc = run_python(tmp_path, "-W", "ignore::DeprecationWarning", "fork.py")
    assert proc.stderr == "the worker printed\n"


# ===========================================================================
# Output capture
# ===========================================================================


# ---------------------------------------------------------------------------
# Task logs in the run store
# ---------------------------------------------------------------------------

STORE_LOG_FLOW = """\
    import sys
    from pyoco import task, Flow

    @task
    def talk(ctx):
        print("to stdout 1")
        print("to stderr 1", file=sys.stderr)
        ctx.log.info("via ctx.log %s", "info")
        ctx.log.debug("debug is not kept")
        print("to stdout 2")
        return 1

    @task
    def other(ctx, talk):
        print("other line")
        return 2

    flow = Flow(name="logs")
    flow >> talk >> other
"""


def test_task_output_reaches_the_console_and_is_kept_per_task(tmp_path):
    write(tmp_path / "log_flow.py", STORE_LOG_FLOW)
    result = cli(tmp_path, "run", "log_flow.py", plain=True)
    assert result.returncode == 0, result.stderr
    assert "to stdout 1\n" in result.stdout and "to stdout 2\n" in result.stdout
    assert "other line\n" in result.stdout
    assert "to stderr 1\n" in result.stderr
    run_id = run_id_of(result.stderr)

    lines = RunStore(tmp_path / ".pyoco").logs(run_id, task="talk")
    assert [(l["task"], l["stream"], l["text"]) for l in lines] == [
        ("talk", "stdout", "to stdout 1"), ("talk", "stderr", "to stderr 1"),
        ("talk", "log", "INFO via ctx.log info"), ("talk", "stdout", "to stdout 2")]
    assert all(ISO.match(l["ts"]) for l in lines)

    shown = cli(tmp_path, "runs", "logs", run_id, "--task", "talk", plain=True)
    assert shown.returncode == 0, shown.stderr
    assert "to stdout 1" in shown.stdout and "to stderr 1" in shown.stdout
    assert re.search(r"talk log .*INFO via ctx\.log info", shown.stdout)
    assert "other line" not in shown.stdout and "debug is not kept" not in shown.stdout

    tail = cli(tmp_path, "runs", "logs", run_id, "--task", "talk", "--tail", "1", plain=True)
    assert tail.returncode == 0, tail.stderr
    assert tail.stdout.strip().splitlines() == [
        line for line in shown.stdout.strip().splitlines() if "to stdout 2" in line]

    everything = cli(tmp_path, "runs", "logs", run_id, plain=True)
    assert "other line" in everything.stdout and "to stdout 1" in everything.stdout


def test_runstore_logs_filters_by_task_and_keeps_the_last_n_lines(tmp_path):
    @task
    def count(ctx):
        for i in range(10):
            print("count %d" % i)
        return 1

    other = task(name="other")(lambda ctx, count: print("other") or 2)
    flow = Flow(name="tails")
    flow >> count >> other
    run = quiet(store=tmp_path).run(flow)
    store = RunStore(tmp_path)
    assert [l["text"] for l in store.logs(run.run_id, task="count", tail=3)] == [
        "count 7", "count 8", "count 9"]
    assert [l["text"] for l in store.logs(run.run_id, task="other")] == ["other"]
    assert len(store.logs(run.run_id)) == 11
    assert store.logs(run.run_id, task="nobody") == []


def test_print_from_a_task_with_a_timeout_is_kept_in_its_log(tmp_path):
    @task(timeout=5)
    def timed(ctx):
        print("inside the timeout thread")
        return 1

    flow = Flow(name="timed")
    flow >> timed
    run = quiet(store=tmp_path).run(flow)
    assert [l["text"] for l in RunStore(tmp_path).logs(run.run_id, task="timed")] == [
        "inside the timeout thread"]


def test_64_parallel_tasks_keep_whole_lines_each_in_its_own_log(tmp_path):
    everyone_running = threading.Barrier(64)

    class Chatty(Task):
        def run(self, ctx):
            everyone_running.wait(WAIT)       # all 64 print at the same time
            for j in range(50):
                stream = sys.stderr if j % 5 == 0 else sys.stdout
                print("task=%s line=%02d %s" % (ctx.task_name, j, "x" * 60), file=stream)
            return ctx.task_name

    flow = Flow(name="chatty")
    names = ["chatty%02d" % k for k in range(64)]
    for name in names:
        flow.add(Chatty(name=name))
    run = quiet(store=tmp_path, workers=64).run(flow)
    store = RunStore(tmp_path)
    for name in names:
        lines = store.logs(run.run_id, task=name, tail=1000)
        assert [l["task"] for l in lines] == [name] * 50
        assert sorted(l["text"] for l in lines) == [
            "task=%s line=%02d %s" % (name, j, "x" * 60) for j in range(50)]
        assert [l["stream"] for l in lines if l["text"].split()[1] in (
            "line=00", "line=05")] == ["stderr", "stderr"]
    assert len(store.logs(run.run_id, tail=10000)) == 64 * 50


def test_max_log_bytes_keeps_the_tail_of_a_task_log(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_MAX_LOG_BYTES", "2000")

    @task
    def loud(ctx):
        for i in range(400):
            print("line %04d" % i)
        return 1

    flow = Flow(name="loud")
    flow >> loud
    run = quiet(store=tmp_path).run(flow)
    texts = [l["text"] for l in RunStore(tmp_path).logs(run.run_id, task="loud", tail=1000)]
    assert texts[-1] == "line 0399"
    assert "line 0000" not in texts
    first = int(texts[0].split()[1])
    assert texts == ["line %04d" % i for i in range(first, 400)]     # a whole, unbroken tail
    log_file = tmp_path / "runs" / run.run_id / "logs" / "loud.jsonl"
    assert 1000 < log_file.stat().st_size <= 2000


def test_max_log_bytes_keeps_the_end_of_a_last_line_longer_than_the_cap(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_MAX_LOG_BYTES", "1000")

    @task
    def dump(ctx):
        print("short first line")
        print("x" * 3000 + " END")
        return 1

    flow = Flow(name="dump")
    flow >> dump
    run = quiet(store=tmp_path).run(flow)
    texts = [l["text"] for l in RunStore(tmp_path).logs(run.run_id, task="dump")]
    log_file = tmp_path / "runs" / run.run_id / "logs" / "dump.jsonl"
    assert log_file.stat().st_size <= 1000
    assert texts and texts[-1].endswith(" END")


@pytest.mark.parametrize("value", ["-1", "-5000", "abc"])
def test_bad_max_log_bytes_warns_once_and_keeps_the_whole_log(tmp_path, value):
    write(tmp_path / "loud.py", """\
        from pyoco import task, Flow

        @task
        def loud(ctx):
            for i in range(50):
                print("line %02d" % i)

        flow = Flow(name="loud")
        flow >> loud
        """)
    result = cli(tmp_path, "run", "loud.py", env=child_env(plain=True, PYOCO_MAX_LOG_BYTES=value))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "PYOCO_MAX_LOG_BYTES" in warnings[0], result.stderr
    assert repr(value) in warnings[0]
    shown = cli(tmp_path, "runs", "logs", run_id_of(result.stderr), "--tail", "500", plain=True)
    assert [line.rsplit(" | ", 1)[-1] for line in shown.stdout.splitlines()] == [
        "line %02d" % i for i in range(50)]


def test_lines_of_every_attempt_and_a_last_line_without_newline_are_kept(tmp_path):
    @task(retries=1)
    def flaky(ctx):
        sys.stdout.write("attempt %d\nsecond line\n" % ctx.attempt)
        if ctx.attempt == 1:
            raise ValueError("first attempt fails")
        sys.stdout.write("no newline at the end")
        return 1

    flow = Flow(name="flaky")
    flow >> flaky
    run = quiet(store=tmp_path).run(flow)
    texts = [l["text"] for l in RunStore(tmp_path).logs(run.run_id, task="flaky")]
    assert texts == ["attempt 1", "second line", "attempt 2", "second line",
                     "no newline at the end"]


# The process executor: tasks run in worker processes, so the flow lives in a
# module they can import, and a script runs it.
STORE_PROCESS_FLOW = """\
    import sys
    from pyoco import task, Flow

    @task
    def make(ctx):
        print("printed in a worker process")
        print("to stderr in a worker process", file=sys.stderr)
        ctx.log.info("logged in a worker process")
        return ctx.save_artifact("made.txt", "from a worker process")

    @task
    def use(ctx, make):
        return dict(ctx.artifacts)

    flow = Flow(name="processes")
    flow >> make >> use
"""

STORE_PROCESS_SCRIPT = """\
    import json, sys
    from pyoco import Engine
    from process_flow import flow

    if __name__ == "__main__":
        run = Engine(store=sys.argv[1], trace=False, executor="process", workers=2).run(flow)
        print("RESULT " + json.dumps({"run_id": run.run_id, "results": run.results}))
"""


def store_run_process_flow(tmp_path):
    write(tmp_path / "process_flow.py", STORE_PROCESS_FLOW)
    script = write(tmp_path / "process_run.py", STORE_PROCESS_SCRIPT)
    result = run_python(tmp_path, script, tmp_path / "store", plain=True)
    assert result.returncode == 0, result.stderr
    out = json.loads(re.search(r"^RESULT (.*)$", result.stdout, re.M).group(1))
    return result, out["run_id"], out["results"]


def test_process_executor_keeps_prints_and_artifacts_in_the_store(tmp_path):
    result, run_id, results = store_run_process_flow(tmp_path)
    assert "printed in a worker process" in result.stdout
    assert "to stderr in a worker process" in result.stderr
    store = RunStore(tmp_path / "store")
    lines = [(l["stream"], l["text"]) for l in store.logs(run_id, task="make")]
    assert ("stdout", "printed in a worker process") in lines
    assert ("stderr", "to stderr in a worker process") in lines
    path = results["make"]
    assert (tmp_path / "store" / "runs" / run_id).resolve() in Path(path).resolve().parents
    assert Path(path).read_text() == "from a worker process"
    assert results["use"] == {"made.txt": path}
    assert store.get(run_id)["tasks"]["make"]["artifacts"] == {"made.txt": path}


def test_process_executor_keeps_ctx_log_lines_in_the_task_log(tmp_path):
    _, run_id, _ = store_run_process_flow(tmp_path)
    lines = [(l["stream"], l["text"]) for l in RunStore(tmp_path / "store").logs(run_id)]
    assert ("log", "INFO logged in a worker process") in lines


STORE_CHATTY_SCRIPT = """\
    import sys
    import time
    from pyoco import Engine, Flow, task

    @task(timeout=0.05)
    def chatty(ctx):
        # Its thread cannot be stopped: it goes on printing after the deadline,
        # while the run ends and the engine puts sys.stdout back.
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            print("still talking", flush=True)
        return "done"

    flow = Flow(name="chatty")
    flow >> chatty
    engine = Engine(store=sys.argv[1], trace=False)
    for _ in range(20):
        assert engine.run(flow, raise_on_failure=False).status == "FAILED"
    print("SURVIVED", file=sys.stderr)
"""


def test_task_thread_still_printing_after_its_run_ended_does_not_crash_python(tmp_path):
    script = write(tmp_path / "chatty.py", STORE_CHATTY_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "store")],
                            cwd=str(tmp_path), env=child_env(plain=True), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, encoding="utf-8", timeout=60)
    assert result.returncode == 0, "exit code %d\n%s" % (result.returncode, result.stderr)
    assert "SURVIVED" in result.stderr


def test_task_name_with_slashes_is_logged_inside_the_logs_folder(tmp_path):
    class Sneaky(Task):
        name = "../../sneaky"

        def run(self, ctx):
            print("sneaky line")
            return 1

    flow = Flow(name="sneaky")
    flow.add(Sneaky())
    run = quiet(store=tmp_path / "store").run(flow)
    assert [p for p in store_files(tmp_path) if "sneaky" in p] == [
        "store/runs/%s/logs/%%2E%%2E%%2F%%2E%%2E%%2Fsneaky.jsonl" % run.run_id]
    lines = RunStore(tmp_path / "store").logs(run.run_id, task="../../sneaky")
    assert [(l["task"], l["text"]) for l in lines] == [("../../sneaky", "sneaky line")]


STORE_LONG_NAMES_FLOW = """\
    from pyoco import task, Flow

    URL = "https://bucket.example.com/carrots.csv?" + "&".join(
        "X-Amz-Part%d=%s" % (n, "a1b2c3d4" * 4) for n in range(10))

    @task(name="fetch " + URL + "&v=1")
    def first(ctx):
        print("first fetched")
        return 1

    @task(name="fetch " + URL + "&v=2")
    def second(ctx):
        print("second fetched")
        return 2

    flow = Flow(name="long-names")
    flow >> [first, second]
"""


def test_task_names_too_long_for_a_file_name_are_recorded_and_their_logs_found(tmp_path):
    write(tmp_path / "long_names.py", STORE_LONG_NAMES_FLOW)
    result = cli(tmp_path, "run", "long_names.py", plain=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    run_id = run_id_of(result.stderr)
    record = json.loads(cli(tmp_path, "runs", "show", run_id, "--json", plain=True).stdout)
    assert record["status"] == "COMPLETED" and record["reason"] is None
    names = sorted(record["tasks"])
    assert len(names) == 2 and all(len(name) > 400 for name in names)
    assert all(task["state"] == "SUCCEEDED" for task in record["tasks"].values())
    logs = sorted(os.listdir(tmp_path / ".pyoco" / "runs" / run_id / "logs"))
    assert len(logs) == 2 and all(len(name.encode()) <= 255 for name in logs)
    assert all(name.startswith("fetch%20https%3A%2F%2Fbucket%2Eexample%2Ecom") for name in logs)
    for name, text in zip(names, ["first fetched", "second fetched"]):
        shown = cli(tmp_path, "runs", "logs", run_id, "--task", name, plain=True)
        assert shown.returncode == 0, shown.stderr
        assert [line.rsplit(" | ", 1)[-1] for line in shown.stdout.splitlines()] == [text]


# ===========================================================================
# Model: tasks
# ===========================================================================


# ---------------------------------------------------------------------------
# @task, options, Task subclasses
# ---------------------------------------------------------------------------

def test_bare_decorator_makes_a_node_named_after_the_function():
    @task
    def fetch(ctx):
        return 1

    assert isinstance(fetch.task, Task)
    assert fetch.task.name == "fetch"
    assert fetch.task.inputs == {}
    assert fetch.task.retries == 0
    assert fetch.task.retry_delay == 0
    assert fetch.task.timeout is None
    assert fetch.task.fail_policy == "stop"


def test_decorator_with_options_sets_them_on_the_node():
    @task(name="shout", inputs={"data": "$node.fetch.output"}, retries=2, retry_delay=0.5,
          timeout=30, fail_policy="isolate")
    def process(ctx, data):
        return data

    node = process.task
    assert (node.name, node.retries, node.retry_delay, node.timeout, node.fail_policy) == (
        "shout", 2, 0.5, 30, "isolate")
    assert node.inputs == {"data": "$node.fetch.output"}


def test_task_name_none_means_the_function_name():
    def fetch(ctx):
        return 1

    assert task(name=None)(fetch).task.name == "fetch"


def test_decorated_function_is_still_callable_as_the_plain_function():
    @task(retries=3)
    def add(ctx, a, b=10):
        """Adds."""
        return (ctx, a + b)

    assert add("CTX", 1) == ("CTX", 11)
    assert add(None, a=1, b=2) == (None, 3)
    assert add.__name__ == "add"
    assert add.__doc__ == "Adds."


def test_node_attributes_can_be_set_after_decoration():
    @task
    def t(ctx):
        return None

    t.task.name = "renamed"
    t.task.retries = 4
    t.task.retry_delay = 1.5
    t.task.timeout = 2
    t.task.fail_policy = "isolate"
    t.task.inputs = {"x": 1}
    assert (t.task.name, t.task.retries, t.task.retry_delay, t.task.timeout,
            t.task.fail_policy, dict(t.task.inputs)) == ("renamed", 4, 1.5, 2, "isolate", {"x": 1})


class Fetch(Task):
    name = "fetch_named"

    def run(self, ctx, **inputs):
        return {"id": 1, **inputs}


class Doubler(Task):
    def run(self, ctx, value):
        return value * 2


def test_task_subclass_is_named_by_its_name_attribute_else_its_class_name():
    assert Fetch().name == "fetch_named"
    assert Doubler().name == "Doubler"
    assert Doubler(name="twice").name == "twice"


def test_task_subclass_takes_options_as_keyword_arguments():
    node = Doubler(name="d", retries=2, retry_delay=0.25, timeout=3, fail_policy="isolate",
                   inputs={"value": 21})
    assert (node.name, node.retries, node.retry_delay, node.timeout, node.fail_policy) == (
        "d", 2, 0.25, 3, "isolate")
    assert node.inputs == {"value": 21}


def test_task_subclass_instances_run_in_a_flow_with_their_inputs():
    flow = Flow("classes")
    fetch = Fetch(inputs={"extra": "yes"})
    double = Doubler(inputs={"value": "$node.fetch_named.output.id"})
    flow >> fetch >> double
    run = run_quiet(flow)
    assert run.results == {"fetch_named": {"id": 1, "extra": "yes"}, "Doubler": 2}


def test_two_instances_of_one_task_class_are_two_nodes():
    flow = Flow("two")
    flow >> Doubler(name="a", inputs={"value": 1}) >> Doubler(name="b", inputs={"value": 5})
    assert run_quiet(flow).results == {"a": 2, "b": 10}


BAD_OPTIONS = [
    # (options, exception type, words the message must contain)
    ({"retries": -1}, ValueError, ["retries"]),
    ({"retries": 1.5}, ValueError, ["retries"]),
    ({"retries": "3"}, ValueError, ["retries"]),
    ({"retry_delay": -0.1}, ValueError, ["retry_delay"]),
    ({"retry_delay": "1s"}, ValueError, ["retry_delay"]),
    ({"timeout": 0}, ValueError, ["timeout"]),
    ({"timeout": -5}, ValueError, ["timeout"]),
    ({"timeout": "30"}, ValueError, ["timeout"]),
    ({"fail_policy": "explode"}, ValueError, ["fail_policy", "'explode'"]),
    ({"inputs": ["x"]}, TypeError, ["inputs"]),
    ({"retires": 3}, TypeError, ["'retires'"]),
    pytest.param({"retries": True}, ValueError, ["retries"], id="{'retries': True}"),
    pytest.param({"timeout": float("nan")}, ValueError, ["timeout"], id="{'timeout': nan}"),
]


@pytest.mark.parametrize("options, error, words", BAD_OPTIONS,
                         ids=[getattr(c, "id", None) or repr(c[0]) for c in BAD_OPTIONS])
def test_bad_option_values_raise_clear_errors(options, error, words):
    def f(ctx):
        return None

    for make in (lambda: task(**options)(f), lambda: Doubler(**options)):
        with pytest.raises(error) as info:
            make()
        for word in words:
            assert word in str(info.value)


@pytest.mark.parametrize("attr, value", [("retries", -1), ("timeout", 0),
                                         ("fail_policy", "maybe"), ("retry_delay", -1)])
def test_bad_option_set_as_attribute_raises(attr, value):
    @task
    def f(ctx):
        return None

    with pytest.raises(ValueError, match=attr):
        setattr(f.task, attr, value)


def test_flow_control_options_are_task_options():
    @task(pool="api", max_parallel=4, run_if="all_done", when="$ctx.params.go")
    def f(ctx):
        return None

    node = f.task
    assert (node.pool, node.max_parallel, node.run_if, node.when) == (
        "api", 4, "all_done", "$ctx.params.go")
    assert (Doubler().pool, Doubler().max_parallel, Doubler().run_if, Doubler().when) == (
        None, None, "all_succeeded", None)


def test_an_unknown_task_keyword_is_a_type_error_naming_the_closest_option():
    def f(ctx):
        return None

    class Fetcher(Task):
        def __init__(self, url, **options):
            self.url = url
            super().__init__(**options)

        def run(self, ctx):
            return self.url

    for make in (lambda: task(retires=2)(f), lambda: Doubler(retires=2),
                 lambda: Fetcher("http://x", retires=2)):
        with pytest.raises(TypeError) as info:
            make()
        assert "'retires'" in str(info.value) and "'retries'" in str(info.value)
    assert Fetcher("http://x", retries=2).retries == 2


def test_an_unknown_flow_keyword_is_a_type_error_naming_pools():
    with pytest.raises(TypeError) as info:
        Flow("x", pool={})
    assert "'pool'" in str(info.value) and "'pools'" in str(info.value)


@pytest.mark.parametrize("attr, closest", [("timout", "'timeout'"), ("timeout_secs", "timeout"),
                                           ("retrys", "'retries'"), ("runif", "'run_if'")])
def test_a_misspelled_option_set_on_a_decorated_functions_node_is_an_attribute_error(attr,
                                                                                      closest):
    @task
    def f(ctx):
        return None

    with pytest.raises(AttributeError) as info:
        setattr(f.task, attr, 0.05)
    assert repr(attr) in str(info.value) and closest in str(info.value)
    assert not hasattr(f.task, attr)
    assert f.task.timeout is None


def test_an_unknown_run_if_is_a_flow_error_naming_the_closest_rule():
    def f(ctx):
        return None

    for make in (lambda: task(run_if="all_don")(f), lambda: Doubler(run_if="all_don"),
                 lambda: setattr(task(f).task, "run_if", "all_don")):
        with pytest.raises(FlowError) as info:
            make()
        assert "'all_don'" in str(info.value) and "did you mean 'all_done'" in str(info.value)


def test_a_task_subclass_may_set_attributes_of_its_own():
    class Counter(Task):
        def __init__(self, start=0, **options):
            self.count = start
            super().__init__(**options)

        def run(self, ctx):
            self.count += 1
            self.last_run = ctx.run_id
            return self.count

    node = Counter(10, name="counter", retries=1)
    node.label = "mine"
    flow = Flow("own-attributes")
    flow >> node
    run = run_quiet(flow)
    assert run.results["counter"] == 11
    assert (node.count, node.last_run, node.label) == (11, run.run_id, "mine")


def test_task_decorator_rejects_a_non_callable():
    with pytest.raises(TypeError):
        task(42)


def test_engine_rejects_a_bad_worker_count():
    for workers in (0, -1, 1.5, "8"):
        with pytest.raises(ValueError, match="workers"):
            Engine(workers=workers)


@pytest.mark.parametrize("options, error", [
    ({"cache": "yes"}, "cache must be True, False or 'resume'"),
    ({"cache": "resum"}, "did you mean 'resume'"),
    ({"cache_ttl": 0}, "cache_ttl must be seconds > 0"),
    ({"cache_key": "path"}, "cache_key must be a function"),
    ({"version": [1]}, "version must be a string or a number"),
])
def test_bad_cache_options_are_clear_errors(options, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        task(**options)(lambda ctx: None)


# -- changes after a task is in a flow reach the next run (the plan cache)


# ===========================================================================
# Model: expressions
# ===========================================================================


# ---------------------------------------------------------------------------
# Inputs, expressions and wiring by name
# ---------------------------------------------------------------------------

class Box:
    def __init__(self, value):
        self.value = value


def _producer_and_consumer(output, expression):
    @task
    def produce(ctx):
        return output

    @task(inputs={"v": expression})
    def consume(ctx, v):
        return v

    flow = Flow("expr")
    flow >> produce >> consume
    return flow


@pytest.mark.parametrize("output, expression, expected", [
    ({"id": 1}, "$node.produce.output", {"id": 1}),
    ({"id": 1}, "$node.produce.output.id", 1),
    ({"a": {"b": [10, 20]}}, "$node.produce.output.a.b.1", 20),
    ([1, 2, 3], "$node.produce.output.0", 1),
    ([1, 2, 3], "$node.produce.output.-1", 3),
    (Box(Box("deep")), "$node.produce.output.value.value", "deep"),
    ({"output": "x"}, "$node.produce.output.output", "x"),
], ids=["whole", "key", "nested-index", "index", "negative-index", "attr", "key-named-output"])
def test_node_expression_reads_the_output_and_its_steps(output, expression, expected):
    run = run_quiet(_producer_and_consumer(output, expression))
    assert run.results["consume"] == expected


def test_node_expression_with_a_missing_step_fails_the_task_naming_the_step():
    run = run_quiet(_producer_and_consumer({"id": 1}, "$node.produce.output.nope"),
                    raise_on_failure=False)
    record = run.tasks["consume"]
    assert record.state == "FAILED"
    assert "nope" in record.error


def test_ctx_params_expression_reads_run_params():
    @task(inputs={"day": "$ctx.params.day", "region": "$ctx.params.cfg.region"})
    def t(ctx, day, region):
        return (day, region)

    flow = Flow("params")
    flow >> t
    run = run_quiet(flow, {"day": "2026-11-29", "cfg": {"region": "eu"}})
    assert run.results["t"] == ("2026-11-29", "eu")


def test_ctx_scratch_expression_reads_what_an_upstream_task_stored():
    handle = object()

    @task
    def opener(ctx):
        ctx.scratch["conn"] = handle

    @task(inputs={"conn": "$ctx.scratch.conn"})
    def user(ctx, conn):
        return conn

    flow = Flow("scratch")
    flow >> opener >> user
    assert run_quiet(flow).results["user"] is handle


def test_env_expression_reads_the_environment(monkeypatch):
    monkeypatch.setenv("PYOCO_TEST_TOKEN", "s3cret")

    @task(inputs={"token": "$env.PYOCO_TEST_TOKEN"})
    def t(ctx, token):
        return token

    flow = Flow("env")
    flow >> t
    assert run_quiet(flow).results["t"] == "s3cret"


def test_double_dollar_is_a_literal_dollar_and_other_values_are_constants():
    @task(inputs={"price": "$$100", "plain": "no dollar", "n": 3, "obj": [1, "$x"]})
    def t(ctx, price, plain, n, obj):
        return (price, plain, n, obj)

    flow = Flow("literal")
    flow >> t
    assert run_quiet(flow).results["t"] == ("$100", "no dollar", 3, [1, "$x"])


def test_parameter_is_wired_from_a_direct_upstream_task_of_that_name_first():
    @task
    def data(ctx):
        return "from upstream"

    @task
    def use(ctx, data="default"):
        return data

    flow = Flow("wire")
    flow >> data >> use
    assert run_quiet(flow, {"data": "from params"}).results["use"] == "from upstream"


def test_wiring_by_name_uses_the_node_name_not_the_function_name():
    @task(name="data")
    def produce(ctx):
        return 42

    @task
    def use(ctx, data, produce="not wired"):
        return (data, produce)

    flow = Flow("node-name")
    flow >> produce >> use
    assert run_quiet(flow).results["use"] == (42, "not wired")


def test_parameter_falls_back_to_flow_param_then_default():
    @task
    def first(ctx):
        return "first"

    @task
    def use(ctx, day, region="eu"):
        return (day, region)

    flow = Flow("fallback")
    flow >> first >> use
    assert run_quiet(flow, {"day": "mon"}).results["use"] == ("mon", "eu")
    assert run_quiet(flow, {"day": "tue", "region": "us"}).results["use"] == ("tue", "us")


def test_only_direct_upstream_tasks_wire_by_name():
    grand = task(name="grand")(lambda ctx: "grand output")
    parent = task(name="parent")(lambda ctx: "parent output")

    @task
    def child(ctx, grand="default"):
        return grand

    flow = Flow("direct")
    flow >> grand >> parent >> child
    assert run_quiet(flow).results["child"] == "default"


def test_inputs_win_over_wiring_by_name():
    @task
    def data(ctx):
        return "upstream"

    @task(inputs={"data": "explicit"})
    def use(ctx, data):
        return data

    flow = Flow("explicit")
    flow >> data >> use
    assert run_quiet(flow, {"data": "param"}).results["use"] == "explicit"


def test_keyword_only_parameters_are_wired_too():
    @task
    def a(ctx):
        return "A"

    @task(inputs={"x": 1})
    def b(ctx, *, a, x, y=2):
        return (a, x, y)

    flow = Flow("kwonly")
    flow >> a >> b
    assert run_quiet(flow).results["b"] == ("A", 1, 2)


def test_task_without_ctx_parameter_gets_no_ctx():
    @task
    def a():
        return 5

    @task
    def b(a):
        return a + 1

    flow = Flow("no-ctx")
    flow >> a >> b
    assert run_quiet(flow).results == {"a": 5, "b": 6}


def test_node_reference_orders_tasks_without_an_explicit_edge():
    @task
    def early(ctx):
        time.sleep(0.05)                # work that would let `late` overtake it
        return "value"

    @task(inputs={"v": "$node.early.output"})
    def late(ctx, v):
        return (v, dict(ctx.results))

    flow = Flow("implicit-edge")
    flow >> late                        # `late` is added first, with no edge
    flow >> early
    run = run_quiet(flow)
    assert run.results["late"] == ("value", {"early": "value"})
    events = [(e["event"], e["task"]) for e in run.events]
    assert events.index(("task.succeeded", "early")) < events.index(("task.started", "late"))


# ===========================================================================
# Model: flows
# ===========================================================================


# ---------------------------------------------------------------------------
# Building flows
# ---------------------------------------------------------------------------

def _recorders(names, log):
    """Tasks that append (start/end, name) to log, one per name."""
    def body(ctx):
        log.append(("start", ctx.task_name))
        log.append(("end", ctx.task_name))
        return ctx.task_name
    return [task(name=name)(body) for name in names]


def _assert_ran_after(log, edges):
    pos = {item: i for i, item in enumerate(log)}
    for up, down in edges:
        assert pos[("end", up)] < pos[("start", down)], (up, down)


def test_chain_runs_tasks_in_order():
    log = []
    a, b, c = _recorders("abc", log)
    flow = Flow("chain")
    flow >> a >> b >> c
    run_quiet(flow)
    assert [name for kind, name in log if kind == "start"] == ["a", "b", "c"]
    assert [n.name for n in flow.tasks] == ["a", "b", "c"]


def test_fan_out_and_join_runs_the_join_after_both_branches():
    log = []
    a, b, c, d = _recorders("abcd", log)
    flow = Flow("fan")
    flow >> a >> [b, c] >> d
    run = run_quiet(flow)
    assert run.status == "COMPLETED"
    _assert_ran_after(log, [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    assert [u.name for u in flow.upstream(d)] == ["b", "c"]
    assert len(log) == 8


def test_add_with_after_sets_any_upstream_set():
    log = []
    a, b, c, d = _recorders("abcd", log)
    flow = Flow("add")
    flow.add(a)
    flow.add(b)
    flow.add(c, after=[a, b])
    flow.add(d, after=c)                # a single task works as well as a list
    run_quiet(flow)
    _assert_ran_after(log, [("a", "c"), ("b", "c"), ("c", "d")])
    assert [u.name for u in flow.upstream(c)] == ["a", "b"]


def test_add_brings_in_upstream_tasks_not_yet_in_the_flow():
    log = []
    a, b = _recorders("ab", log)
    flow = Flow("implicit")
    flow.add(b, after=[a])
    assert sorted(n.name for n in flow.tasks) == ["a", "b"]
    run_quiet(flow)
    _assert_ran_after(log, [("a", "b")])


def test_same_task_mentioned_twice_is_one_node():
    log = []
    a, b, c = _recorders("abc", log)
    flow = Flow("once")
    flow >> a >> b
    flow >> a >> c
    flow >> [b, c]
    assert len(flow) == 3
    run = run_quiet(flow)
    assert sorted(run.results) == ["a", "b", "c"]
    assert sorted(name for kind, name in log if kind == "start") == ["a", "b", "c"]


def test_adding_a_task_again_only_adds_edges():
    log = []
    a, b, c = _recorders("abc", log)
    flow = Flow("readd")
    flow >> a >> b
    flow.add(c)
    flow.add(b, after=[c])
    assert len(flow) == 3
    assert [u.name for u in flow.upstream(b)] == ["a", "c"]
    run_quiet(flow)
    _assert_ran_after(log, [("a", "b"), ("c", "b")])


def test_flow_contains_and_len():
    a, b, c = _recorders("abc", [])
    flow = Flow("contains")
    flow >> a >> b
    assert a in flow and b in flow and c not in flow
    assert len(flow) == 2


def test_task_class_or_plain_function_in_a_flow_is_a_type_error():
    def plain(ctx):
        return None

    flow = Flow("bad")
    with pytest.raises(TypeError, match=r"Doubler\(\)"):
        flow >> Doubler
    with pytest.raises(TypeError):
        flow >> plain
    with pytest.raises(TypeError):
        flow.add(42)


def test_a_task_after_itself_is_a_flow_error_with_its_cycle():
    a, = _recorders("a", [])
    flow = Flow("self")
    with pytest.raises(FlowError) as info:
        flow.add(a, after=[a])
    assert info.value.cycle == ["a", "a"]


# ===========================================================================
# Model: schedules
# ===========================================================================


# ---------------------------------------------------------------------------
# The parser: a table of expressions with known next times
# ---------------------------------------------------------------------------

def sch_ts(text):
    """'2026-12-01T10:00Z' (seconds optional) as a Unix time."""
    import calendar
    fmt = "%Y-%m-%dT%H:%M:%SZ" if text.count(":") == 2 else "%Y-%m-%dT%H:%MZ"
    return calendar.timegm(time.strptime(text, fmt))


def sch_iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


SCH_NEXT = [
    # (schedule, zone, after, the next times)
    ("0 3 * * *", "UTC", "2026-01-31T12:00Z", ["2026-02-01T03:00:00Z", "2026-02-02T03:00:00Z"]),
    ("0 0 31 * *", "UTC", "2026-01-31T00:00Z", ["2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z"]),
    ("0 0 29 2 *", "UTC", "2026-03-01T00:00Z", ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"]),
    ("0 0 28-31 * *", "UTC", "2027-02-27T00:00Z",
     ["2027-02-28T00:00:00Z", "2027-03-28T00:00:00Z"]),
    ("0 0 * * 0", "UTC", "2026-12-01T00:00Z", ["2026-12-06T00:00:00Z", "2026-12-13T00:00:00Z"]),
    ("0 0 * * 7", "UTC", "2026-12-01T00:00Z", ["2026-12-06T00:00:00Z", "2026-12-13T00:00:00Z"]),
    ("0 0 * * sun", "UTC", "2026-12-01T00:00Z", ["2026-12-06T00:00:00Z"]),
    ("0 0 * * 5-7", "UTC", "2026-12-05T12:00Z", ["2026-12-06T00:00:00Z", "2026-12-11T00:00:00Z"]),
    # both day fields restricted: the 13th OR a Friday
    ("0 0 13 * 5", "UTC", "2026-12-01T00:00Z",
     ["2026-12-04T00:00:00Z", "2026-12-11T00:00:00Z", "2026-12-13T00:00:00Z"]),
    # a day field starting with * is unrestricted: odd days AND Fridays
    ("0 0 */2 * fri", "UTC", "2026-12-01T00:00Z", ["2026-12-11T00:00:00Z", "2026-12-25T00:00:00Z"]),
    ("15,45 9-17/4 * * mon-fri", "UTC", "2026-12-05T00:00Z",
     ["2026-12-07T09:15:00Z", "2026-12-07T09:45:00Z", "2026-12-07T13:15:00Z"]),
    ("0 12 * jan,JUL sat,sun", "UTC", "2026-12-01T00:00Z",
     ["2027-01-02T12:00:00Z", "2027-01-03T12:00:00Z"]),
    ("*/20 * * * *", "UTC", "2026-12-01T10:59:59Z", ["2026-12-01T11:00:00Z", "2026-12-01T11:20:00Z"]),
    ("5/20 * * * *", "UTC", "2026-12-01T10:00Z", ["2026-12-01T10:05:00Z", "2026-12-01T10:25:00Z"]),
    ("59 23 31 dec *", "UTC", "2026-12-31T23:59Z", ["2027-12-31T23:59:00Z"]),
    ("@hourly", "UTC", "2026-12-01T12:34Z", ["2026-12-01T13:00:00Z"]),
    ("@daily", "UTC", "2026-12-01T00:00Z", ["2026-12-02T00:00:00Z"]),
    ("@weekly", "UTC", "2026-12-01T00:00Z", ["2026-12-06T00:00:00Z"]),
    ("@monthly", "UTC", "2026-12-15T00:00Z", ["2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z"]),
    ("@yearly", "UTC", "2026-06-01T00:00Z", ["2027-01-01T00:00:00Z"]),
    ("0 9 * * *", "Asia/Tokyo", "2026-12-01T00:00Z", ["2026-12-02T00:00:00Z"]),
    # intervals are multiples of N since 1970-01-01T00:00Z, whatever the zone
    ("every 15m", "UTC", "2026-12-01T10:07:30Z", ["2026-12-01T10:15:00Z", "2026-12-01T10:30:00Z"]),
    ("every 1d", "Asia/Tokyo", "2026-12-01T10:00Z", ["2026-12-02T00:00:00Z"]),
    ("every 7s", "UTC", "1970-01-01T00:00:00Z", ["1970-01-01T00:00:07Z", "1970-01-01T00:00:14Z"]),
    ("every 2h", "Asia/Kolkata", "2026-12-01T01:00Z", ["2026-12-01T02:00:00Z"]),
    # daylight saving time in New York: 2026-03-08 02:00 -> 03:00, 2026-11-01 02:00 -> 01:00.
    # A skipped wall time fires once, at the next minute that exists...
    ("30 2 * * *", "America/New_York", "2026-03-07T12:00Z",
     ["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"]),
    ("*/30 * * * *", "America/New_York", "2026-03-08T06:30Z",
     ["2026-03-08T07:00:00Z", "2026-03-08T07:30:00Z"]),
    # ... and a repeated hour fires once, at its first occurrence
    ("30 1 * * *", "America/New_York", "2026-11-01T04:00Z",
     ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]),
    ("*/30 * * * *", "America/New_York", "2026-11-01T05:15Z",
     ["2026-11-01T05:30:00Z", "2026-11-01T07:00:00Z", "2026-11-01T07:30:00Z"]),
]


@pytest.mark.parametrize("text, zone, after, expected", SCH_NEXT,
                         ids=["%s|%s|%s" % row[:3] for row in SCH_NEXT])
def test_schedule_next_times_match_the_table(text, zone, after, expected):
    flow = Flow("timed", schedule=text, schedule_tz=zone)
    times = flow._schedule.upcoming(len(expected), sch_ts(after))
    assert [sch_iso(ts) for ts in times] == expected
    # the latest time at or before a time is the one before the next
    first = sch_ts(expected[0])
    assert flow._schedule.latest_until(first) == first
    assert flow._schedule.latest_until(first - 1) < first


def test_schedule_without_a_zone_is_the_servers_local_time():
    flow = Flow("local", schedule="0 3 * * *")
    ts = flow._schedule.next_after(time.time())
    local = time.localtime(ts)
    assert (local.tm_hour, local.tm_min, local.tm_sec) == (3, 0, 0)
    assert flow.schedule_tz is None


@pytest.mark.parametrize("options, words", [
    ({"schedule": "61 * * * *"}, ["minute", "'61'"]),
    ({"schedule": "0 24 * * *"}, ["hour", "'24'"]),
    ({"schedule": "0 0 0 * *"}, ["day of month", "'0'"]),
    ({"schedule": "0 0 * 13 *"}, ["month", "'13'"]),
    ({"schedule": "0 0 * * 8"}, ["day of week", "'8'"]),
    ({"schedule": "0 0 * * mon-fry"}, ["day of week", "'fry'", "did you mean 'fri'"]),
    ({"schedule": "0 0 * jan-dex *"}, ["month", "'dex'", "did you mean 'dec'"]),
    ({"schedule": "*/0 * * * *"}, ["minute", "step"]),
    ({"schedule": "5-1 * * * *"}, ["minute", "backwards"]),
    ({"schedule": "0 0 30 feb *"}, ["day of month", "never"]),
    ({"schedule": "0 3 * *"}, ["5 fields", "not 4"]),
    ({"schedule": "@daly"}, ["'@daly'", "did you mean '@daily'"]),
    ({"schedule": "every 15x"}, ["'every 15x'", "every 15m"]),
    ({"schedule": "every 0m"}, ["'every 0m'"]),
    ({"schedule": 15}, ["schedule must be a string", "15"]),
    ({"schedule": "@daily", "schedule_tz": "Europe/Pariss"},
     ["schedule_tz", "'Europe/Pariss'", "did you mean 'Europe/Paris'"]),
    ({"schedule_tz": "../../etc/passwd"}, ["schedule_tz"]),
    ({"schedule_overlap": "alow"}, ["schedule_overlap", "'alow'", "did you mean 'allow'"]),
    ({"schedule_catchup": "all"}, ["schedule_catchup", "'all'", "'latest' or 'none'"]),
])
def test_bad_schedule_is_a_flow_error_naming_the_field_and_value(options, words):
    with pytest.raises(FlowError) as caught:
        Flow("nightly", **options)
    for word in words:
        assert word in str(caught.value)
    assert "flow 'nightly'" in str(caught.value)
    flow = Flow("nightly")          # the same check when the attribute is set
    with pytest.raises(FlowError):
        for key, value in options.items():
            setattr(flow, key, value)


def test_schedule_attributes_read_back_and_none_unschedules():
    flow = Flow("nightly", schedule="0 3 * * *", schedule_tz="Europe/Paris",
                schedule_overlap="allow", schedule_catchup="none")
    assert (flow.schedule, flow.schedule_tz, flow.schedule_overlap, flow.schedule_catchup) == (
        "0 3 * * *", "Europe/Paris", "allow", "none")
    flow.schedule = "every 15m"
    assert flow.schedule == "every 15m"
    flow.schedule = None
    assert flow.schedule is None and flow._schedule is None
    with pytest.raises(TypeError, match="did you mean 'schedule'"):
        Flow("x", schedul="@daily")
    assert Flow("plain").schedule is None


# ===========================================================================
# Compile
# ===========================================================================


# ---------------------------------------------------------------------------
# A flow changed after a run is compiled again
# ---------------------------------------------------------------------------

def _one_input_flow():
    @task(inputs={"x": 1})
    def echo(ctx, x, y="y0"):
        return (x, y)

    flow = Flow("cache")
    flow >> echo
    return flow, echo


@pytest.mark.parametrize("change, expected", [
    (lambda n: setattr(n, "inputs", {"x": 2}), (2, "y0")),
    (lambda n: n.inputs.__setitem__("x", 3), (3, "y0")),
    (lambda n: n.inputs.update(x=4, y="y4"), (4, "y4")),
    (lambda n: n.inputs.setdefault("y", "y5"), (1, "y5")),
    (lambda n: (n.inputs.pop("x"), n.inputs.__setitem__("x", 6)), (6, "y0")),
    (lambda n: n.inputs.__delitem__("x"), (7, "y0")),          # then x comes from params
], ids=["assign", "setitem", "update", "setdefault", "pop", "delitem"])
def test_changing_inputs_after_a_run_is_seen_by_the_next_run(change, expected):
    flow, echo = _one_input_flow()
    assert run_quiet(flow, {"x": 7}).results["echo"] == (1, "y0")
    change(echo.task)
    assert run_quiet(flow, {"x": 7}).results["echo"] == expected


def test_renaming_a_task_after_a_run_renames_its_result():
    flow, echo = _one_input_flow()
    assert list(run_quiet(flow).results) == ["echo"]
    echo.task.name = "renamed"
    run = run_quiet(flow)
    assert run.results == {"renamed": (1, "y0")}
    assert list(run.tasks) == ["renamed"]


def test_changing_retries_after_a_run_is_seen_by_the_next_run():
    calls = []

    @task
    def flaky(ctx):
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ValueError("not yet")
        return "ok"

    flow = Flow("retries")
    flow >> flaky
    assert run_quiet(flow, raise_on_failure=False).status == "FAILED"
    assert calls == [1]
    flaky.task.retries = 2
    calls.clear()
    run = run_quiet(flow)
    assert calls == [1, 2, 3]
    assert run.tasks["flaky"].attempts == 3


def test_changing_timeout_after_a_run_is_seen_by_the_next_run():
    release = threading.Event()

    @task
    def slow(ctx):
        release.wait(WAIT)
        return "late"

    flow = Flow("timeout-change")
    flow >> slow
    release.set()
    assert run_quiet(flow).status == "COMPLETED"
    release.clear()
    slow.task.timeout = 0.2
    try:
        run = run_quiet(flow, raise_on_failure=False)
    finally:
        release.set()
    assert run.tasks["slow"].state == "FAILED"
    assert run.tasks["slow"].error.startswith("TimeoutError")


def test_changing_fail_policy_after_a_run_is_seen_by_the_next_run():
    @task
    def boom(ctx):
        raise ValueError("no")

    @task
    def independent(ctx):
        return "ran"

    flow = Flow("policy-change")
    flow >> boom
    flow >> independent
    engine = quiet(workers=1)       # one worker: `independent` is queued behind `boom`
    assert engine.run(flow, raise_on_failure=False).tasks["independent"].state == "SKIPPED"
    boom.task.fail_policy = "isolate"
    run = engine.run(flow, raise_on_failure=False)
    assert run.tasks["independent"].state == "SUCCEEDED"


def test_adding_an_edge_after_a_run_is_seen_by_the_next_run():
    @task
    def a(ctx):
        return 1

    @task
    def b(ctx, a=None):
        return a

    flow = Flow("edge-change")
    flow >> a
    flow >> b
    assert run_quiet(flow).results["b"] is None
    flow.add(b, after=[a])
    assert run_quiet(flow).results["b"] == 1


# The same changes made through a reference to the inputs dict held across
# runs, and through the node's attributes: the next run compiles them in.

def _or_in_a_node_reference(inputs, node):
    inputs |= {"x": "$node.other.output"}


def _update_inputs(inputs, node):
    inputs.update(y="y1")


def _delete_an_input(inputs, node):
    del inputs["x"]


def _more_retries(inputs, node):
    node.retries = 2


@pytest.mark.parametrize("change, params, status, result, attempts", [
    (_or_in_a_node_reference, {}, "COMPLETED", ("from other", "y0"), 1),
    (_update_inputs, {}, "COMPLETED", (1, "y1"), 1),
    (_delete_an_input, {}, "COMPLETED", ("x0", "y0"), 1),
    (_more_retries, {"flaky": True}, "FAILED", (1, "y0"), 3),
], ids=["|= $node reference", "update", "del", "retries"])
def test_changes_through_a_held_inputs_dict_or_node_attribute_reach_the_next_run(
        change, params, status, result, attempts):
    @task
    def other(ctx):
        return "from other"

    @task(inputs={"x": 1})
    def echo(ctx, x="x0", y="y0"):
        if ctx.params.get("flaky") and ctx.attempt < 3:
            raise ValueError("attempt %d fails" % ctx.attempt)
        return (x, y)

    flow = Flow("held-inputs")
    flow >> other
    flow >> echo
    engine = quiet()
    first = engine.run(flow, params, raise_on_failure=False)
    assert first.status == status
    assert first.tasks["echo"].attempts == 1
    if status == "COMPLETED":
        assert first.results["echo"] == (1, "y0")
    held = echo.task.inputs                 # held across the runs, changed in place
    change(held, echo.task)
    second = engine.run(flow, params)
    assert second.status == "COMPLETED"
    assert second.results["echo"] == result
    assert second.tasks["echo"].attempts == attempts
    if change is _or_in_a_node_reference:   # the reference also makes `other` run first
        order = [(e["event"], e["task"]) for e in second.events]
        assert order.index(("task.succeeded", "other")) < order.index(("task.started", "echo"))


def test_renaming_a_flow_after_a_run_is_seen_by_the_next_run(tmp_path):
    flow, _ = _one_input_flow()
    assert run_quiet(flow).flow_name == "cache"
    flow.name = "renamed"
    run = quiet(store=tmp_path).run(flow)
    assert run.flow_name == "renamed"
    assert RunStore(tmp_path).get(run.run_id)["flow"] == "renamed"


# ---------------------------------------------------------------------------
# Validation: FlowError before any task runs
# ---------------------------------------------------------------------------

def _validation_flow(kind, ran):
    """A flow with one mistake of the given kind; every task appends to ran."""
    def body(ctx, **kwargs):
        ran.append(ctx.task_name)

    def node(name, **options):
        return task(name=name, **options)(body)

    def needs_day(ctx, day):
        ran.append(ctx.task_name)

    def takes_x(ctx, x):
        ran.append(ctx.task_name)

    flow = Flow("broken")
    flow >> node("canary")              # a root that would run first if anything ran
    if kind == "cycle":
        a, b, c = node("a"), node("b"), node("c")
        flow >> a >> b >> c
        flow.add(a, after=[c])
    elif kind == "cycle-through-node-reference":
        a, b = node("a", inputs={"x": "$node.b.output"}), node("b")
        flow >> a >> b
    elif kind == "self-reference":
        flow >> node("a", inputs={"x": "$node.a.output"})
    elif kind == "missing-node":
        flow >> node("a") >> node("b", inputs={"x": "$node.ghost.output"})
    elif kind.startswith("expr:"):
        flow >> node("a") >> node("b", inputs={"x": kind[5:]})
    elif kind == "missing-parameter":
        flow >> node("a") >> task(name="needy")(needs_day)
    elif kind == "missing-run-param":
        flow >> task(name="reader", inputs={"day": "$ctx.params.day"})(needs_day)
    elif kind == "duplicate-name":
        flow >> node("same") >> Doubler(name="same", inputs={"value": 1})
    elif kind == "duplicate-class-instances":
        flow >> Doubler(inputs={"value": 1}) >> Doubler(inputs={"value": 2})
    elif kind == "unaccepted-input":
        flow >> task(name="picky", inputs={"x": 1, "y": 2})(takes_x)
    else:
        raise AssertionError(kind)
    return flow


VALIDATION_ERRORS = [
    # (kind, words the message must contain)
    ("cycle", ["cycle", "->"]),
    ("cycle-through-node-reference", ["cycle", "->"]),
    ("self-reference", ["a -> a"]),
    ("missing-node", ["'b'", "'ghost'", "not in the flow"]),
    ("expr:$nodes.a.output", ["'b'", "$nodes.a.output"]),
    ("expr:$node.a", ["'b'", "$node.a"]),
    ("expr:$node.a.outputs", ["'b'", "$node.a.outputs"]),
    ("expr:$node..output", ["'b'", "$node..output"]),
    ("expr:$ctx.params", ["'b'", "$ctx.params"]),
    ("expr:$ctx.nope.x", ["'b'", "$ctx.nope.x"]),
    ("expr:$env.", ["'b'", "$env."]),
    ("expr:$env.A.B", ["'b'", "$env.A.B"]),
    ("expr:$foo", ["'b'", "$foo"]),
    ("expr:$", ["'b'"]),
    ("missing-parameter", ["'needy'", "'day'"]),
    ("missing-run-param", ["'reader'", "'day'"]),
    ("duplicate-name", ["'same'"]),
    ("duplicate-class-instances", ["'Doubler'"]),
    ("unaccepted-input", ["'picky'", "'y'"]),
]


@pytest.mark.parametrize("kind, words", VALIDATION_ERRORS, ids=[k for k, _ in VALIDATION_ERRORS])
def test_invalid_flow_raises_flow_error_before_any_task_runs(kind, words):
    ran = []
    flow = _validation_flow(kind, ran)
    with pytest.raises(FlowError) as info:
        Engine(trace=False, workers=4).run(flow)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, pyoco.PyocoError)
    assert ran == []


@pytest.mark.parametrize("kind", [k for k, _ in VALIDATION_ERRORS
                                  if k not in ("missing-parameter", "missing-run-param")])
def test_validate_reports_definition_errors_without_params(kind):
    ran = []
    with pytest.raises(FlowError):
        _validation_flow(kind, ran).validate()
    assert ran == []


def test_cycle_error_carries_the_cycle_path_along_the_edges():
    a, b, c, d = _recorders("abcd", [])
    flow = Flow("loop")
    flow >> d >> a >> b >> c
    flow.add(a, after=[c])
    with pytest.raises(FlowError) as info:
        flow.validate()
    cycle = info.value.cycle
    assert isinstance(cycle, list) and cycle[0] == cycle[-1] and len(cycle) == 4
    assert sorted(cycle[:-1]) == ["a", "b", "c"]
    edges = {("a", "b"), ("b", "c"), ("c", "a")}
    assert all(pair in edges for pair in zip(cycle, cycle[1:])), cycle
    assert " -> ".join(cycle) in str(info.value)


def test_two_node_cycle_is_reported_as_three_names():
    a, b = _recorders("ab", [])
    flow = Flow("two")
    flow >> a >> b
    flow.add(a, after=[b])
    with pytest.raises(FlowError) as info:
        run_quiet(flow)
    assert info.value.cycle in (["a", "b", "a"], ["b", "a", "b"])


def test_flow_error_for_other_problems_has_no_cycle():
    with pytest.raises(FlowError) as info:
        _validation_flow("missing-node", []).validate()
    assert info.value.cycle is None


def test_validate_with_params_checks_required_parameters():
    flow = _validation_flow("missing-parameter", [])
    with pytest.raises(FlowError, match="'day'"):
        flow.validate(params={})
    flow.validate(params={"day": "mon"})


def test_validate_without_params_lists_missing_run_parameters():
    needs = _validation_flow("missing-parameter", []).validate()
    assert ("needy", "day") in [tuple(item) for item in needs]


def test_validate_without_params_accepts_a_ctx_params_reference():
    flow = _validation_flow("missing-run-param", [])
    flow.validate()


# ===========================================================================
# Run state
# ===========================================================================


# ---------------------------------------------------------------------------
# ctx, skip, cancel
# ---------------------------------------------------------------------------

def test_ctx_exposes_run_id_params_results_scratch_task_name_attempt_and_cancelled():
    seen = {}

    @task
    def first(ctx):
        ctx.scratch["shared"] = handle
        seen["first"] = (ctx.run_id, dict(ctx.params), dict(ctx.results), ctx.task_name,
                         ctx.attempt, ctx.cancelled)
        seen["log"] = ctx.log
        return "one"

    @task(retries=1)
    def second(ctx):
        if ctx.attempt == 1:
            raise ValueError("again")
        seen["second"] = (dict(ctx.results), ctx.scratch["shared"], ctx.task_name, ctx.attempt)
        return "two"

    handle = object()
    flow = Flow("ctx")
    flow >> first >> second
    run = quiet().run(flow, {"day": "mon"})
    run_id, params, results, name, attempt, cancelled = seen["first"]
    assert run_id == run.run_id
    assert params == {"day": "mon"}
    assert results == {}
    assert name == "first" and attempt == 1
    assert isinstance(cancelled, threading.Event) and not cancelled.is_set()
    assert seen["second"] == ({"first": "one"}, handle, "second", 2)
    assert isinstance(seen["log"], logging.Logger)


def test_ctx_on_an_executor_instance_has_the_run_data():
    from concurrent.futures import ThreadPoolExecutor
    seen = {}

    @task
    def first(ctx):
        return "one"

    @task(retries=1)
    def second(ctx):
        if ctx.attempt == 1:
            raise ValueError("again")
        seen["second"] = (ctx.run_id, dict(ctx.params), dict(ctx.results), ctx.task_name,
                          ctx.attempt, isinstance(ctx.cancelled, threading.Event))
        return "two"

    flow = Flow("ctx-remote")
    flow >> first >> second
    with ThreadPoolExecutor(2) as pool:
        run = Engine(executor=pool, trace=False).run(flow, {"day": "mon"})
    assert seen["second"] == (run.run_id, {"day": "mon"}, {"first": "one"}, "second", 2, True)


@pytest.mark.parametrize("how", ["ctx.skip", "raise Skip"])
def test_skip_ends_task_skipped_with_reason_and_skips_downstream(make_engine, how):
    ran = []

    @task
    def gate(ctx):
        if how == "ctx.skip":
            ctx.skip("no data today")
        raise Skip("no data today")

    @task
    def downstream(ctx):
        ran.append("downstream")

    @task
    def unrelated(ctx):
        ran.append("unrelated")

    flow = Flow("skip")
    flow >> gate >> downstream
    flow >> unrelated
    run = make_engine().run(flow)
    assert run.status == "COMPLETED"
    assert run.tasks["gate"].state == "SKIPPED"
    assert run.tasks["gate"].reason == "no data today"
    assert run.tasks["downstream"].state == "SKIPPED"
    assert "gate" in run.tasks["downstream"].reason
    assert ran == ["unrelated"]
    assert "gate" not in run.results


def _cancel_setup():
    started, proceed = threading.Event(), threading.Event()
    ran = []

    @task
    def long(ctx):
        ran.append("long")
        started.set()
        assert proceed.wait(WAIT)
        return "kept"

    @task
    def after(ctx):
        ran.append("after")

    @task
    def queued(ctx):
        ran.append("queued")

    flow = Flow("cancel")
    flow >> long >> after
    flow >> queued                      # waits behind `long` on the single worker
    return flow, started, proceed, ran


@contextlib.contextmanager
def _cancel_when_started(engine, run_id, started, proceed, answers=None):
    """Inside the block a thread cancels the run once its task is running, then
    lets the task go on; the block's end joins it."""
    def cancel():
        if started.wait(WAIT):
            answer = engine.cancel(run_id)
            if answers is not None:
                answers.append(answer)
        proceed.set()
    thread = threading.Thread(target=cancel)
    thread.start()
    try:
        yield
    finally:
        thread.join(WAIT)


def test_cancel_from_another_thread_cancels_pending_and_keeps_running_result(make_engine):
    flow, started, proceed, ran = _cancel_setup()
    engine = make_engine(workers=1)
    answers = []
    with _cancel_when_started(engine, "run-to-cancel", started, proceed, answers):
        with pytest.raises(RunCancelled) as info:
            engine.run(flow, run_id="run-to-cancel")
    assert answers == [True]
    run = info.value.run
    assert run.status == "CANCELLED" == pyoco.RunState.CANCELLED
    assert ran == ["long"]
    assert run.tasks["long"].state == "SUCCEEDED"
    assert run.results["long"] == "kept"
    assert run.tasks["after"].state == "CANCELLED"
    assert run.tasks["queued"].state == "CANCELLED"
    assert run.tasks["after"].reason
    run_events = [(e["event"], e["state"]) for e in run.events if e["task"] is None]
    assert run_events == [("run.started", "RUNNING"), ("run.cancelling", "CANCELLING"),
                          ("run.cancelled", "CANCELLED")]
    assert isinstance(info.value, pyoco.PyocoError)


def test_cancel_sets_ctx_cancelled_for_running_tasks():
    started = threading.Event()

    @task
    def polite(ctx):
        started.set()
        return ctx.cancelled.wait(WAIT)     # True only if the cancel reached the task

    flow = Flow("polite")
    flow >> polite
    engine = quiet()
    thread = threading.Thread(target=lambda: started.wait(WAIT) and engine.cancel("p1"))
    thread.start()
    try:
        run = engine.run(flow, run_id="p1", raise_on_failure=False)
    finally:
        thread.join(WAIT)
    assert run.status == "CANCELLED"
    assert run.results["polite"] is True


def test_cancelled_run_is_returned_when_raise_on_failure_is_false(make_engine):
    flow, started, proceed, ran = _cancel_setup()
    engine = make_engine(workers=1)
    with _cancel_when_started(engine, "r2", started, proceed):
        run = engine.run(flow, run_id="r2", raise_on_failure=False)
    assert run.status == "CANCELLED"


def test_all_done_cleanup_still_runs_after_a_cancel_and_the_run_ends_cancelled(make_engine):
    started, proceed = threading.Event(), threading.Event()

    @task
    def slow(ctx):
        started.set()
        assert proceed.wait(WAIT)           # set once the run is cancelled
        return "kept"

    @task
    def next_step(ctx):
        return "never"

    @task(run_if="all_done")
    def cleanup(ctx, next_step):
        return ("cleaned", next_step)

    @task(run_if="any_failed")
    def alert(ctx):
        return "never"

    flow = Flow("cleanup-after-cancel")
    flow >> slow >> next_step >> [cleanup, alert]
    engine = make_engine()
    with _cancel_when_started(engine, "cc", started, proceed):
        run = engine.run(flow, run_id="cc", raise_on_failure=False)
    assert run.status == "CANCELLED"
    assert {name: r.state for name, r in run.tasks.items()} == {
        "slow": "SUCCEEDED", "next_step": "CANCELLED", "cleanup": "SUCCEEDED",
        "alert": "CANCELLED"}
    assert run.results["cleanup"] == ("cleaned", None)


def test_cancel_of_an_unknown_run_returns_false():
    assert quiet().cancel("no-such-run") is False


def test_live_run_is_the_run_while_it_runs_and_none_after(make_engine):
    engine = make_engine()
    seen = {}

    @task
    def look(ctx):
        live = engine.live_run(ctx.run_id)
        seen["live"] = live
        seen["status"] = live.status if live is not None else None
        seen["state"] = live.tasks["look"].state if live is not None else None
        return ctx.run_id

    flow = Flow("live")
    flow >> look
    run = engine.run(flow)
    assert seen["live"] is run
    assert (seen["status"], seen["state"]) == ("RUNNING", "RUNNING")
    assert engine.live_run(run.run_id) is None
    assert engine.live_run("no-such-run") is None


# ===========================================================================
# Scheduling
# ===========================================================================


# ---------------------------------------------------------------------------
# Parallelism
# ---------------------------------------------------------------------------

def test_independent_tasks_run_concurrently(make_engine):
    barrier = threading.Barrier(8, timeout=WAIT)

    def meet(ctx):
        barrier.wait()          # raises BrokenBarrierError unless all 8 run at once
        return ctx.task_name

    flow = Flow("barrier")
    for i in range(8):
        flow >> task(name="t%d" % i)(meet)
    run = make_engine(workers=8).run(flow)
    assert run.status == "COMPLETED" and len(run.results) == 8


def test_eight_sleeping_tasks_on_eight_workers_all_sleep_at_the_same_time(make_engine):
    spans = {}

    def nap(ctx):
        began = time.monotonic()
        time.sleep(0.5)
        spans[ctx.task_name] = (began, time.monotonic())

    flow = Flow("naps")
    for i in range(8):
        flow >> task(name="nap%d" % i)(nap)
    make_engine(workers=8).run(flow)
    assert len(spans) == 8
    # the last to fall asleep did so before the first woke up
    assert max(b for b, _ in spans.values()) < min(e for _, e in spans.values()), spans


def _concurrency_probe(n, barrier=None):
    lock = threading.Lock()
    state = {"now": 0, "max": 0}

    def probe(ctx):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            if barrier is not None:
                barrier.wait()
            else:
                time.sleep(0.02)        # work
        finally:
            with lock:
                state["now"] -= 1

    flow = Flow("probe")
    for i in range(n):
        flow >> task(name="p%d" % i)(probe)
    return flow, state


def test_one_worker_runs_one_task_at_a_time(make_engine):
    flow, state = _concurrency_probe(6)
    run = make_engine(workers=1).run(flow)
    assert run.status == "COMPLETED"
    assert state["max"] == 1


def test_workers_bound_the_number_of_running_tasks(make_engine):
    barrier = threading.Barrier(3, timeout=WAIT)
    flow, state = _concurrency_probe(9, barrier)
    run = make_engine(workers=3).run(flow)
    assert run.status == "COMPLETED"
    assert state["max"] == 3


def test_large_random_dag_runs_each_task_once_after_all_its_parents(make_engine):
    rng = random.Random(20261129)
    log = []

    def body(ctx):
        log.append(("start", ctx.task_name))
        log.append(("end", ctx.task_name))

    layers, width = 20, 100
    nodes, parents = [], {}
    flow = Flow("big")
    for layer in range(layers):
        for k in range(width):
            node = task(name="t%d_%d" % (layer, k))(body)
            if layer == 0:
                flow.add(node)
                parents[node.task.name] = []
            else:
                ups = rng.sample(nodes, rng.randint(1, 3))
                flow.add(node, after=ups)
                parents[node.task.name] = [u.task.name for u in ups]
            nodes.append(node)
    run = make_engine(workers=8).run(flow)
    assert run.status == "COMPLETED"
    starts = [name for kind, name in log if kind == "start"]
    assert len(starts) == layers * width
    assert sorted(starts) == sorted(parents)
    _assert_ran_after(log, [(up, child) for child, ups in parents.items() for up in ups])
    assert all(r.state == "SUCCEEDED" for r in run.tasks.values())


def test_diamond_join_receives_both_branch_outputs(make_engine):
    @task
    def source(ctx):
        return 10

    @task
    def left(ctx, source):
        return source + 1

    @task
    def right(ctx, source):
        return source * 2

    @task
    def join(ctx, left, right):
        return left + right

    flow = Flow("diamond")
    flow >> source >> [left, right] >> join
    assert make_engine().run(flow).results["join"] == 31


# ---------------------------------------------------------------------------
# Retries and timeouts
# ---------------------------------------------------------------------------

def test_flaky_task_is_retried_with_doubling_delay(make_engine):
    calls = []

    @task(retries=3, retry_delay=0.05)
    def flaky(ctx):
        calls.append((time.monotonic(), ctx.attempt))
        if ctx.attempt < 4:
            raise ValueError("attempt %d" % ctx.attempt)
        return "finally"

    flow = Flow("retry")
    flow >> flaky
    run = make_engine().run(flow)
    assert run.results["flaky"] == "finally"
    assert [attempt for _, attempt in calls] == [1, 2, 3, 4]
    gaps = [b - a for (a, _), (b, _) in zip(calls, calls[1:])]
    for gap, delay in zip(gaps, (0.05, 0.1, 0.2)):
        assert gap >= delay * 0.9, gaps
    assert sum(gaps) < 2.0
    retries = [e for e in run.events if e["event"] == "task.retrying"]
    assert [e["delay_s"] for e in retries] == [0.05, 0.1, 0.2]
    assert run.tasks["flaky"].attempts == 4


def test_task_failing_every_attempt_is_called_retries_plus_one_times(make_engine):
    calls = []

    @task(retries=2)
    def hopeless(ctx):
        calls.append(ctx.attempt)
        raise RuntimeError("never")

    flow = Flow("hopeless")
    flow >> hopeless
    run = make_engine().run(flow, raise_on_failure=False)
    assert calls == [1, 2, 3]
    assert run.tasks["hopeless"].state == "FAILED"
    assert run.tasks["hopeless"].attempts == 3
    assert run.tasks["hopeless"].error == "RuntimeError: never"


def test_retry_delay_is_capped_by_max_retry_delay(make_engine):
    @task(retries=3, retry_delay=0.04)
    def flaky(ctx):
        raise ValueError("x")

    flaky.task.max_retry_delay = 0.06
    flow = Flow("cap")
    flow >> flaky
    run = make_engine().run(flow, raise_on_failure=False)
    assert [e["delay_s"] for e in run.events if e["event"] == "task.retrying"] == [
        0.04, 0.06, 0.06]


def test_timeout_fails_the_task_at_the_deadline(make_engine):
    release = threading.Event()

    @task(timeout=0.3)
    def sleepy(ctx):
        release.wait(5)         # stands for a 5 s job
        return "too late"

    flow = Flow("timeout")
    flow >> sleepy
    events = Events()
    try:
        with pytest.raises(RunFailed) as info:
            make_engine(observers=[events]).run(flow)
        elapsed = events.since("task.started", "sleepy")
    finally:
        release.set()
    assert elapsed < 3.0                # well before the 5 s job would end
    run = info.value.run
    assert run.tasks["sleepy"].state == "FAILED"
    assert run.tasks["sleepy"].error.startswith("TimeoutError")
    assert isinstance(info.value.__cause__, TimeoutError)
    assert "sleepy" not in run.results


def test_timeout_applies_to_each_attempt(make_engine):
    release = threading.Event()
    calls = []

    @task(timeout=0.1, retries=1)
    def slow_then_fast(ctx):
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            release.wait(5)
        return ctx.attempt

    flow = Flow("timeout-retry")
    flow >> slow_then_fast
    try:
        run = make_engine().run(flow)
    finally:
        release.set()
    assert run.results["slow_then_fast"] == 2
    assert calls == [1, 2]


@pytest.mark.parametrize("executor", [
    "thread",
    pytest.param("executor instance"),
])
def test_an_attempt_given_up_at_its_timeout_changes_nothing_when_it_wakes_up(tmp_path,
                                                                            executor):
    from concurrent.futures import ThreadPoolExecutor
    release, woke = threading.Event(), threading.Event()
    tried = []                  # what the given-up attempt tried, and the error it got

    @task(timeout=0.3, retries=1)
    def report(ctx):
        if ctx.attempt == 1:
            release.wait(WAIT)          # past its deadline, until the run has ended
            try:
                ctx.save_artifact("report.txt", "late")
                tried.append(("artifact", None))
            except Exception as exc:
                tried.append(("artifact", exc))
            try:
                ctx.scratch["late"] = 1
                tried.append(("scratch", None))
            except Exception as exc:
                tried.append(("scratch", exc))
            woke.set()
            return "late"
        ctx.save_artifact("report.txt", "second")
        return "second"

    flow = Flow("given-up")
    flow >> report
    pool = ThreadPoolExecutor(2) if executor == "executor instance" else None
    try:
        run = Engine(trace=False, store=tmp_path, executor=pool or executor).run(flow)
        assert run.status == "COMPLETED"
        assert (run.tasks["report"].attempts, run.results["report"]) == (2, "second")
        record_file = tmp_path / "runs" / run.run_id / "run.json"
        before = record_file.read_bytes()
        release.set()
        assert woke.wait(WAIT), "the given-up attempt never got to its writes"
    finally:
        release.set()
        if pool is not None:
            pool.shutdown(wait=True)
    assert [what for what, _ in tried] == ["artifact", "scratch"]
    stored = run.tasks["report"].artifacts["report.txt"]
    assert run.artifacts["report.txt"] == stored
    assert Path(stored).read_text() == "second", tried
    assert "late" not in run.scratch
    assert record_file.read_bytes() == before
    assert RunStore(tmp_path).get(run.run_id)["tasks"]["report"]["artifacts"] == {
        "report.txt": stored}


def test_skip_inside_a_task_with_a_timeout_is_a_skip(make_engine):
    @task(timeout=2)
    def gate(ctx):
        ctx.skip("nothing to do")

    flow = Flow("timeout-skip")
    flow >> gate
    run = make_engine().run(flow)
    assert run.status == "COMPLETED"
    assert (run.tasks["gate"].state, run.tasks["gate"].reason) == ("SKIPPED", "nothing to do")


def test_map_instances_wait_their_tasks_retry_delay():
    calls = []

    @task
    def items(ctx):
        return [1]

    @task(retries=1, retry_delay=0.3)
    def flaky(ctx, item):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ValueError("first try")
        return item

    flow = Flow("map-retry")
    flow >> items >> flaky.map("$node.items.output")
    run = Engine(trace=False).run(flow)
    assert run.results["flaky"] == [1]
    assert calls[1] - calls[0] >= 0.29


# ---------------------------------------------------------------------------
# Failure policies
# ---------------------------------------------------------------------------

def test_stop_policy_starts_nothing_new_and_skips_what_never_started(make_engine):
    ran, raised = [], []
    third_skipped = threading.Event()

    def watch(run, event):
        if event.kind == "task.skipped" and event.task == "third":
            third_skipped.set()

    @task
    def slow(ctx):
        ran.append("slow")
        assert third_skipped.wait(WAIT)     # still running when `boom` stops the run
        return "slow result"

    @task
    def boom(ctx):
        ran.append("boom")
        exc = ValueError("bad value")
        raised.append(exc)
        raise exc

    def body(ctx):
        ran.append(ctx.task_name)

    third, after_slow, after_boom = (task(name=n)(body) for n in
                                     ("third", "after_slow", "after_boom"))
    flow = Flow("stop")
    flow >> slow >> after_slow
    flow >> boom >> after_boom
    flow >> third
    with pytest.raises(RunFailed) as info:
        make_engine(workers=2, observers=[watch]).run(flow)
    run = info.value.run
    assert info.value.__cause__ is raised[0]
    assert run.status == "FAILED"
    assert sorted(ran) == ["boom", "slow"]
    states = {name: r.state for name, r in run.tasks.items()}
    assert states == {"slow": "SUCCEEDED", "after_slow": "SKIPPED", "boom": "FAILED",
                      "after_boom": "SKIPPED", "third": "SKIPPED"}
    assert run.results["slow"] == "slow result"
    for name in ("after_slow", "after_boom", "third"):
        assert run.tasks[name].reason


def test_stop_policy_with_one_worker_never_starts_a_queued_root(make_engine):
    ran = []

    @task
    def boom(ctx):
        ran.append("boom")
        raise ValueError("x")

    @task
    def other(ctx):
        ran.append("other")

    flow = Flow("stop-one")
    flow >> boom
    flow >> other
    run = make_engine(workers=1).run(flow, raise_on_failure=False)
    assert ran == ["boom"]
    assert run.tasks["other"].state == "SKIPPED"


def test_stop_policy_drops_a_retry_that_is_waiting_for_its_delay(make_engine):
    calls = []
    retrying = threading.Event()
    events = Events()

    def watch(run, event):
        events(run, event)
        if event[1] == "task.retrying":
            retrying.set()

    @task(retries=1, retry_delay=3.0)
    def patient(ctx):
        calls.append(ctx.attempt)
        raise ValueError("try again later")

    @task
    def boom(ctx):
        assert retrying.wait(WAIT)          # fail while `patient` waits for its retry
        raise ValueError("stop everything")

    flow = Flow("stop-retry")
    flow >> patient
    flow >> boom
    run = make_engine(workers=2, observers=[watch]).run(flow, raise_on_failure=False)
    elapsed = events.since("task.retrying", "patient")
    assert run.status == "FAILED"
    assert calls == [1]
    assert run.tasks["patient"].state == "FAILED"
    assert elapsed < 3.0                # the run ended without waiting out the retry's delay


def _broken_flow(name, message):
    """A flow whose one task, broken, raises ValueError(message)."""
    @task
    def broken(ctx):
        raise ValueError(message)

    flow = Flow(name)
    flow >> broken
    return flow


def _run_failed(engine, flow):
    """The RunFailed that running ``flow`` raises."""
    with pytest.raises(RunFailed) as info:
        engine.run(flow)
    return info.value


def test_run_failed_message_names_the_task_and_first_error(make_engine):
    failure = _run_failed(make_engine(), _broken_flow("msg", "bad value"))
    assert "broken" in str(failure) and "bad value" in str(failure)
    assert isinstance(failure.__cause__, ValueError)
    assert isinstance(failure, pyoco.PyocoError)


def test_isolate_skips_only_downstream_of_failure(make_engine):
    ran = []

    def body(ctx):
        ran.append(ctx.task_name)
        return ctx.task_name

    @task(fail_policy="isolate")
    def boom(ctx):
        ran.append("boom")
        raise ValueError("isolated")

    a, b, c, d1, d2, join = (task(name=n)(body) for n in ("a", "b", "c", "d1", "d2", "join"))
    flow = Flow("isolate")
    flow >> boom >> d1 >> d2
    flow >> a >> b >> c
    flow.add(join, after=[c, d1])
    run = make_engine(workers=1).run(flow, raise_on_failure=False)   # a's branch starts after boom
    assert run.status == "FAILED"
    states = {name: r.state for name, r in run.tasks.items()}
    assert states == {"boom": "FAILED", "d1": "SKIPPED", "d2": "SKIPPED", "a": "SUCCEEDED",
                      "b": "SUCCEEDED", "c": "SUCCEEDED", "join": "SKIPPED"}
    assert sorted(ran) == ["a", "b", "boom", "c"]
    assert "boom" in run.tasks["d1"].reason
    with pytest.raises(RunFailed) as info:
        make_engine(workers=1).run(flow)
    assert isinstance(info.value.__cause__, ValueError)


def test_raise_on_failure_false_returns_the_failed_run(make_engine):
    run = make_engine().run(_broken_flow("no-raise", "nope"), raise_on_failure=False)
    assert run.status == "FAILED"
    assert run.tasks["broken"].error == "ValueError: nope"
    assert isinstance(run.tasks["broken"].exception, ValueError)


def test_first_failure_is_the_cause_when_several_tasks_fail(make_engine):
    errors = []

    @task(fail_policy="isolate")
    def first(ctx):
        errors.append(ValueError("first"))
        raise errors[-1]

    @task(fail_policy="isolate")
    def second(ctx):
        errors.append(KeyError("second"))
        raise errors[-1]

    flow = Flow("two-failures")
    flow >> first
    flow >> second
    with pytest.raises(RunFailed) as info:
        make_engine(workers=1).run(flow)
    assert info.value.__cause__ is errors[0]


@pytest.mark.parametrize("executor", [
    "thread",
    pytest.param("process"),
    pytest.param("executor instance"),
])
def test_an_internal_error_while_scheduling_ends_the_run_failed_instead_of_hanging(
        tmp_path, monkeypatch, capsys, executor):
    from concurrent.futures import ThreadPoolExecutor
    released = pyoco._Scheduler.released

    def broken(self, i, ok):
        if self.plan.names[i] == "_exec_letters":
            raise RuntimeError("bug in released")
        return released(self, i, ok)

    monkeypatch.setattr(pyoco._Scheduler, "released", broken)
    flow = Flow("internal-error")
    flow >> _exec_letters >> _exec_after_gate
    pool = ThreadPoolExecutor(2) if executor == "executor instance" else None
    engine = Engine(trace=False, store=tmp_path, executor=pool or executor)
    outcome = {}

    def run_it():
        try:
            outcome["run"] = engine.run(flow)
        except RunFailed as exc:
            outcome["run"] = exc.run
        except BaseException as exc:    # anything else escaped: the run did not end
            outcome["escaped"] = exc

    runner = threading.Thread(target=run_it, daemon=True)
    runner.start()
    runner.join(2 * WAIT)
    if pool is not None:
        pool.shutdown(wait=False)
    assert not runner.is_alive(), "the run hangs"
    assert "escaped" not in outcome, outcome
    run = outcome["run"]
    assert run.status == "FAILED"
    assert run.reason.startswith("pyoco internal error") and "bug in released" in run.reason
    assert run.tasks["_exec_after_gate"].state == "SKIPPED"
    assert run.events[-1]["event"] == "run.failed"
    record = RunStore(tmp_path).get(run.run_id)
    assert (record["status"], record["reason"]) == ("FAILED", run.reason)
    assert "pyoco: warning: internal error" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Map: dynamic fan-out
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["stop", "isolate"])
def test_a_map_whose_instance_fails_is_failed_and_skips_what_is_downstream(make_engine,
                                                                            policy):
    @task
    def items(ctx):
        return [0, 1, 2, 3, 4]

    @task(fail_policy=policy)
    def work(ctx, item):
        if item == 2:
            raise ValueError("item 2 is bad")
        return item * 10

    @task
    def total(ctx, work):
        return sum(work)

    flow = Flow("map-fails")
    flow >> items >> work.map("$node.items.output") >> total
    with pytest.raises(RunFailed) as info:
        make_engine(workers=2).run(flow)
    run = info.value.run
    assert run.status == "FAILED"
    assert isinstance(info.value.__cause__, ValueError)         # the instance's own error
    assert run.tasks["work[2]"].state == "FAILED"
    node = run.tasks["work"]
    assert node.state == "FAILED"                               # not SKIPPED
    assert "work[2]" in node.error and "item 2 is bad" in node.error
    assert run.tasks["total"].state == "SKIPPED"
    assert "work" not in run.results and "total" not in run.results
    if policy == "isolate":
        assert {k: run.tasks["work[%d]" % k].state for k in (0, 1, 3, 4)} == dict.fromkeys(
            (0, 1, 3, 4), "SUCCEEDED")


def test_a_map_of_a_map_is_a_flow_error_saying_what_to_do_instead():
    @task
    def work(ctx, item):
        return item

    mapped = work.map([[1, 2], [3]])
    with pytest.raises(FlowError, match="map of a map") as info:
        mapped.map("$node.work.output")
    assert "'work'" in str(info.value) and "flat list" in str(info.value)


# ---------------------------------------------------------------------------
# Pools, max_parallel and start rates (SPEC 12)
# ---------------------------------------------------------------------------

def _overlap_probe(parties):
    """A task body that counts how many tasks using it run at once (``state["max"]``
    is the peak). Each waits at a Barrier of ``parties`` inside, so that as many
    overlap as the limit lets; a limit below ``parties`` breaks the barrier."""
    lock = threading.Lock()
    state = {"now": 0, "max": 0}
    barrier = threading.Barrier(parties, timeout=WAIT)

    def body(ctx, item):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            barrier.wait()
        finally:
            with lock:
                state["now"] -= 1
        return item

    return body, state


def _instance_states(run, name, n):
    return [run.tasks["%s[%d]" % (name, k)].state for k in range(n)]


def test_a_pool_of_2_runs_at_most_2_of_20_map_instances_on_8_workers(make_engine):
    body, state = _overlap_probe(2)
    work = task(name="work", pool="api")(body)
    flow = Flow("pool-of-2", pools={"api": 2})
    flow >> work.map(list(range(20)))
    run = make_engine(workers=8).run(flow)
    assert state["max"] == 2
    assert _instance_states(run, "work", 20) == ["SUCCEEDED"] * 20
    assert run.results["work"] == list(range(20))


def test_engine_pools_override_the_flows_size(make_engine):
    body, state = _overlap_probe(4)
    work = task(name="work", pool="api")(body)
    flow = Flow("pool-override", pools={"api": 2})
    flow >> work.map(list(range(20)))
    run = make_engine(workers=8, pools={"api": 4}).run(flow)
    assert state["max"] == 4
    assert _instance_states(run, "work", 20) == ["SUCCEEDED"] * 20


def test_engine_pools_may_declare_a_pool_the_flow_does_not(make_engine):
    body, state = _overlap_probe(3)
    work = task(name="work", pool="db")(body)
    flow = Flow("engine-pool")
    flow >> work.map(list(range(12)))
    run = make_engine(workers=8, pools={"db": 3}).run(flow)
    assert state["max"] == 3 and run.status == "COMPLETED"


def test_max_parallel_runs_at_most_that_many_instances_of_a_map(make_engine):
    body, state = _overlap_probe(3)
    work = task(name="work", max_parallel=3)(body)
    flow = Flow("capped")
    flow >> work.map(list(range(21)))
    run = make_engine(workers=8).run(flow)
    assert state["max"] == 3
    assert _instance_states(run, "work", 21) == ["SUCCEEDED"] * 21


def test_a_pool_shared_by_two_tasks_counts_the_instances_of_both(make_engine):
    body, state = _overlap_probe(2)         # one counter and one barrier for both tasks
    first = task(name="first", pool="api")(body)
    second = task(name="second", pool="api")(body)
    flow = Flow("shared-pool", pools={"api": 2})
    flow >> first.map(list(range(10)))
    flow >> second.map(list(range(10, 20)))
    run = make_engine(workers=8).run(flow)
    assert state["max"] == 2
    assert _instance_states(run, "first", 10) + _instance_states(run, "second", 10) == [
        "SUCCEEDED"] * 20


# Module level, so that worker processes can unpickle them. Tasks in other
# processes share no memory, so the test counts them in its own process with
# an observer; each waits (at most WAIT) for the file named by the run
# parameter "go", which the observer creates once as many run at once as the
# limit lets.
def _wait_for_go(ctx):
    go = ctx.params["go"]
    deadline = time.monotonic() + WAIT
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError("nobody created %s" % go)
        time.sleep(0.01)


@task(pool="api")
def _pooled_call(ctx, item):
    _wait_for_go(ctx)
    return item


@task(max_parallel=3)
def _capped_call(ctx, item):
    _wait_for_go(ctx)
    return item


class _RunningInstances:
    """An observer counting map instances that have started and not yet ended,
    with the peak. Events come in order, so the count is what ran at once; at
    ``opens`` running it creates the file ``go``."""

    ENDS = ("task.succeeded", "task.failed", "task.skipped", "task.cancelled")

    def __init__(self, go, opens):
        self.lock = threading.Lock()
        self.running = set()
        self.peak = 0
        self.go, self.opens = go, opens

    def __call__(self, run, event):
        if event.task is None or "[" not in event.task:
            return
        with self.lock:
            if event.kind == "task.started":
                self.running.add(event.task)
                self.peak = max(self.peak, len(self.running))
                if len(self.running) >= self.opens and not self.go.exists():
                    self.go.touch()
            elif event.kind in self.ENDS:
                self.running.discard(event.task)


@contextlib.contextmanager
def _engine_on(executor, **options):
    """A quiet Engine on a process pool or on a ThreadPoolExecutor instance."""
    if executor == "process":
        yield Engine(executor="process", trace=False, **options)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(16) as pool:
        yield Engine(executor=pool, trace=False, **options)


@pytest.mark.parametrize("executor", ["process", "executor instance"])
@pytest.mark.parametrize("limit", ["pool of 2", "max_parallel=3"])
def test_pools_and_max_parallel_hold_on_processes_and_executor_instances(tmp_path, executor,
                                                                          limit):
    size, work = (2, _pooled_call) if limit == "pool of 2" else (3, _capped_call)
    counter = _RunningInstances(tmp_path / "go", size)
    flow = Flow("limits-elsewhere", pools={"api": 2})
    flow >> work.map(list(range(12)))
    with _engine_on(executor, workers=8, observers=[counter]) as engine:
        run = engine.run(flow, {"go": str(tmp_path / "go")})
    assert counter.peak == size
    assert _instance_states(run, work.task.name, 12) == ["SUCCEEDED"] * 12
    assert run.results[work.task.name] == list(range(12))


@task
def _busy_elsewhere():
    return "busy"


@task(pool="api")
def _pooled_after_busy():
    return "pooled"


@pytest.mark.parametrize("executor", ["process", "executor instance"])
def test_a_task_queued_behind_a_busy_worker_takes_its_pool_slot_once(executor):
    flow = Flow("slot-once", pools={"api": 1})
    flow >> _busy_elsewhere
    flow >> _pooled_after_busy
    with _engine_on(executor, workers=1) as engine:
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(run=engine.run(
            flow, run_id="slot-once", raise_on_failure=False)), daemon=True)
        thread.start()
        thread.join(3.0)            # a hang guard: the run takes milliseconds
        hung = thread.is_alive()
        if hung:                # end the hung run, so the test leaves nothing running
            engine.cancel("slot-once")
            thread.join(WAIT)
    assert not hung, "the run hung, its tasks: %s" % (outcome.get("run") and {
        name: r.state for name, r in outcome["run"].tasks.items()})
    assert outcome["run"].status == "COMPLETED"
    assert outcome["run"].results == {"_busy_elsewhere": "busy", "_pooled_after_busy": "pooled"}


def test_a_task_waiting_for_a_pool_slot_is_pending_holds_no_worker_and_is_timed_from_its_start(
        make_engine):
    free_done = threading.Event()
    lock = threading.Lock()
    seen = {}

    def watch(run, event):
        if event.kind == "task.succeeded" and event.task == "free":
            free_done.set()

    def pooled(ctx):
        with lock:
            holder = seen.setdefault("holder", ctx.task_name) == ctx.task_name
        if holder:
            # The other pool task is ready but waits for this one's slot. On 2
            # workers `free` can only run meanwhile if the waiting task holds none.
            seen["free ran meanwhile"] = free_done.wait(WAIT)
            other = "two" if ctx.task_name == "one" else "one"
            seen["other state"] = engine.live_run(ctx.run_id).tasks[other].state
            threading.Event().wait(0.5)         # work, while holding the slot
        return ctx.task_name

    @task
    def free(ctx):
        return "free"

    flow = Flow("waiting", pools={"api": 1})
    flow >> task(name="one", pool="api")(pooled)
    flow >> task(name="two", pool="api")(pooled)
    flow >> free
    engine = make_engine(workers=2, observers=[watch])
    run = engine.run(flow)
    holder = seen["holder"]
    waiter = "two" if holder == "one" else "one"
    assert seen["free ran meanwhile"] is True
    assert seen["other state"] == "PENDING"
    held, waited = run.tasks[holder], run.tasks[waiter]
    assert held.duration_ms >= 500
    assert waited.started >= held.ended - 0.001         # it started once the slot was free
    assert waited.started - run.started_at >= 0.5       # so it waited half a second or more,
    assert waited.duration_ms < 200                     # but its duration is its attempt's
    kinds = [(e["event"], e["task"]) for e in run.events]
    assert kinds.index(("task.started", waiter)) > kinds.index(("task.succeeded", holder))


def test_tasks_waiting_for_a_pool_slot_end_cancelled_when_the_run_is_cancelled(make_engine):
    started, proceed = threading.Event(), threading.Event()

    @task(pool="api")
    def work(ctx, item):
        started.set()
        assert proceed.wait(WAIT)           # set once the run is cancelled
        return item

    @task(run_if="all_done")
    def tidy(ctx):
        return "tidied"

    flow = Flow("cancel-waiting", pools={"api": 1})
    flow >> work.map([1, 2, 3, 4]) >> tidy
    engine = make_engine()
    with _cancel_when_started(engine, "cw", started, proceed):
        run = engine.run(flow, run_id="cw", raise_on_failure=False)
    assert run.status == "CANCELLED"
    states = _instance_states(run, "work", 4)
    assert sorted(states) == ["CANCELLED"] * 3 + ["SUCCEEDED"]     # one held the slot
    for k, state in enumerate(states):
        if state == "CANCELLED":
            assert run.tasks["work[%d]" % k].reason == "cancelled by Engine.cancel"
            assert run.tasks["work[%d]" % k].attempts == 0
    assert run.results["tidy"] == "tidied"


def _starts_in_a_window(times, period, slack=0.05):
    """The most of ``times`` within any window of ``period`` seconds. ``slack``
    allows for the moments between a start and the task reading the clock."""
    times = sorted(times)
    return max(sum(1 for t in times[k:] if t < start + period - slack)
               for k, start in enumerate(times))


def test_a_pool_rate_spaces_the_starts_of_its_tasks(make_engine):
    starts = []

    @task(pool="r")
    def call(ctx, item):
        starts.append(time.monotonic())
        return item

    flow = Flow("rated", pools={"r": {"size": 10, "rate": "5/s"}})
    flow >> call.map(list(range(12)))
    run = make_engine(workers=12).run(flow)
    assert max(starts) - min(starts) < 2 * WAIT       # a hang guard
    assert _instance_states(run, "call", 12) == ["SUCCEEDED"] * 12
    assert len(starts) == 12
    assert _starts_in_a_window(starts, 1.0) == 5        # five at once, then no more that second
    assert max(starts) - min(starts) >= 1.9             # 5 + 5 + 2 starts span two seconds


def test_a_retry_counts_as_a_start_of_its_pools_rate(make_engine):
    starts = []

    @task(pool="r", retries=2)
    def flaky(ctx):
        starts.append(time.monotonic())
        if ctx.attempt < 3:
            raise ValueError("not yet")
        return ctx.attempt

    flow = Flow("rated-retries", pools={"r": {"size": 10, "rate": "2/s"}})
    flow >> flaky
    run = make_engine().run(flow)
    assert max(starts) - min(starts) < 2 * WAIT       # a hang guard
    assert run.results["flaky"] == 3 and run.tasks["flaky"].attempts == 3
    assert len(starts) == 3
    assert _starts_in_a_window(starts, 1.0) <= 2
    assert starts[2] - starts[0] >= 0.95


BAD_POOLS = [
    # (pools, words the FlowError must contain)
    ({"api": 0}, ["'api'", "size", "0"]),
    ({"api": "x"}, ["'api'", "size", "'x'"]),
    ({"api": {"size": 2, "rat": "10/s"}}, ["'api'", "'rat'", "did you mean 'rate'"]),
    ({"api": {"size": 2, "rate": "10/sec"}}, ["'api'", "'10/sec'", "'10/s'"]),
    ({"api": {"size": 2, "rate": "0/s"}}, ["'api'", "'0/s'"]),
]


@pytest.mark.parametrize("pools, words", BAD_POOLS, ids=[repr(c[0]) for c in BAD_POOLS])
@pytest.mark.parametrize("where", ["Flow", "Engine"])
def test_a_bad_pool_definition_is_a_flow_error_naming_the_pool(pools, words, where):
    with pytest.raises(FlowError) as info:
        Flow("bad-pool", pools=pools) if where == "Flow" else Engine(pools=pools)
    for word in words:
        assert word in str(info.value)


def test_a_task_naming_an_undeclared_pool_fails_the_run_before_anything_runs():
    ran, events = [], []

    @task
    def first(ctx):
        ran.append("first")

    @task(pool="apy")
    def call(ctx):
        ran.append("call")

    flow = Flow("undeclared", pools={"api": 2})
    flow >> first >> call
    engine = quiet(observers=[lambda run, event: events.append(event)])
    with pytest.raises(FlowError) as info:
        engine.run(flow)
    message = str(info.value)
    for word in ("'call'", "'apy'", "pools={'apy': 2}", "--pool apy=", "did you mean 'api'"):
        assert word in message
    assert ran == [] and events == []
    assert quiet(pools={"apy": 1}).run(flow).status == "COMPLETED"


def test_a_flow_naming_an_undeclared_pool_leaves_nothing_in_the_store(tmp_path):
    @task(pool="nowhere")
    def call(ctx):
        return 1

    flow = Flow("undeclared-store")
    flow >> call
    with pytest.raises(FlowError):
        quiet(store=tmp_path / "store").run(flow)
    assert store_files(tmp_path / "store") == []
    assert not list((tmp_path / "store").glob("runs/*"))


# ---------------------------------------------------------------------------
# run_if, handlers and when (SPEC 12)
# ---------------------------------------------------------------------------

_STOPPED = "run stopped after 'a' failed"

# (how a ends, fail_policy of a, d's run_if) -> (d's state, the run's status,
# d's reason when it is skipped). b always succeeds.
RUN_IF_TABLE = {}
for _policy in ("stop", "isolate"):
    RUN_IF_TABLE.update({
        ("SUCCEEDED", _policy, "all_succeeded"): ("SUCCEEDED", "COMPLETED", None),
        ("SUCCEEDED", _policy, "none_failed"): ("SUCCEEDED", "COMPLETED", None),
        ("SUCCEEDED", _policy, "any_succeeded"): ("SUCCEEDED", "COMPLETED", None),
        ("SUCCEEDED", _policy, "all_done"): ("SUCCEEDED", "COMPLETED", None),
        ("SUCCEEDED", _policy, "any_failed"): (
            "SKIPPED", "COMPLETED", "run_if='any_failed' not met: 'a' succeeded, 'b' succeeded"),
        ("SKIPPED", _policy, "all_succeeded"): ("SKIPPED", "COMPLETED", "upstream 'a' skipped"),
        ("SKIPPED", _policy, "none_failed"): ("SUCCEEDED", "COMPLETED", None),
        ("SKIPPED", _policy, "any_succeeded"): ("SUCCEEDED", "COMPLETED", None),
        ("SKIPPED", _policy, "all_done"): ("SUCCEEDED", "COMPLETED", None),
        ("SKIPPED", _policy, "any_failed"): (
            "SKIPPED", "COMPLETED", "run_if='any_failed' not met: 'a' skipped, 'b' succeeded"),
        ("FAILED", _policy, "all_done"): ("SUCCEEDED", "FAILED", None),
        ("FAILED", _policy, "any_failed"): ("SUCCEEDED", "FAILED", None),
    })
RUN_IF_TABLE.update({
    # "stop": nothing new starts after a failure but all_done and any_failed tasks
    ("FAILED", "stop", "all_succeeded"): ("SKIPPED", "FAILED", _STOPPED),
    ("FAILED", "stop", "none_failed"): ("SKIPPED", "FAILED", _STOPPED),
    ("FAILED", "stop", "any_succeeded"): ("SKIPPED", "FAILED", _STOPPED),
    ("FAILED", "isolate", "all_succeeded"): ("SKIPPED", "FAILED", "upstream 'a' failed"),
    ("FAILED", "isolate", "none_failed"): (
        "SKIPPED", "FAILED", "run_if='none_failed' not met: 'a' failed, 'b' succeeded"),
    ("FAILED", "isolate", "any_succeeded"): ("SUCCEEDED", "FAILED", None),
})


@pytest.mark.parametrize("a_ends, policy, rule", sorted(RUN_IF_TABLE),
                         ids=["a %s, %s, %s" % case for case in sorted(RUN_IF_TABLE)])
def test_run_if_decides_a_join_by_the_final_states_of_its_upstream_tasks(make_engine, a_ends,
                                                                         policy, rule):
    state, status, reason = RUN_IF_TABLE[a_ends, policy, rule]
    b_running = threading.Event()
    got = []

    @task(fail_policy=policy)
    def a(ctx):
        assert b_running.wait(WAIT)         # b has started: it succeeds whatever a does
        if a_ends == "FAILED":
            raise ValueError("a broke")
        if a_ends == "SKIPPED":
            ctx.skip("nothing to do")
        return "A"

    @task
    def b(ctx):
        b_running.set()
        return "B"

    @task(run_if=rule)
    def d(ctx, a, b):
        got.append((a, b))
        return "D"

    flow = Flow("diamond-rules")
    flow >> [a, b] >> d
    run = make_engine(workers=4).run(flow, raise_on_failure=False)
    assert {name: r.state for name, r in run.tasks.items()} == {
        "a": a_ends, "b": "SUCCEEDED", "d": state}
    assert run.status == status
    assert run.tasks["d"].reason == reason
    if state == "SUCCEEDED":        # a parameter wired to a task that did not succeed is None
        assert got == [("A" if a_ends == "SUCCEEDED" else None, "B")]
    else:
        assert got == []


def test_a_failed_run_stays_failed_when_its_any_failed_handler_succeeds(make_engine):
    @task
    def load(ctx):
        raise ValueError("load broke")

    @task(run_if="any_failed")
    def alert(ctx):
        return "alerted"

    flow = Flow("alerting")
    flow >> load >> alert
    failure = _run_failed(make_engine(), flow)
    run = failure.run
    assert run.status == "FAILED"
    assert (run.tasks["load"].state, run.tasks["alert"].state) == ("FAILED", "SUCCEEDED")
    assert run.results["alert"] == "alerted"
    assert isinstance(failure.__cause__, ValueError) and "load broke" in str(failure.__cause__)


@pytest.mark.parametrize("load_fails", [True, False], ids=["after a failure", "after success"])
def test_a_handler_that_fails_is_a_failed_task(make_engine, load_fails):
    @task
    def load(ctx):
        if load_fails:
            raise ValueError("load broke")
        return "loaded"

    @task(run_if="all_done")
    def cleanup(ctx):
        raise RuntimeError("cleanup broke")

    flow = Flow("bad-handler")
    flow >> load >> cleanup
    failure = _run_failed(make_engine(), flow)
    run = failure.run
    assert run.status == "FAILED"
    assert run.tasks["cleanup"].state == "FAILED"
    assert run.tasks["cleanup"].error == "RuntimeError: cleanup broke"
    assert run.tasks["load"].state == ("FAILED" if load_fails else "SUCCEEDED")
    first = "load broke" if load_fails else "cleanup broke"
    assert first in str(failure.__cause__)


@pytest.mark.parametrize("after", ["a failure", "a cancel"])
def test_a_mapped_handler_runs_its_instances_after_a_stop(after):
    ran = []
    started, proceed = threading.Event(), threading.Event()

    @task
    def load(ctx):
        if after == "a failure":
            raise ValueError("load broke")
        started.set()
        assert proceed.wait(WAIT)           # set once the run is cancelled
        return "kept"

    @task(run_if="all_done")
    def tidy(ctx, item):
        ran.append(item)
        return item

    flow = Flow("mapped-handler")
    flow >> load >> tidy.map([1, 2, 3])
    engine = quiet()
    with _cancel_when_started(engine, "mh", started, proceed):
        try:
            run = engine.run(flow, run_id="mh", raise_on_failure=False)
        finally:
            started.set()           # after a failure: lets the thread go (its cancel is too late)
    assert run.status == ("FAILED" if after == "a failure" else "CANCELLED")
    assert sorted(ran) == [1, 2, 3]
    assert _instance_states(run, "tidy", 3) == ["SUCCEEDED"] * 3
    assert run.tasks["tidy"].state == "SUCCEEDED"


def _when_flow():
    """check -> publish (when $node.check.output.changed) -> notify (default rule)
    and tidy (run_if=all_done); check is added after publish, with no edge."""
    @task(when="$node.check.output.changed")
    def publish(ctx):
        return "published"

    @task
    def notify(ctx):
        return "notified"

    @task(run_if="all_done")
    def tidy(ctx):
        return "tidied"

    @task
    def check(ctx):
        return {"changed": ctx.params["changed"]}

    flow = Flow("conditional")
    flow >> publish >> [notify, tidy]
    flow.add(check)
    return flow


@pytest.mark.parametrize("changed", [True, False])
def test_when_runs_the_task_only_when_its_expression_is_truthy(make_engine, changed):
    run = make_engine().run(_when_flow(), {"changed": changed})
    assert run.status == "COMPLETED"
    states = {name: r.state for name, r in run.tasks.items()}
    if changed:
        assert states == dict.fromkeys(("check", "publish", "notify", "tidy"), "SUCCEEDED")
        assert run.results["publish"] == "published"
    else:
        assert states == {"check": "SUCCEEDED", "publish": "SKIPPED", "notify": "SKIPPED",
                          "tidy": "SUCCEEDED"}
        assert run.tasks["publish"].reason == "when $node.check.output.changed was false"
        assert run.tasks["notify"].reason == "upstream 'publish' skipped"
        assert "publish" not in run.results and run.results["tidy"] == "tidied"


def test_a_when_node_reference_makes_that_task_an_upstream(make_engine):
    flow = _when_flow()
    assert re.search(r"^  publish .*<- check$", pyoco.render_graph(flow, "text"), re.M)
    run = make_engine(workers=1).run(flow, {"changed": True})
    kinds = [(e["event"], e["task"]) for e in run.events]
    assert kinds.index(("task.succeeded", "check")) < kinds.index(("task.started", "publish"))


@pytest.mark.parametrize("value, runs", [(True, True), ("yes", True), (False, False), (0, False),
                                         ("", False)])
def test_when_reads_a_ctx_params_expression(make_engine, value, runs):
    @task(when="$ctx.params.publish")
    def publish(ctx):
        return "published"

    flow = Flow("when-param")
    flow >> publish
    run = make_engine().run(flow, {"publish": value})
    assert run.status == "COMPLETED"
    assert run.tasks["publish"].state == ("SUCCEEDED" if runs else "SKIPPED")
    if not runs:
        assert run.tasks["publish"].reason == "when $ctx.params.publish was false"


def test_a_when_that_is_not_an_expression_is_a_flow_error():
    def publish(ctx):
        return 1

    for make in (lambda: task(when="check.output.changed")(publish),
                 lambda: setattr(task(publish).task, "when", "True")):
        with pytest.raises(FlowError) as info:
            make()
        assert "when" in str(info.value) and "$" in str(info.value)


def test_a_when_naming_an_unknown_task_is_a_flow_error_before_anything_runs():
    ran = []

    @task
    def check(ctx):
        ran.append("check")

    @task(when="$node.chek.output.changed")
    def publish(ctx):
        ran.append("publish")

    flow = Flow("when-unknown")
    flow >> check >> publish
    with pytest.raises(FlowError) as info:
        run_quiet(flow)
    assert "'publish'" in str(info.value) and "'chek'" in str(info.value)
    with pytest.raises(FlowError):
        flow.validate()
    assert ran == []


# ---------------------------------------------------------------------------
# Incremental runs: cache=True, fingerprints and reuse (SPEC section 11)
# ---------------------------------------------------------------------------

_CACHED_FLOW = '''
from pyoco import task, Flow

@task(cache=True{options})
def fetch(ctx, day):
    {body}

flow = Flow(name="cached")
flow >> fetch
'''


def _cached_flow_file(tmp_path, name, body, options=""):
    return write(tmp_path / ("%s.py" % name), _CACHED_FLOW.format(body=body, options=options))


def _reuse_of(run):
    """Task name -> the run it was reused from, None for tasks that ran."""
    return {name: record.reused_from for name, record in run.tasks.items()}


@pytest.mark.parametrize("first, second, options, day, reused", [
    ("return day * 2", "return day * 2", ("", ""), 1, True),
    ("return day * 2", "return day * 3", ("", ""), 1, False),        # a changed constant
    ("return day * 2", "return day + day", ("", ""), 1, False),      # a changed body
    ("return day * 2", "# the double\n    return day * 2\n\n", ("", ""), 1, True),  # a comment
    ("return day * 2", "return day * 2", ("", ""), 2, False),        # a changed parameter
    ("return day * 2", "return day * 3", (", version=1", ", version=1"), 1, True),
    ("return day * 2", "return day * 2", (", version=1", ", version=2"), 1, False),
    ("return [day, (lambda: 1)()]", "return [day, (lambda: 2)()]", ("", ""), 1, False),
])
def test_a_cached_task_is_reused_only_while_its_code_and_inputs_are_unchanged(
        tmp_path, first, second, options, day, reused):
    engine = Engine(trace=False, store=tmp_path / "store")
    old = engine.run(pyoco.load_flow(str(_cached_flow_file(tmp_path, "one", first, options[0]))),
                     {"day": 1})
    new = engine.run(pyoco.load_flow(str(_cached_flow_file(tmp_path, "two", second,
                                                           options[1]))), {"day": day})
    assert old.tasks["fetch"].reused_from is None and old.tasks["fetch"].attempts == 1
    assert _reuse_of(new)["fetch"] == (old.run_id if reused else None)
    assert new.tasks["fetch"].attempts == (0 if reused else 1)
    assert new.status == "COMPLETED"


def _cutoff_flow(calls):
    @task(cache=False)
    def source(ctx, day):
        calls.append("source")
        return day // 10            # 11 and 12 give the same output

    @task(cache=True)
    def report(ctx, source):
        calls.append("report")
        return "report of %d" % source

    flow = Flow(name="cutoff")
    flow >> source >> report
    return flow


@pytest.mark.parametrize("second_day, report_reused", [(12, True), (21, False)])
def test_early_cut_off_judges_a_cached_task_by_its_own_inputs(tmp_path, make_engine,
                                                            second_day, report_reused):
    calls = []
    engine = make_engine(store=tmp_path)
    first = engine.run(_cutoff_flow(calls), {"day": 11})
    del calls[:]
    second = engine.run(_cutoff_flow(calls), {"day": second_day})
    assert calls == (["source"] if report_reused else ["source", "report"])
    assert second.tasks["report"].reused_from == (first.run_id if report_reused else None)
    assert second.results["report"] == "report of %d" % (second_day // 10)


def test_a_reused_task_succeeds_with_the_origin_runs_output_reason_trace_and_artifacts(
        tmp_path):
    calls = []

    @task(cache=True)
    def fetch(ctx, day):
        calls.append(day)
        ctx.save_artifact("day.txt", "day %d" % day)
        return {"day": day}

    flow = Flow(name="origin")
    flow >> fetch
    trace = io.StringIO()
    engine = Engine(trace=trace, cute=True, store=tmp_path)
    first = engine.run(flow, {"day": 3})
    second = engine.run(flow, {"day": 3})
    plain = Engine(trace=io.StringIO(), cute=False, store=tmp_path)
    third = plain.run(flow, {"day": 3})
    assert calls == [3]
    for run in (second, third):     # a reuse of a reuse names the run where it last ran
        record = run.to_dict()["tasks"]["fetch"]
        assert record["state"] == "SUCCEEDED" and record["reused_from"] == first.run_id
        assert record["reason"] == "same code and inputs as run %s" % first.run_id
        assert run.results["fetch"] == {"day": 3}
        with open(record["artifacts"]["day.txt"]) as f:
            assert f.read() == "day 3"
    assert "♻️ reuse node=fetch (run %s)" % first.run_id in trace.getvalue()
    assert re.search(r"INFO reuse node=fetch from_run=%s .*run_id=%s"
                     % (first.run_id, third.run_id), plain.trace.getvalue())
    stored = RunStore(tmp_path).get(third.run_id)
    assert stored["tasks"]["fetch"]["reused_from"] == first.run_id


def _one_cached_task(calls, flow_name, output=1, **options):
    """A flow of one cache=True task ``fetch(ctx, day=0)`` that notes each call in ``calls``."""
    @task(cache=True, **options)
    def fetch(ctx, day=0):
        calls.append(day)
        return output

    flow = Flow(name=flow_name)
    flow >> fetch
    return flow


def test_cache_ttl_ignores_entries_older_than_it_counting_from_the_origin_run(
        tmp_path, monkeypatch):
    calls = []
    flow = _one_cached_task(calls, "ttl", cache_ttl=3600)
    engine = Engine(trace=False, store=tmp_path)
    first = engine.run(flow)
    later = first.started_at
    monkeypatch.setattr(pyoco._CacheIndex, "clock", staticmethod(lambda: later + 3599))
    assert engine.run(flow).tasks["fetch"].reused_from == first.run_id
    monkeypatch.setattr(pyoco._CacheIndex, "clock", staticmethod(lambda: later + 3601))
    assert engine.run(flow).tasks["fetch"].reused_from is None
    assert len(calls) == 2


def test_cache_false_runs_again_even_on_resume_while_the_default_is_reused(tmp_path):
    calls = []
    broken = [True]

    @task(cache=False)
    def clock_in(ctx):
        calls.append("clock_in")
        return 1

    @task
    def seeds(ctx):
        calls.append("seeds")
        return 2

    @task
    def plant(ctx, clock_in, seeds):
        if broken[0]:
            raise RuntimeError("frozen")
        return clock_in + seeds

    flow = Flow(name="resumed")
    flow.add(plant, after=[clock_in, seeds])
    engine = Engine(trace=False, store=tmp_path)
    failed = engine.run(flow, raise_on_failure=False)
    broken[0] = False
    resumed = engine.run(flow, resume=failed.run_id)
    assert sorted(calls) == ["clock_in", "clock_in", "seeds"]
    assert _reuse_of(resumed) == {"clock_in": None, "seeds": failed.run_id, "plant": None}
    assert resumed.results["plant"] == 3


def test_a_value_without_fingerprint_makes_the_task_run_saying_why(tmp_path):
    calls = []

    @task(cache=True)
    def use(ctx, conn):
        calls.append(conn)
        return "used"

    use.task.inputs = {"conn": threading.Lock()}     # neither JSON nor picklable
    flow = Flow(name="lock")
    flow >> use
    engine = Engine(trace=False, store=tmp_path)
    runs = [engine.run(flow), engine.run(flow)]
    assert len(calls) == 2
    for run in runs:
        assert run.tasks["use"].reused_from is None
        assert run.tasks["use"].reason == "not cacheable: input 'conn' has no fingerprint"


def test_pruned_runs_take_their_outputs_out_of_the_cache(tmp_path, monkeypatch):
    calls = []
    flow = _one_cached_task(calls, "pruned")
    monkeypatch.setenv("PYOCO_MAX_RUN_HISTORY", "1")
    engine = Engine(trace=False, store=tmp_path)
    for day in (1, 2, 1):           # day 1's run was pruned when day 2's ended
        engine.run(flow, {"day": day})
    assert calls == [1, 2, 1]


@pytest.mark.parametrize("damaged", ["outputs.jsonl", "cache.jsonl"])
@pytest.mark.parametrize("content", [b"", b"{not json\n", b'{"task": "fetch"}\n[1]\n'])
def test_an_unreadable_output_or_cache_file_means_run_it(tmp_path, damaged, content):
    calls = []
    flow = _one_cached_task(calls, "damaged", {"big": "output"})
    engine = Engine(trace=False, store=tmp_path)
    first = engine.run(flow)
    (tmp_path / "runs" / first.run_id / damaged).write_bytes(content)
    second = engine.run(flow)
    assert second.status == "COMPLETED" and second.tasks["fetch"].reused_from is None
    assert second.results["fetch"] == {"big": "output"} and len(calls) == 2


def _cached_square(calls):
    """A cache=True task ``square(ctx, n)`` that notes each ``n`` it is called with."""
    @task(cache=True)
    def square(ctx, n):
        calls.append(n)
        return n * n
    return square


def test_cached_map_instances_are_reused_one_by_one(tmp_path):
    calls = []
    square = _cached_square(calls)

    def flow_over(items):
        flow = Flow(name="squares")
        flow >> square.map(items)
        return flow
    engine = Engine(trace=False, store=tmp_path)
    first = engine.run(flow_over([1, 2])).run_id
    assert _plan_rows(engine.plan(flow_over([1, 2]))) == [
        ("square", "reuse", "same code and inputs as run %s" % first, first)]
    assert _plan_rows(engine.plan(flow_over([1, 2, 3]))) == [
        ("square", "run", "no earlier run", None)]      # square[2] is new
    run = engine.run(flow_over([1, 2, 3]))
    assert sorted(calls) == [1, 2, 3] and run.results["square"] == [1, 4, 9]


def test_resume_of_a_map_with_one_failed_instance_runs_only_that_instance(tmp_path):
    calls = []
    broken = [True]

    @task
    def items(ctx):
        return ["a", "b", "c"]

    @task(fail_policy="isolate")      # the other instances run on
    def handle(ctx, item):
        calls.append(item)
        if item == "b" and broken[0]:
            raise ValueError("bad b")
        return item.upper()

    flow = Flow(name="map-resume")
    flow >> items >> handle.map("$node.items.output")
    engine = Engine(trace=False, store=tmp_path)
    failed = engine.run(flow, raise_on_failure=False)
    assert [failed.tasks["handle[%d]" % k].state for k in range(3)] == [
        "SUCCEEDED", "FAILED", "SUCCEEDED"]
    broken[0] = False
    del calls[:]
    resumed = engine.run(flow, resume=failed.run_id)
    assert calls == ["b"]
    assert resumed.results["handle"] == ["A", "B", "C"]
    assert _reuse_of(resumed)["handle[0]"] == failed.run_id
    assert _reuse_of(resumed)["handle[1]"] is None


def test_cache_key_replaces_the_inputs_in_the_fingerprint(tmp_path):
    calls = []

    @task(cache_key=lambda ctx, inputs: inputs["path"].split("?")[0])
    def read(ctx, path):
        calls.append(path)
        return len(path)

    flow = Flow(name="keyed")
    flow >> read
    engine = Engine(trace=False, store=tmp_path)
    first = engine.run(flow, {"path": "a.txt?v=1"})
    assert engine.run(flow, {"path": "a.txt?v=2"}).tasks["read"].reused_from == first.run_id
    assert engine.run(flow, {"path": "b.txt"}).tasks["read"].reused_from is None
    assert calls == ["a.txt?v=1", "b.txt"]


def test_without_a_store_nothing_is_reused_across_runs():
    calls = []
    flow = _one_cached_task(calls, "no-store")
    run_quiet(flow)
    run_quiet(flow)
    assert len(calls) == 2


# ===========================================================================
# Calling a task: threads, process pools and other executors
# ===========================================================================


# ---------------------------------------------------------------------------
# Executors: thread, process, any concurrent.futures.Executor
# ---------------------------------------------------------------------------

# -- executors: "thread" (the default), "process", or any concurrent.futures.Executor

# Module level, so that a process pool can unpickle them.
@task
def _square_where(n=3):
    return (os.getpid(), n * n)


@task
def _process_fails():
    raise ValueError("bad value in a process")


@task
def _process_skips(ctx):
    ctx.skip("nothing in a process")


@task(timeout=0.5)
def _process_stuck():
    time.sleep(30)


def test_thread_executor_by_name_is_the_default():
    flow = Flow("thread-executor")
    flow >> _square_where
    run = Engine(executor="thread", trace=False).run(flow, {"n": 4})
    assert run.results["_square_where"] == (os.getpid(), 16)
    assert Engine().executor == "thread"


def test_executor_instance_runs_the_tasks():
    from concurrent.futures import ThreadPoolExecutor

    @task
    def where(ctx):
        return threading.current_thread().name

    flow = Flow("executor-instance")
    flow >> where
    with ThreadPoolExecutor(2, thread_name_prefix="custom-pool") as pool:
        run = Engine(executor=pool, trace=False).run(flow)
    assert run.results["where"].startswith("custom-pool")


def test_bad_executor_is_rejected():
    with pytest.raises(ValueError, match="executor"):
        Engine(executor="gpu")


def test_process_executor_runs_tasks_in_other_processes():
    flow = Flow("process-executor")
    flow >> _square_where
    flow >> _process_fails
    flow >> _process_skips
    run = Engine(executor="process", workers=2, trace=False).run(flow, {"n": 5},
                                                                 raise_on_failure=False)
    pid, square = run.results["_square_where"]
    assert square == 25 and pid != os.getpid()
    assert run.tasks["_process_fails"].state == "FAILED"
    assert run.tasks["_process_fails"].error == "ValueError: bad value in a process"
    assert run.tasks["_process_skips"].state == "SKIPPED"
    assert run.tasks["_process_skips"].reason == "nothing in a process"
    assert run.status == "FAILED"


def test_process_executor_stops_a_task_at_its_deadline():
    flow = Flow("process-timeout")
    flow >> _process_stuck
    events = Events()
    run = Engine(executor="process", workers=1, trace=False, observers=[events]).run(
        flow, raise_on_failure=False)
    assert events.since("task.started", "_process_stuck") < 5.0     # not its 30 s sleep
    assert run.tasks["_process_stuck"].error.startswith("TimeoutError")


def test_process_executor_rejects_unpicklable_tasks_before_running():
    ran = []

    @task
    def local(ctx):                     # defined in a function: cannot be pickled
        ran.append("local")

    flow = Flow("unpicklable")
    flow >> local
    with pytest.raises(FlowError, match="'local'"):
        Engine(executor="process", trace=False).run(flow)
    assert ran == []


def test_executor_instance_leaves_sys_stdout_alone():
    from concurrent.futures import ThreadPoolExecutor
    barrier = threading.Barrier(4, timeout=WAIT)

    finished = [threading.Event() for _ in range(4)]

    def body(ctx):
        k = int(ctx.task_name[1:])
        barrier.wait()
        assert k == 0 or finished[k - 1].wait(WAIT)     # finish in start order
        finished[k].set()
        return None

    flow = Flow("stdout")
    for k in range(4):
        flow >> task(name="t%d" % k)(body)
    before = sys.stdout, sys.stderr
    with ThreadPoolExecutor(4) as pool:
        Engine(executor=pool, trace=False).run(flow)
    after = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = before
    assert after[0] is before[0] and after[1] is before[1], after


# -- one flow, one outcome: states, attempts and events do not depend on the executor

# Module level, so that a process pool can unpickle them. _EXEC_RELEASE stands
# for five seconds of work; the test sets it at its end so that threads given
# up at their deadline finish (in a worker process nothing sets it).
_EXEC_RELEASE = threading.Event()


@task(retries=2)
def _exec_hopeless():
    raise ValueError("never")


@task(retries=2)
def _exec_exits():
    sys.exit(3)


@task(timeout=0.2)
def _exec_sleeps():
    _EXEC_RELEASE.wait(5)
    return "too late"


@task(timeout=0.2, retries=1)
def _exec_sleeps_twice():
    _EXEC_RELEASE.wait(5)
    return "too late"


@task
def _exec_gate(ctx):
    ctx.skip("why")


@task
def _exec_after_gate(ctx):
    return "ran"


@task
def _exec_letters():
    return ["a", "b", "c", "d", "e"]


@task
def _exec_shout(letter):
    return letter.upper()


def _exec_map_flow(flow):
    flow >> _exec_letters >> _exec_shout.map("$node._exec_letters.output")


# case -> (build the flow, run status, {task: (state, attempts)}, what else holds)
EXECUTOR_CASES = {
    "retries": (lambda flow: flow >> _exec_hopeless, "FAILED",
                {"_exec_hopeless": ("FAILED", 3)},
                lambda run: run.tasks["_exec_hopeless"].error == "ValueError: never"),
    "sys.exit": (lambda flow: flow >> _exec_exits, "FAILED",
                 {"_exec_exits": ("FAILED", 1)},
                 lambda run: run.tasks["_exec_exits"].error == "SystemExit: 3"),
    "timeout": (lambda flow: flow >> _exec_sleeps, "FAILED",
                {"_exec_sleeps": ("FAILED", 1)},
                lambda run: run.tasks["_exec_sleeps"].error.startswith("TimeoutError")),
    "timeout, retries=1": (lambda flow: flow >> _exec_sleeps_twice, "FAILED",
                           {"_exec_sleeps_twice": ("FAILED", 2)},
                           lambda run: run.tasks["_exec_sleeps_twice"].error.startswith(
                               "TimeoutError")),
    "ctx.skip": (lambda flow: flow >> _exec_gate >> _exec_after_gate, "COMPLETED",
                 {"_exec_gate": ("SKIPPED", 1), "_exec_after_gate": ("SKIPPED", 0)},
                 lambda run: run.tasks["_exec_gate"].reason == "why"
                 and "_exec_gate" in run.tasks["_exec_after_gate"].reason),
    "map of 5": (_exec_map_flow, "COMPLETED",
                 dict({"_exec_letters": ("SUCCEEDED", 1), "_exec_shout": ("SUCCEEDED", 1)},
                      **{"_exec_shout[%d]" % k: ("SUCCEEDED", 1) for k in range(5)}),
                 lambda run: run.results["_exec_shout"] == ["A", "B", "C", "D", "E"]),
}


def _executor_outcome(case, executor):
    """Run a case on one executor; one worker, so that the events come in one order."""
    build = EXECUTOR_CASES[case][0]
    flow = Flow("same-everywhere")
    build(flow)
    _EXEC_RELEASE.clear()
    events = Events()
    try:
        if executor == "executor instance":
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(4) as pool:
                try:
                    run = Engine(executor=pool, workers=1, trace=False,
                                 observers=[events]).run(flow, raise_on_failure=False)
                finally:
                    _EXEC_RELEASE.set()     # before the pool waits for its threads
        else:
            run = Engine(executor=executor, workers=1, trace=False,
                         observers=[events]).run(flow, raise_on_failure=False)
    finally:
        _EXEC_RELEASE.set()
    assert events.since("task.started") < 4.0, "the run waited for a task past its deadline"
    tasks = {name: (r.state, r.attempts, r.error, r.reason) for name, r in run.tasks.items()}
    events = [(e["event"], e["task"]) for e in run.events]
    return run, (run.status, tasks, events, run.results)


@pytest.mark.parametrize("executor", ["thread", "process", "executor instance"])
@pytest.mark.parametrize("case", list(EXECUTOR_CASES))
def test_a_flow_ends_with_the_same_states_attempts_and_events_on_every_executor(case,
                                                                                executor):
    _, status, states, holds = EXECUTOR_CASES[case]
    run, outcome = _executor_outcome(case, executor)
    assert run.status == status
    assert {name: (r.state, r.attempts) for name, r in run.tasks.items()} == states
    assert holds(run), run.tasks
    if executor != "thread":
        _, on_threads = _executor_outcome(case, "thread")
        for what, here, there in zip(("status", "tasks", "events", "results"), outcome,
                                     on_threads):
            assert here == there, what


# ---------------------------------------------------------------------------
# An exception that cannot be printed
# ---------------------------------------------------------------------------

BROKEN_STR_PROBE = """
from pyoco import task, Flow, Engine

class Odd(Exception):
    def __str__(self):
        raise RuntimeError("no text for this error")

@task
def odd(ctx):
    raise Odd()

flow = Flow("odd")
flow >> odd
run = Engine(trace=False).run(flow, raise_on_failure=False)
print(run.status, run.tasks["odd"].state)
"""


def test_exception_with_broken_str_fails_the_task_instead_of_hanging(tmp_path):
    try:
        proc = run_python(tmp_path, "-c", BROKEN_STR_PROBE, timeout=2 * WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung")
    assert proc.stdout.split() == ["FAILED", "FAILED"], proc.stderr


# ---------------------------------------------------------------------------
# Scale-out: a crashed worker process, a killed stuck one, a real Dask cluster
# ---------------------------------------------------------------------------

@task
def _process_crashes():
    os._exit(3)                         # takes its worker process down with it


@task
def _process_steady(n=0):
    time.sleep(0.3)
    return os.getpid()


@task(timeout=0.5)
def _process_stuck_reporting(pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(60)


def test_process_executor_crash_fails_only_that_task():
    flow = Flow("process-crash")
    flow >> _process_crashes
    flow >> _process_steady
    run = Engine(executor="process", workers=2, trace=False).run(flow, raise_on_failure=False)
    assert run.tasks["_process_crashes"].state == "FAILED"
    assert "died" in run.tasks["_process_crashes"].error
    assert run.tasks["_process_steady"].state == "SUCCEEDED"
    assert run.results["_process_steady"] != os.getpid()
    assert run.status == "FAILED"


def test_process_executor_kills_the_stuck_process_at_its_deadline(tmp_path):
    pid_file = tmp_path / "pid"
    flow = Flow("process-kill")
    flow >> _process_stuck_reporting
    run = Engine(executor="process", workers=1, trace=False).run(
        flow, {"pid_file": str(pid_file)}, raise_on_failure=False)
    assert run.tasks["_process_stuck_reporting"].error.startswith("TimeoutError")
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + WAIT
    while pyoco._pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pyoco._pid_alive(pid), "the stuck task's process still runs"


DASK_FLOW = textwrap.dedent('''
    import os
    from pyoco import Flow, task

    @task
    def numbers(ctx):
        return [1, 2, 3, 4]

    @task
    def times_ten(ctx, x):
        return {"value": x * 10, "pid": os.getpid()}

    @task
    def total(ctx, times_ten):
        return sum(part["value"] for part in times_ten)

    flow = Flow("on_dask")
    flow >> numbers >> times_ten.map("$node.numbers.output") >> total
''')

DASK_DRIVER = textwrap.dedent('''
    import json, os, sys
    from distributed import Client, LocalCluster
    import pyoco, dask_flow

    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            run = pyoco.Engine(executor=client.get_executor(), trace=False).run(dask_flow.flow)
            print(json.dumps({"status": run.status, "total": run.results["total"],
                              "pids": sorted({p["pid"] for p in run.results["times_ten"]}),
                              "me": os.getpid(),
                              "instances": sorted(n for n in run.tasks if "[" in n)}))
''')


def _dask_python():
    explicit = os.environ.get("DASK_TEST_PYTHON")
    if explicit:
        return explicit
    probe = subprocess.run([sys.executable, "-c", "import distributed"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


def test_flow_runs_on_a_real_dask_cluster_with_worker_processes(tmp_path):
    python = _dask_python()
    if python is None:
        pytest.skip("distributed is not installed (.ci/run installs it in a venv)")
    write(tmp_path / "dask_flow.py", DASK_FLOW)
    write(tmp_path / "driver.py", DASK_DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(tmp_path)]))
    done = subprocess.run([python, str(tmp_path / "driver.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "COMPLETED"
    assert result["total"] == 100
    assert result["instances"] == ["times_ten[0]", "times_ten[1]", "times_ten[2]",
                                   "times_ten[3]"]
    assert result["me"] not in result["pids"]       # the work ran in Dask's worker processes


# ---------------------------------------------------------------------------
# sys.exit in a task
# ---------------------------------------------------------------------------

def test_sys_exit_in_a_task_fails_the_run_and_the_cli_exits_1(tmp_path):
    flow_file = write(tmp_path / "exits.py", '''
        import sys
        from pyoco import task, Flow

        @task
        def leave(ctx):
            sys.exit(0)

        flow = Flow("exits")
        flow >> leave
    ''')
    done = cli(tmp_path, "run", flow_file, "--store", tmp_path / "store", PYOCO_CUTE="0")
    assert done.returncode == 1, done.stderr
    assert "SystemExit" in done.stderr


# ===========================================================================
# Executors: from a SPEC string to what runs a run's calls (SPEC section 14)
# ===========================================================================


# ---------------------------------------------------------------------------
# --executor, PYOCO_EXECUTOR, Dask, Ray, MODULE:NAME
# ---------------------------------------------------------------------------

# One flow proves a whole executor: a map (numbers -> times_ten[0..2] -> total),
# a retry (flaky fails its first attempt) and a timeout (slow sleeps past 0.5 s,
# isolated, so the rest goes on). total saves an artifact naming the processes
# the map ran in. With -p mode=hang, only `hang` runs: it writes its pid to
# hang.pid and sleeps, for the Ctrl+C tests.
EXEC_FLOW = """\
    import json
    import os
    import time
    from pyoco import Flow, task

    @task
    def numbers(ctx):
        return [1, 2, 3]

    @task
    def times_ten(ctx, x):
        return {"value": x * 10, "pid": os.getpid()}

    @task
    def total(ctx, times_ten):
        ctx.save_artifact("total.json", json.dumps({
            "total": sum(p["value"] for p in times_ten),
            "pids": sorted({p["pid"] for p in times_ten})}))

    @task(retries=2, retry_delay=0.01)
    def flaky(ctx):
        if ctx.attempt < 2:
            raise ValueError("the first attempt fails")
        return ctx.attempt

    @task(timeout=0.5, fail_policy="isolate")
    def slow(ctx):
        time.sleep(1.5)

    @task
    def hang(ctx):
        with open(os.path.join(ctx.params["folder"], "hang.pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)

    flow = Flow("where")
    flow >> numbers >> times_ten.map("$node.numbers.output") >> total
    flow >> flaky
    flow >> slow

    hanging = Flow("hanging")
    hanging >> hang
"""

# MODULE:NAME: a function returning an Executor that notes every call it is given.
EXEC_NAMED = """\
    from concurrent.futures import ThreadPoolExecutor

    class Noting(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            with open("submitted.txt", "a") as f:
                f.write(args[0].name + "\\n")
            return super().submit(fn, *args, **kwargs)

    def make():
        with open("made.txt", "a") as f:
            f.write("made\\n")
        return Noting(4)

    LIMIT = 4
"""

EXEC_STATES = {"numbers": "SUCCEEDED", "times_ten": "SUCCEEDED", "times_ten[0]": "SUCCEEDED",
               "times_ten[1]": "SUCCEEDED", "times_ten[2]": "SUCCEEDED", "total": "SUCCEEDED",
               "flaky": "SUCCEEDED", "slow": "FAILED"}


def exec_python(package):
    """The Python that has ``package`` (distributed or ray), or skip saying why.

    .ci/run installs each into a venv and names its Python in DASK_TEST_PYTHON
    or RAY_TEST_PYTHON. pyoco runs under that Python whichever Python runs
    pytest, so under CI these tests run once, under the matching version."""
    variable = {"distributed": "DASK_TEST_PYTHON", "ray": "RAY_TEST_PYTHON"}[package]
    python = os.environ.get(variable) or (_dask_python() if package == "distributed" else None)
    if python is None:
        probe = subprocess.run([sys.executable, "-c", "import " + package], capture_output=True)
        python = sys.executable if probe.returncode == 0 else None
    if python is None:
        pytest.skip("%s is not installed (.ci/run installs it in a venv and sets %s)"
                    % (package, variable))
    if os.environ.get("CI") and python != sys.executable:
        probe = "import sys; print('%d.%d' % sys.version_info[:2])"
        version = subprocess.run([python, "-c", probe], capture_output=True,
                                 text=True).stdout.strip()
        if version != "%d.%d" % sys.version_info[:2]:
            pytest.skip("pyoco runs under %s here, the same under every pytest Python: this"
                        " test runs once per CI, under Python %s" % (python, version))
    return python


def test_pyoco_connect_timeout_gives_a_slow_cluster_longer_and_refuses_nonsense(monkeypatch):
    assert pyoco._connect_timeout("ray://h:1") == 10.0
    monkeypatch.setenv("PYOCO_CONNECT_TIMEOUT", "60")
    assert pyoco._connect_timeout("ray://h:1") == 60.0
    for bad in ("soon", "0", "-3", "inf", "nan"):
        monkeypatch.setenv("PYOCO_CONNECT_TIMEOUT", bad)
        with pytest.raises(pyoco.ExecutorError, match="PYOCO_CONNECT_TIMEOUT must be seconds > 0"):
            pyoco._connect_timeout("ray://h:1")


def exec_folder(tmp_path):
    write(tmp_path / "where.py", EXEC_FLOW)
    write(tmp_path / "execs.py", EXEC_NAMED)
    return tmp_path


def exec_descendants(pid):
    """The pids of every process below ``pid`` (Linux /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def exec_run(spawn, folder, *args, python=None, env=None):
    """``pyoco run where.py ARGS`` to its end: (exit code, its record, its pid)."""
    proc = spawn(folder, "run", "where.py", "--flow", "where", *args, python=python,
                 env=env, plain=True)
    code = proc.wait(120)
    run_id = run_id_of(proc.text("stderr"))
    assert "Traceback" not in proc.text("stderr"), proc.text("stderr")
    return code, RunStore(folder / ".pyoco").get(run_id), proc.proc.pid


@pytest.fixture(scope="session")
def exec_dask_scheduler(tmp_path_factory):
    """A real ``dask scheduler`` and ``dask worker`` on 127.0.0.1 for the session:
    the scheduler's address (HOST:PORT). Both are stopped by their pids."""
    python = exec_python("distributed")
    folder = tmp_path_factory.mktemp("dask-scheduler")
    where = folder / "scheduler.json"
    env = child_env(plain=True)
    started = []

    def start(*args):
        started.append(subprocess.Popen([python, "-m"] + list(args), cwd=str(folder), env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        start("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
              "--no-dashboard", "--scheduler-file", str(where))
        wait_until(lambda: where.exists() and "address" in where.read_text(), timeout=60)
        address = json.loads(where.read_text())["address"]
        start("distributed.cli.dask_worker", "--scheduler-file", str(where), "--host",
              "127.0.0.1", "--no-nanny", "--nthreads", "4", "--no-dashboard")
        yield address.split("://", 1)[1]
    finally:
        for proc in reversed(started):
            proc.kill()
            proc.wait()


# Ray 2.60 turns on token authentication for a cluster that `ray start` makes;
# a Ray Client then needs the token, or the mode off on both sides, as here.
EXEC_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def exec_listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def exec_ray_cluster(tmp_path_factory):
    """A real Ray head with a Ray Client server on 127.0.0.1 for the session
    (``ray start --head --block``, stopped by its pid): the client's HOST:PORT."""
    python = exec_python("ray")
    if subprocess.run([python, "-c", "import grpc"], capture_output=True).returncode:
        pytest.skip("the Ray Client needs ray[client] (.ci/run installs it)")
    folder = tmp_path_factory.mktemp("ray-cluster")
    # The head's own port is Ray's pick (--port 0); the Ray Client server has no
    # such option, so its port stays bound here until just before ray starts.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        client = held.getsockname()[1]
    head = subprocess.Popen(
        [python, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", "0", "--ray-client-server-port",
         str(client), "--include-dashboard", "false", "--num-cpus", "4",
         "--disable-usage-stats"], cwd=str(folder), env=child_env(plain=True, **EXEC_RAY_ENV),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: exec_listening(client) or head.poll() is not None, timeout=90)
        assert head.poll() is None, "ray start --head exited with %s" % head.returncode
        # The client port listens before the head can serve a client: one client connects
        # first, with room to spare, so the tests' own connects meet a cluster that is up.
        # The proxy forks a server for each client, and on a busy machine that fork can
        # die in gRPC ("Starting Ray client server failed"); the next client gets a new one.
        for _ in range(3):
            warm = subprocess.run(
                [python, "-c", "import ray, sys; ray.init(sys.argv[1]); ray.shutdown()",
                 "ray://127.0.0.1:%d" % client], cwd=str(folder),
                env=child_env(plain=True, **EXEC_RAY_ENV),
                capture_output=True, text=True, timeout=120)
            if warm.returncode == 0:
                break
        assert warm.returncode == 0, warm.stderr[-2000:]
        yield "127.0.0.1:%d" % client
    finally:
        head.terminate()            # it stops the processes it started, then exits
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


EXEC_SPECS = ["process", "dask", "dask://", "ray", "ray://", "execs:make"]


@pytest.mark.parametrize("spec", EXEC_SPECS)
def test_each_executor_runs_a_retry_a_timeout_and_a_map_to_the_right_record(
        spec, tmp_path, spawn, request):
    folder = exec_folder(tmp_path)
    python, env = None, None
    if spec.startswith("dask"):
        python = exec_python("distributed")
    elif spec.startswith("ray"):
        python = exec_python("ray")
    if spec == "dask://":
        spec += request.getfixturevalue("exec_dask_scheduler")
    elif spec == "ray://":
        spec += request.getfixturevalue("exec_ray_cluster")
        # A Ray Client starts a server process per client: on a busy machine that
        # takes longer than the default 10 s, which is not what this test is about.
        env = child_env(plain=True, PYOCO_CONNECT_TIMEOUT="60", **EXEC_RAY_ENV)
    code, record, pid = exec_run(spawn, folder, "--executor", spec, python=python,
                                 env=env)
    assert code == 1            # slow timed out: the run FAILED, everything else did its part
    assert record["executor"] == spec
    assert {name: t["state"] for name, t in record["tasks"].items()} == EXEC_STATES
    assert record["tasks"]["flaky"]["attempts"] == 2
    assert record["tasks"]["slow"]["error"].startswith("TimeoutError")
    assert record["tasks"]["slow"]["duration_ms"] < 1400    # failed at its deadline
    saved = json.loads(Path(record["tasks"]["total"]["artifacts"]["total.json"]).read_text())
    assert saved["total"] == 60
    if spec != "execs:make":
        assert pid not in saved["pids"]     # the map ran in other processes
    else:                                   # the named executor ran every call
        noted = (folder / "submitted.txt").read_text().split()
        assert sorted(noted) == sorted(["numbers", "times_ten", "times_ten", "times_ten",
                                        "total", "flaky", "flaky", "slow"])


@pytest.mark.parametrize("package", ["distributed", "ray"])
def test_ctrl_c_on_a_cluster_run_exits_130_saves_the_record_and_leaves_no_process(
        package, tmp_path, spawn):
    python = exec_python(package)
    folder = exec_folder(tmp_path)
    spec = "dask" if package == "distributed" else "ray"
    proc = spawn(folder, "run", "where.py", "--flow", "hanging", "--executor", spec,
                 "-p", "folder=%s" % folder, python=python, plain=True)
    run_id = run_id_of(proc.wait_for(r" start flow=hanging ", stream="stderr").string)
    wait_until(lambda: (folder / "hang.pid").exists() and (folder / "hang.pid").read_text(),
               timeout=120)
    worker = int((folder / "hang.pid").read_text())
    cluster = exec_descendants(proc.proc.pid)
    assert worker in cluster and worker != proc.proc.pid
    proc.proc.send_signal(signal.SIGINT)            # the first: a graceful cancel
    proc.wait_for(r" cancel flow=hanging ", stream="stderr")
    wait_until(lambda: RunStore(folder / ".pyoco").get(run_id)["status"] == "CANCELLING")
    proc.proc.send_signal(signal.SIGINT)            # the second: stop at once
    assert proc.wait(60) == 130
    record = RunStore(folder / ".pyoco").get(run_id)
    assert record["status"] == "CANCELLED" and record["executor"] == spec
    assert record["tasks"]["hang"]["state"] == "CANCELLED"
    wait_until(lambda: not any(pyoco._pid_alive(p) for p in cluster), timeout=30)


@pytest.mark.parametrize("spec, package", [("dask", "distributed"), ("ray", "ray")])
def test_a_missing_executor_package_is_exit_2_saying_what_to_install(
        spec, package, tmp_path):
    folder = exec_folder(tmp_path)
    stubs = tmp_path / "stubs"              # shadows an installed package: as if missing
    stubs.mkdir()
    (stubs / (package + ".py")).write_text(
        "raise ModuleNotFoundError(%r, name=%r)\n" % ("No module named %r" % package, package))
    done = cli(folder, "run", "where.py", "--flow", "where", "--executor", spec,
               env=child_env(stubs, plain=True))
    assert done.returncode == 2
    assert "pip install %s" % package in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    no_traceback(done)
    assert not (folder / ".pyoco").exists() or not RunStore(folder / ".pyoco").list()


@pytest.mark.parametrize("scheme, answering", [("dask", False), ("ray", False),
                                               ("dask", True)],
                         ids=["dask-refused", "ray-refused", "dask-silent"])
def test_an_unreachable_scheduler_is_exit_2_within_15_s_naming_the_address(
        scheme, answering, tmp_path):
    """Refused: nothing listens. Silent: it accepts the connection, never answers."""
    python = exec_python("distributed") if answering else sys.executable
    folder = exec_folder(tmp_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        if answering:
            listener.listen(8)      # else only bound: a connect to it is refused
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        began = time.monotonic()
        done = cli(folder, "run", "where.py", "--flow", "where", "--executor",
                   "%s://%s" % (scheme, address), python=python, plain=True)
    assert time.monotonic() - began < 15
    assert done.returncode == 2
    assert address in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    no_traceback(done)


@pytest.mark.parametrize("args, env, closest", [
    (["--executor", "dsak"], {}, "'dask'"),
    (["--executor", "thraed"], {}, "'thread'"),
    (["--executor", "dask://nowhere"], {}, "dask://HOST:PORT"),
    ([], {"PYOCO_EXECUTOR": "procss"}, "'process'"),
])
def test_an_unknown_executor_spec_is_exit_2_naming_the_closest(args, env, closest, tmp_path):
    folder = exec_folder(tmp_path)
    done = cli(folder, "run", "where.py", "--flow", "where", *args, plain=True, **env)
    assert done.returncode == 2
    assert closest in done.stderr and ("PYOCO_EXECUTOR" if env else "--executor") in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    no_traceback(done)
    with pytest.raises(ValueError, match="did you mean 'dask'"):
        Engine(executor="dsak")


@pytest.mark.parametrize("args, env, ran_on", [
    ([], {}, "thread"),
    ([], {"PYOCO_EXECUTOR": "process"}, "process"),
    (["--executor", "thread"], {"PYOCO_EXECUTOR": "procss"}, "thread"),    # never read
    (["--executor", "execs:make"], {"PYOCO_EXECUTOR": "process"}, "execs:make"),
], ids=["default", "env", "flag-over-bad-env", "flag-over-env"])
def test_pyoco_executor_applies_to_the_cli_and_the_flag_wins(args, env, ran_on, tmp_path,
                                                              spawn):
    folder = exec_folder(tmp_path)
    code, record, pid = exec_run(spawn, folder, *args, env=child_env(plain=True, **env))
    assert code == 1 and record["executor"] == ran_on
    saved = json.loads(Path(record["tasks"]["total"]["artifacts"]["total.json"]).read_text())
    assert (saved["pids"] == [pid]) == (ran_on in ("thread", "execs:make"))
    assert (folder / "submitted.txt").exists() == (ran_on == "execs:make")


def test_engine_ignores_pyoco_executor_and_records_an_executor_by_class(monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setenv("PYOCO_EXECUTOR", "process")
    flow = Flow("quiet")
    flow >> _process_steady
    assert Engine().executor == "thread"
    run = Engine(trace=False, store=tmp_path).run(flow)
    assert run.results["_process_steady"] == os.getpid()       # it ran here, on a thread
    assert RunStore(tmp_path).get(run.run_id)["executor"] == "thread"
    with ThreadPoolExecutor(2) as pool:
        run = Engine(trace=False, store=tmp_path, executor=pool).run(flow)
    assert RunStore(tmp_path).get(run.run_id)["executor"] == "ThreadPoolExecutor"


def test_pyoco_serve_opens_its_executor_once_for_the_runs_it_starts(tmp_path, srv_cli_serve):
    folder = exec_folder(tmp_path)
    server = srv_cli_serve(folder / ".pyoco", folder / "where.py",
                           options=["--executor", "execs:make"])
    for _ in range(2):
        status, answer = srv_json(server.url, "POST", "/runs", {"flow": "where"})
        assert status == 202
        record = wait_until(lambda: (RunStore(folder / ".pyoco").get(answer["run_id"]) or {}).get(
            "ended_at") and RunStore(folder / ".pyoco").get(answer["run_id"]), timeout=30,
            what="the run's end")
        assert record["executor"] == "execs:make" and record["status"] == "FAILED"
    assert (folder / "made.txt").read_text().split() == ["made"]
    assert (folder / "submitted.txt").read_text().split().count("total") == 2
    assert server.stop() == 0


def test_pyoco_serve_refuses_an_unknown_executor_with_exit_2(tmp_path):
    folder = exec_folder(tmp_path)
    done = cli(folder, "serve", "--port", "0", "--executor", "raay", "where.py", plain=True)
    assert done.returncode == 2 and "did you mean 'ray'" in done.stderr, done.stderr
    no_traceback(done)


@pytest.mark.parametrize("spec, says", [
    ("nosuchmodule:make", "cannot import 'nosuchmodule'"),
    ("execs:mkae", "did you mean 'make'?"),
    ("execs:LIMIT", "is neither a concurrent.futures.Executor nor a function returning one"),
])
def test_a_module_name_executor_that_is_not_one_is_exit_2_saying_why(spec, says, tmp_path):
    folder = exec_folder(tmp_path)
    done = cli(folder, "run", "where.py", "--flow", "where", "--executor", spec, plain=True)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    no_traceback(done)


# ===========================================================================
# Signals: Ctrl+C and SIGTERM
# ===========================================================================


# ---------------------------------------------------------------------------
# Cancellation: signals, `pyoco runs cancel`, Engine.cancel
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_cancels_the_run_cooperative_task_succeeds_cli_exits_130(
        tmp_path, spawn, signum):
    store_signal_flow(tmp_path)
    proc = spawn(tmp_path, "run", "signal_flow.py", plain=True)
    run_id = proc.wait_for(r"^MARK (\S+)$").group(1)
    sent = time.monotonic()
    proc.proc.send_signal(signum)
    assert proc.wait() == 130
    assert time.monotonic() - sent < 3.0
    assert "AFTER RAN" not in proc.text("stdout")
    assert "Traceback" not in proc.text("stderr")

    record = RunStore(tmp_path / ".pyoco").get(run_id)
    assert record["status"] == "CANCELLED"
    assert signal.Signals(signum).name in record["reason"]
    states = {name: t["state"] for name, t in record["tasks"].items()}
    assert states == {"work": "SUCCEEDED", "after": "CANCELLED", "last": "CANCELLED"}
    assert record["tasks"]["after"]["reason"]
    assert "CANCELLING" in [e["state"] for e in record["events"] if e["task"] is None]


def test_second_sigint_stops_a_stubborn_task_at_once_and_saves_cancelled(
        tmp_path, spawn):
    proc, run_id = store_stubborn_run(tmp_path, spawn)
    proc.proc.send_signal(signal.SIGINT)
    proc.wait_for(r" cancel flow=signals ", stream="stderr")
    # The record says CANCELLING once the first signal's handler is past its
    # trace line. A second signal inside that line hangs pyoco: see
    # test_second_sigint_while_the_first_ones_trace_line_is_blocked_still_exits_130.
    wait_until(lambda: RunStore(tmp_path / ".pyoco").get(run_id)["status"] == "CANCELLING")
    record = store_interrupted(proc, tmp_path, run_id)
    assert task_states(record) == {"work": "CANCELLED", "after": "CANCELLED",
                                   "last": "CANCELLED"}
    assert record["ended_at"] is not None


# `slow` waits for a file the test never writes, until the run is cancelled;
# `cleanup` (run_if=all_done) writes cleaned.txt, after waiting for another
# such file when run with -p block=1; `notify` (all_done too) comes after it.
STORE_CLEANUP_FLOW = """\
    import os
    import sys
    import time
    from pyoco import task, Flow

    def wait_for(name, cancelled=None, seconds=30):
        # until the file exists, the run is cancelled (when given) or seconds pass
        deadline = time.monotonic() + seconds
        while not os.path.exists(name) and time.monotonic() < deadline:
            if cancelled is None:
                time.sleep(0.05)
            elif cancelled.wait(0.05):
                return

    @task
    def slow(ctx):
        wait_for("never-written.txt", ctx.cancelled)
        return "stopped early"

    @task(run_if="all_done")
    def cleanup(ctx):
        if ctx.params.get("block"):
            sys.stdout.write("CLEANUP STARTED\\n")
            sys.stdout.flush()
            wait_for("never-written-either.txt")
        with open("cleaned.txt", "w") as out:
            out.write("cleaned")
        return "cleaned"

    @task(run_if="all_done")
    def notify(ctx):
        with open("notified.txt", "w") as out:
            out.write("notified")

    flow = Flow(name="tidy")
    flow >> slow >> cleanup >> notify
"""


def test_sigint_still_runs_all_done_cleanup_then_ends_cancelled(tmp_path, spawn):
    write(tmp_path / "tidy.py", STORE_CLEANUP_FLOW)
    proc = spawn(tmp_path, "run", "tidy.py", plain=True)
    run_id = proc.wait_for(r" start node=slow run_id=(\S+)", stream="stderr").group(1)
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130
    record = RunStore(tmp_path / ".pyoco").get(run_id)
    assert record["status"] == "CANCELLED" and "SIGINT" in record["reason"]
    assert {name: t["state"] for name, t in record["tasks"].items()} == {
        "slow": "SUCCEEDED", "cleanup": "SUCCEEDED", "notify": "SUCCEEDED"}
    assert (tmp_path / "cleaned.txt").read_text() == "cleaned"
    assert "Traceback" not in proc.text("stderr")


def test_a_second_sigint_stops_a_running_cleanup_and_starts_nothing_more(tmp_path,
                                                                         spawn):
    write(tmp_path / "tidy.py", STORE_CLEANUP_FLOW)
    proc = spawn(tmp_path, "run", "tidy.py", "-p", "block=1", plain=True)
    run_id = proc.wait_for(r" start node=slow run_id=(\S+)", stream="stderr").group(1)
    proc.proc.send_signal(signal.SIGINT)
    proc.wait_for(r"^CLEANUP STARTED$")
    record = store_interrupted(proc, tmp_path, run_id)
    assert task_states(record) == {"slow": "SUCCEEDED", "cleanup": "CANCELLED",
                                   "notify": "CANCELLED"}
    assert not (tmp_path / "cleaned.txt").exists()
    assert not (tmp_path / "notified.txt").exists()
    assert " start node=notify " not in proc.text("stderr")


# The trace of the first Ctrl+C can block: stderr is a pipe nobody reads at
# the moment (a pager, a full CI log pipe). The second Ctrl+C must still stop
# the run. The test sees, in /proc, when a thread is blocked writing to fd 2,
# or waiting (with no timeout) for the output lock such a thread holds.
STORE_BLOCKED_FLOW = """\
    import sys
    import time
    from pyoco import task, Flow

    @task
    def fill(ctx):
        sys.stdout.write("MARK %s\\n" % ctx.run_id)
        sys.stderr.write("x" * (1 << 20) + "\\n")     # blocks once the pipe is full
        time.sleep(30)
        return "slept"

    flow = Flow(name="blocked")
    flow >> fill
"""

STORE_WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}.get(os.uname().machine if hasattr(
    os, "uname") else None)
STORE_FUTEX_SYSCALL = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine if hasattr(
    os, "uname") else None)


def store_writing_to_stderr(syscall_file):
    """True when the thread of this /proc/.../syscall file is blocked in write(2, ...)."""
    try:
        with open(syscall_file) as f:
            fields = f.read().split()
    except OSError:
        return False
    return (len(fields) > 1 and fields[0] == str(STORE_WRITE_SYSCALL)
            and int(fields[1], 16) == 2)


def store_blocked_behind_stderr(syscall_file):
    """True when that thread writes to fd 2, or waits for a lock with no timeout:
    task output and trace lines are written under one lock, so a trace line
    waits there while a task's write to the full pipe holds it."""
    try:
        with open(syscall_file) as f:
            fields = f.read().split()
    except OSError:
        return False
    return store_writing_to_stderr(syscall_file) or (
        len(fields) > 4 and fields[0] == str(STORE_FUTEX_SYSCALL) and int(fields[4], 16) == 0)


def store_can_see_syscalls():
    return STORE_WRITE_SYSCALL is not None and os.access("/proc/self/syscall", os.R_OK)


@pytest.mark.skipif(not store_can_see_syscalls(),
                    reason="needs /proc/PID/syscall (Linux on x86_64 or aarch64)")
def test_second_sigint_while_the_first_ones_trace_line_is_blocked_still_exits_130(
        tmp_path, spawn):
    write(tmp_path / "blocked_flow.py", STORE_BLOCKED_FLOW)
    proc = spawn(tmp_path, "run", "blocked_flow.py", read=("stdout",), plain=True)
    pid = proc.proc.pid
    proc.wait_for(r"^MARK ")
    wait_until(lambda: any(store_writing_to_stderr(f) for f in Path(
        "/proc/%d/task" % pid).glob("*/syscall") if f.parent.name != str(pid)))
    proc.proc.send_signal(signal.SIGINT)       # its trace line now waits on the full pipe
    wait_until(lambda: store_blocked_behind_stderr("/proc/%d/syscall" % pid))
    proc.proc.send_signal(signal.SIGINT)
    threading.Thread(target=proc.proc.stderr.read, daemon=True).start()    # unblock it
    try:
        rc = proc.proc.wait(5)
    except subprocess.TimeoutExpired:
        rc = "still running 5 s after the second SIGINT"
    assert rc == 130


def test_runs_cancel_from_another_process_cancels_a_running_run(tmp_path, spawn):
    store_signal_flow(tmp_path)
    proc = spawn(tmp_path, "run", "signal_flow.py", plain=True)
    run_id = proc.wait_for(r"^MARK (\S+)$").group(1)

    running = cli(tmp_path, "runs", "list", "--json", "--status", "RUNNING", plain=True)
    assert [r["run_id"] for r in json.loads(running.stdout)] == [run_id]   # alive, not "dead"
    wait_until(lambda: RunStore(tmp_path / ".pyoco").get(run_id)["tasks"]["work"]["state"]
               == "RUNNING")                # the record follows the run while it runs

    cancel = cli(tmp_path, "runs", "cancel", run_id, plain=True)
    assert cancel.returncode == 0, cancel.stderr
    assert proc.wait() == 130
    assert "AFTER RAN" not in proc.text("stdout")
    record = RunStore(tmp_path / ".pyoco").get(run_id)
    assert record["status"] == "CANCELLED"
    assert record["reason"]
    assert record["tasks"]["work"]["state"] == "SUCCEEDED"
    assert record["tasks"]["after"]["state"] == "CANCELLED"

    again = cli(tmp_path, "runs", "cancel", run_id, plain=True)
    assert again.returncode not in (0, 130)
    assert run_id in again.stderr and "CANCELLED" in again.stderr
    no_traceback(again)


def test_runs_cancel_of_a_finished_run_exits_non_zero_with_a_message(tmp_path):
    store_signal_flow(tmp_path)
    done = cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick", plain=True)
    run_id = run_id_of(done.stderr)
    result = cli(tmp_path, "runs", "cancel", run_id, plain=True)
    assert result.returncode != 0
    assert run_id in result.stderr and "COMPLETED" in result.stderr
    no_traceback(result)
    assert RunStore(tmp_path / ".pyoco").get(run_id)["status"] == "COMPLETED"


def test_runs_cancel_of_an_unknown_id_exits_2(tmp_path):
    result = cli(tmp_path, "runs", "cancel", STORE_UNKNOWN_ID, plain=True)
    assert result.returncode == 2
    assert STORE_UNKNOWN_ID in result.stderr
    no_traceback(result)


def store_cancellable_flow(started, ids):
    @task
    def wait(ctx):
        ids.append(ctx.run_id)
        started.set()
        return "stopped early" if ctx.cancelled.wait(WAIT) else "not cancelled"

    @task
    def after(ctx, wait):
        return "after"

    flow = Flow(name="cancellable")
    flow >> wait >> after
    return flow


def store_cancel_when_started(engine, started, ids, answers):
    def cancel():
        if started.wait(WAIT):
            answers.append(engine.cancel(ids[0]))
    thread = threading.Thread(target=cancel)
    thread.start()
    return thread


def test_engine_cancel_from_another_thread_records_the_run_cancelled(tmp_path):
    started, ids, answers = threading.Event(), [], []
    flow = store_cancellable_flow(started, ids)
    engine = quiet(store=tmp_path)
    thread = store_cancel_when_started(engine, started, ids, answers)
    with pytest.raises(RunCancelled) as caught:
        engine.run(flow)
    thread.join()
    run = caught.value.run
    assert answers == [True]
    assert run.status == "CANCELLED"
    assert run.results == {"wait": "stopped early"}
    record = RunStore(tmp_path).get(run.run_id)
    assert record["status"] == "CANCELLED" and record["reason"]
    assert record["tasks"]["wait"]["state"] == "SUCCEEDED"
    assert record["tasks"]["after"]["state"] == "CANCELLED"


def test_sigint_during_an_in_process_run_cancels_it_and_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGINT)

    class CtrlC:            # what the task sets once it runs: as if Ctrl+C was pressed
        @staticmethod
        def set():
            os.kill(os.getpid(), signal.SIGINT)

    flow = store_cancellable_flow(CtrlC, [])
    run = quiet(store=tmp_path).run(flow, raise_on_failure=False)
    assert signal.getsignal(signal.SIGINT) is before
    assert run.status == "CANCELLED"
    assert run.results == {"wait": "stopped early"}
    record = RunStore(tmp_path).get(run.run_id)
    assert record["status"] == "CANCELLED" and "SIGINT" in record["reason"]
    assert record["tasks"]["after"]["state"] == "CANCELLED"


def test_engine_cancel_of_a_run_it_is_not_running_returns_false(tmp_path):
    assert quiet(store=tmp_path).cancel(STORE_UNKNOWN_ID) is False


# ===========================================================================
# Observers: the trace
# ===========================================================================


# ---------------------------------------------------------------------------
# Cute and plain lines
# ---------------------------------------------------------------------------

PLAIN = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) \S+ .*run_id=\S+")


def _trace_of(flow, **options):
    stream = io.StringIO()
    run = Engine(trace=stream, **options).run(flow, raise_on_failure=False)
    return run, stream.getvalue().splitlines()


def test_cute_trace_lines_for_a_successful_run():
    run, lines = _trace_of(_hello_flow(), cute=True)
    expected = [
        r"🐇 pyoco > start flow=hello run_id=%s" % re.escape(run.run_id),
        r"🏃 start node=fetch",
        r"✅ done node=fetch \(\d+\.\d\d ms\)",
        r"🏃 start node=shout",
        r"✅ done node=shout \(\d+\.\d\d ms\)",
        r"🥕 done flow=hello",
    ]
    assert len(lines) == len(expected), lines
    for pattern, line in zip(expected, lines):
        assert re.fullmatch(pattern, line), (pattern, line)


def test_cute_trace_lines_for_retry_error_and_skip():
    @task(retries=2, retry_delay=0.5, name="shout")
    def process(ctx):
        if ctx.attempt == 1:
            raise ValueError("first try")
        return "ok"

    @task(fail_policy="isolate")
    def save(ctx):
        raise ValueError("bad value")

    @task
    def publish(ctx):
        return None

    @task
    def gate(ctx):
        ctx.skip("nothing new")

    flow = Flow("hello")
    flow >> process
    flow >> save >> publish
    flow >> gate
    run, lines = _trace_of(flow, cute=True, workers=4)
    assert "🔁 retry node=shout attempt=2/3 in 0.5s" in lines
    assert "💥 error node=save ValueError: bad value" in lines
    assert "⏭️ skip node=gate (nothing new)" in lines
    skip_publish = [line for line in lines if line.startswith("⏭️ skip node=publish ")]
    assert len(skip_publish) == 1
    assert re.fullmatch(r"⏭️ skip node=publish \(.*save.*\)", skip_publish[0])
    assert lines[0].startswith("🐇 pyoco > start flow=hello run_id=")
    assert len(lines) == len(run.events)


def test_cute_cancel_line():
    flow, started, proceed, _ = _cancel_setup()
    stream = io.StringIO()
    engine = Engine(trace=stream, cute=True, workers=1)
    with _cancel_when_started(engine, "c1", started, proceed):
        engine.run(flow, run_id="c1", raise_on_failure=False)
    assert "🛑 cancel flow=cancel" in stream.getvalue().splitlines()


def test_trace_goes_to_stderr_by_default(capsys):
    Engine(cute=True).run(_hello_flow())
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith("🐇 pyoco > start flow=hello run_id=")
    assert lines[-1] == "🥕 done flow=hello"


def test_trace_false_is_silent(capsys):
    run = Engine(trace=False).run(_hello_flow())
    assert run.status == "COMPLETED"
    assert capsys.readouterr() == ("", "")


def _mixed_flow():
    fetch = task(name="möhre")(lambda ctx: 1)

    @task(retries=1)
    def flaky(ctx):
        if ctx.attempt == 1:
            raise ValueError("süß 🥕 \"quoted\"\nsecond line")

    @task(fail_policy="isolate")
    def broken(ctx):
        raise ValueError("bad value 🥕")

    after = task(name="after")(lambda ctx: None)
    flow = Flow("plain 🐇")
    flow >> fetch >> flaky
    flow >> broken >> after
    return flow


def _assert_plain(lines, run):
    assert lines, "no trace"
    for line in lines:
        assert line.isascii(), line
        assert PLAIN.match(line), line
        assert line.endswith("run_id=" + run.run_id) or ("run_id=%s " % run.run_id) in line, line
    assert len(lines) == len(run.events)


def test_plain_trace_with_pyoco_cute_0_is_ascii_lines_with_run_id(monkeypatch):
    monkeypatch.setenv("PYOCO_CUTE", "0")
    run, lines = _trace_of(_mixed_flow())
    _assert_plain(lines, run)
    assert_recent_utc(lines[0])
    levels = [PLAIN.match(line).group(1) for line in lines]
    assert {"INFO", "WARNING", "ERROR"} <= set(levels)
    assert " INFO start node=" in lines[1]


def test_plain_trace_with_cute_false():
    run, lines = _trace_of(_mixed_flow(), cute=False)
    _assert_plain(lines, run)
    assert re.search(r" ERROR error node=broken .*bad value", "\n".join(lines))


def test_cute_true_wins_over_pyoco_cute_0(monkeypatch):
    monkeypatch.setenv("PYOCO_CUTE", "0")
    _, lines = _trace_of(_hello_flow(), cute=True)
    assert lines[0].startswith("🐇 pyoco > start")


# ---------------------------------------------------------------------------
# The pyoco logger and live progress
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def _pyoco_log_records(level, root_level=None):
    """The records the "pyoco" logger (at ``level``) hands a handler inside the block."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger, root = logging.getLogger("pyoco"), logging.getLogger()
    old_levels = logger.level, root.level
    logger.setLevel(level)
    if root_level is not None:
        root.setLevel(root_level)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_levels[0])
        root.setLevel(old_levels[1])


def test_pyoco_logger_receives_events_when_a_handler_is_attached():
    with _pyoco_log_records(logging.INFO) as records:
        run = Engine(trace=False).run(_mixed_flow(), raise_on_failure=False)
    messages = [(r.levelname, r.getMessage()) for r in records]
    assert len(records) == len(run.events)
    assert any(level == "INFO" and m.startswith("start flow=") for level, m in messages)
    assert any(level == "ERROR" and m.startswith("error node=broken") for level, m in messages)
    assert any(level == "WARNING" and m.startswith("skip node=after") for level, m in messages)
    assert all(("run_id=" + run.run_id) in m for _, m in messages)


def test_pyoco_logger_at_default_level_still_receives_errors():
    with _pyoco_log_records(logging.NOTSET, root_level=logging.WARNING) as records:
        Engine(trace=False).run(_mixed_flow(), raise_on_failure=False)
    assert any(r.levelname == "ERROR" and "broken" in r.getMessage() for r in records)

# -- Progress on a terminal: `pyoco run` under a real pseudo-terminal

needs_pty = pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")),
                               reason="needs a pseudo-terminal (pty)")


def pty_run(cwd, *args, columns=80, env=None, stdout=None, when=None, timeout=60,
            python=None):
    """Run ``python -m pyoco ARGS`` (or ``python PYTHON...``) with stderr (and
    stdout, unless given) on a pseudo-terminal ``columns`` wide. Returns
    (exit code, all the terminal received, decoded). ``when(proc, received)``
    is called as output comes in, to send signals."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    command = python or ["-m", "pyoco"] + list(args)
    proc = subprocess.Popen([sys.executable] + [str(a) for a in command],
                            cwd=str(cwd), env=env or child_env(TERM="xterm"),
                            stdin=subprocess.DEVNULL,
                            stdout=slave if stdout is None else stdout, stderr=slave)
    os.close(slave)
    received, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, "no end after %s s:\n%s" % (
                timeout, received.decode("utf-8", "replace")[-2000:])
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:             # EIO: the process closed the terminal
                break
            if not chunk:
                break
            received += chunk
            if when is not None:
                when(proc, received)
        return proc.wait(WAIT), received.decode("utf-8")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


ESCAPE = re.compile(r"\x1b\[(\d*)([A-Za-z])")


def screen_of(received):
    """The rows a terminal shows after ``received``: carriage returns, line
    feeds, ESC[K (erase to the end of the row) and ESC[A (up) applied. Any
    other escape sequence fails the test: pyoco uses no others."""
    rows, row, col, at = [[]], 0, 0, 0
    while at < len(received):
        ch = received[at]
        if ch == "\x1b":
            found = ESCAPE.match(received, at)
            assert found and found.group(2) in "KA", repr(received[at:at + 10])
            if found.group(2) == "K":
                del rows[row][col:]
            else:
                row = max(0, row - int(found.group(1) or 1))
            at = found.end()
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            rows.extend([] for _ in range(row + 1 - len(rows)))
        else:
            cells = rows[row]
            cells.extend(" " * (col - len(cells)))
            cells[col:col + 1] = [ch]
            col += 1
        at += 1
    return ["".join(cells) for cells in rows]


def drawn_lines(received):
    """Every progress or status line drawn, as it was drawn (between the
    carriage returns, newlines and escapes around it)."""
    return [part for part in re.split(r"\r|\n|\x1b\[\d*[A-Za-z]", received)
            if part.startswith(("🗺️", "⏳"))]


def cells(text):
    """Terminal cells, as SPEC section 3 counts them: an emoji (or a wide
    character) two, U+FE0F making the character before it an emoji."""
    import unicodedata
    widths = []
    for ch in text:
        if ch == "\ufe0f":
            widths[-1:] = [2] if widths[-1:] == [1] else widths[-1:]
        elif unicodedata.east_asian_width(ch) in "WF":
            widths.append(2)
        elif not unicodedata.combining(ch):
            widths.append(1)
    return sum(widths)


PROGRESS_FLOW = map_flow("big", 200, options='(retries=1, fail_policy="isolate")', body="""
    time.sleep(0.04)
    if x == 3 and ctx.attempt == 1:
        raise ValueError("flaky item")
    if x == 7:
        raise ValueError("broken item")
    if x % 50 == 0:
        print("item %d says hello" % x)
        print("item %d on stderr" % x, file=sys.stderr)
    return x
""", total="return sum(work)")

MAP_LINE = re.compile(r"🗺️ work \d+/200 done · \d+ running · \d+ failed"
                      r"( · \d+(\.\d)?/s · ETA \d+s)?")
TASK_OUTPUT = ["item %d %s" % (x, what) for x in (0, 50, 100, 150)
               for what in ("says hello", "on stderr")]


@needs_pty
def test_progress_on_a_terminal_shows_a_200_item_map_in_a_few_lines(tmp_path):
    write(tmp_path / "big.py", PROGRESS_FLOW)
    code, received = pty_run(tmp_path, "run", "big.py")
    assert code == 1, received
    rows = screen_of(received)
    assert rows[-1] == "", "the cursor ends at column 0 of an empty row"
    rows = rows[:-1]
    trace = [row for row in rows if row not in TASK_OUTPUT]
    assert sorted(set(rows) - set(trace)) == sorted(TASK_OUTPUT), rows   # whole rows each
    assert len(trace) <= 12, "\n".join(rows)
    assert "🏃 start node=work" in trace
    assert "🔁 retry node=work[3] attempt=2/2 in 0s" in trace
    assert "💥 error node=work[7] ValueError: broken item" in trace
    final = [row for row in trace if row.startswith("💥 error node=work ")]
    assert len(final) == 1 and re.fullmatch(r"💥 error node=work 199/200 · 1 failed"
                                            r" \((\d+\.\d\d ms|\d\.\d\d s)\)", final[0]), trace
    assert trace.index(final[0]) > trace.index("💥 error node=work[7] ValueError: broken item")
    assert "💔 failed flow=big (2 tasks failed)" in trace     # as without progress lines
    assert not [row for row in rows if "🗺️" in row or "⏳" in row], rows
    assert not [row for row in trace if re.search(r"node=work\[\d+\] \(|start node=work\[",
                                                  row)], "instances have no lines of their own"
    drawn = drawn_lines(received)
    assert drawn, "the progress line was never drawn:\n" + received
    for line in drawn:
        assert MAP_LINE.fullmatch(line), line
        assert cells(line) <= 80, line
    # Redrawn by a timer: about ten times a second, and once more after each
    # line written while it is shown; never once per event (400 here).
    seconds = float(re.search(r"\((\d+\.\d\d) s\)", final[0]).group(1)) if " s)" in \
        final[0] else 1.0
    assert len(drawn) <= 11 * seconds + len(rows) + 2, (len(drawn), seconds)


@needs_pty
@pytest.mark.parametrize("how", ["--progress off", "PYOCO_PROGRESS=0", "--non-cute"])
def test_progress_off_on_a_terminal_prints_every_event_as_a_line(tmp_path, how):
    write(tmp_path / "big.py", PROGRESS_FLOW)
    args, env = ["run", "big.py"], child_env(TERM="xterm")
    if how.startswith("--"):
        args += how.split()
    else:
        env["PYOCO_PROGRESS"] = "0"
    code, received = pty_run(tmp_path, *args, env=env)
    assert code == 1, received
    assert "\x1b" not in received and "🗺️" not in received
    assert "\r" not in received.replace("\r\n", "\n")
    rows = screen_of(received)
    word = "INFO start" if how == "--non-cute" else "🏃 start"
    starts = [row for row in rows if re.search(r"%s node=work\[\d+\]" % word, row)]
    assert len(starts) == 200
    assert len(rows) > 400


PIPED_FLOW = map_flow("piped", 50, 'print("item", x)\nreturn x')

@needs_pty
@pytest.mark.parametrize("flag", [[], ["--progress", "on"]], ids=["auto", "on"])
def test_progress_piped_to_a_file_is_every_event_as_a_line(tmp_path, flag):
    write(tmp_path / "piped.py", PIPED_FLOW)
    out = tmp_path / "out.txt"
    with open(str(out), "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "pyoco", "run", "piped.py", "--workers",
                               "1"] + flag, cwd=str(tmp_path), env=child_env(TERM="xterm"),
                              stdout=f, stderr=subprocess.STDOUT, timeout=60)
    assert proc.returncode == 0
    text = out.read_text(encoding="utf-8")
    assert "\r" not in text and "\x1b" not in text
    took = r" \(\d+\.\d\d m?s\)"
    expected = [r"🐇 pyoco > start flow=piped run_id=\S+", "🏃 start node=items",
                "✅ done node=items" + took, "🏃 start node=work"]
    for x in range(50):
        expected += [re.escape("🏃 start node=work[%d]" % x), "item %d" % x,
                     re.escape("✅ done node=work[%d]" % x) + took]
    expected += ["✅ done node=work" + took, "🥕 done flow=piped"]
    lines = text.splitlines()
    assert len(lines) == len(expected), text
    for pattern, line in zip(expected, lines):
        assert re.fullmatch(pattern, line), (pattern, line)


def test_progress_flag_is_on_or_off_for_run_and_serve(tmp_path):
    write(tmp_path / "piped.py", PIPED_FLOW)
    proc = usage_error(cli(tmp_path, "run", "piped.py", "--progress", "maybe"),
                       "--progress", "'on', 'off'")
    parser = pyoco._build_parser()
    assert parser.parse_args(["run", "f.py"]).progress is None
    assert parser.parse_args(["run", "f.py", "--progress", "on"]).progress == "on"
    assert parser.parse_args(["serve", "--progress", "off"]).progress == "off"


def slow_map_flow(seconds):
    return map_flow("slow", 200, "time.sleep(%s)\nreturn x" % seconds, total="return sum(work)")


@needs_pty
@pytest.mark.parametrize("signals", [1, 2], ids=["ctrl-c", "ctrl-c-twice"])
def test_progress_ctrl_c_leaves_the_terminal_clean(tmp_path, signals):
    write(tmp_path / "slow.py", slow_map_flow(0.2 if signals == 1 else 2.0))
    sent = []

    def interrupt(proc, received):
        if not sent and "🗺️".encode() in received:
            sent.append(proc.send_signal(signal.SIGINT))
        elif len(sent) < signals and "🛑 cancel flow".encode() in received:
            sent.append(proc.send_signal(signal.SIGINT))
    code, received = pty_run(tmp_path, "run", "slow.py", when=interrupt)
    assert len(sent) == signals
    assert code == 130, received
    rows = screen_of(received)
    assert rows[-1] == "", "the cursor ends at column 0 of an empty row"
    assert not [row for row in rows if "🗺️" in row or "\x1b" in row], rows
    assert "🛑 cancel flow=slow" in rows
    assert "🛑 cancelled flow=slow" in rows
    final = [row for row in rows if row.startswith("🚫 cancelled node=work ")]
    assert len(final) == 1, rows
    found = re.fullmatch(r"🚫 cancelled node=work (\d+)/200 · (\d+) cancelled \(.*\)", final[0])
    assert found and int(found.group(1)) + int(found.group(2)) == 200, final
    line = re.compile(r"(🐇 pyoco > start|🏃 start node=|✅ done node=|🛑 cancel|🚫 cancelled"
                      r" node=|pyoco: run )")
    assert all(line.match(row) for row in rows[:-1]), rows


LONG_NAMES_FLOW = """\
    import time
    from pyoco import Flow, task

    @task(name="fetch_the_customers_from_the_very_far_away_database")
    def fetch(ctx):
        time.sleep(2.6)

    @task
    def items(ctx):
        return list(range(400))

    @task(name="a_map_whose_name_is_much_too_long_for_a_narrow_terminal")
    def work(ctx, x):
        time.sleep(0.05)
        return x

    flow = Flow("narrow")
    flow >> fetch
    flow >> items >> work.map("$node.items.output")
"""


@needs_pty
def test_progress_lines_fit_the_terminal_and_name_slow_tasks(tmp_path):
    write(tmp_path / "narrow.py", LONG_NAMES_FLOW)
    code, received = pty_run(tmp_path, "run", "narrow.py", columns=50)
    assert code == 0, received
    drawn = drawn_lines(received)
    assert drawn and all(cells(line) <= 50 for line in drawn), [
        (cells(line), line) for line in drawn if cells(line) > 50]
    maps = [line for line in drawn if line.startswith("🗺️")]
    assert maps and all(re.fullmatch(r"🗺️ a_map_\S*…\S* \d+/400 done · .*", line)
                        for line in maps), maps
    status = [line for line in drawn if line.startswith("⏳")]
    assert status, "a task ran for more than 2 s: the status line shows it"
    for line in status:
        assert re.fullmatch(r"⏳ \d+/40\d tasks done · running: fetch\S*…\S* \(\d s\)",
                            line), line
    rows = screen_of(received)
    assert "✅ done node=fetch_the_customers_from_the_very_far_away_database" \
           " (2.6" in "\n".join(rows)             # what is not redrawn keeps its full name
    assert any(re.fullmatch(r"✅ done node=a_map_whose_name_is_much_too_long_for_a_narrow"
                            r"_terminal 400/400 \(.*\)", row) for row in rows), rows
    assert rows[-1] == ""


WORKER_PROCESSES_SCRIPT = map_flow("processes", 40, 'print("item", x)\nreturn x',
                                   main="executor=sys.argv[1], store=False, workers=2")


@needs_pty
def test_progress_is_lines_when_tasks_run_in_worker_processes(tmp_path):
    """A worker process prints to the terminal itself, where pyoco cannot
    keep its lines off a progress line: every event is a line then."""
    write(tmp_path / "processes.py", WORKER_PROCESSES_SCRIPT)
    code, received = pty_run(tmp_path, python=["processes.py", "process"])
    assert code == 0, received
    assert "\x1b" not in received and "🗺️" not in received
    rows = screen_of(received)
    assert sum(row.startswith("🏃 start node=work[") for row in rows) == 40
    assert sorted(row for row in rows if row.startswith("item ")) == sorted(
        "item %d" % x for x in range(40))


@pytest.mark.parametrize("text, room, expected", [
    ("fetch", 10, "fetch"),
    ("a_long_task_name", 9, "a_lo…name"),
    ("a_long_task_name", 3, "a…e"),
    ("a_long_task_name", 2, "a_"),
    ("🥕🥕🥕🥕", 5, "🥕…🥕"),
    ("work[12]", 8, "work[12]"),
])
def test_progress_names_are_shortened_in_the_middle(text, room, expected):
    assert pyoco._shorten(text, room) == expected
    assert pyoco._cells(expected) <= room


@pytest.mark.parametrize("text, width", [
    ("work", 4), ("🗺️ work", 7), ("⏳ 1/2", 6), ("✅", 2), ("·", 1), ("ｗ", 2), ("e\u0301", 1),
])
def test_progress_width_counts_emoji_and_wide_characters_as_two(text, width):
    assert pyoco._cells(text) == width


def test_progress_line_drops_what_does_not_fit():
    parts = ["120/200 done", "8 running", "1 failed", "35/s", "ETA 2s"]
    wide = pyoco._fit("🗺️ ", "work", parts, 79)
    assert wide == "🗺️ work 120/200 done · 8 running · 1 failed · 35/s · ETA 2s"
    narrow = pyoco._fit("🗺️ ", "a_rather_long_map_name", parts, 49)
    assert narrow == "🗺️ a_rather_l…g_map_name 120/200 done · 8 running"
    assert pyoco._cells(narrow) <= 49
    assert pyoco._cells(pyoco._fit("🗺️ ", "x" * 100, parts, 10)) <= 10


@pytest.mark.parametrize("instances", [0, 1, 2, 3, 7, 8, 9, 200, 1025])
def test_progress_counts_the_instances_of_a_map_from_their_names(instances):
    class Plan:
        index = {"other": 0, "work": 1, "work_2[0]": 2}
    Plan.index.update(("work[%d]" % j, 3 + j) for j in range(instances))
    assert pyoco._instance_count(Plan, "work") == instances


def test_progress_option_is_checked_and_off_the_terminal_changes_nothing():
    with pytest.raises(ValueError, match="progress"):
        Engine(progress="on")
    for progress in (None, True, False):
        run, lines = _trace_of(_hello_flow(), cute=True, progress=progress)
        assert len(lines) == len(run.events) == 6


# ---------------------------------------------------------------------------
# Trace backends written for the original pyoco (SPEC section 15)
# ---------------------------------------------------------------------------

class RecordingBackend(pyoco.TraceBackend):
    """A trace backend written for the original: it keeps what it is told."""

    def __init__(self):
        self.calls = []

    def on_flow_start(self, flow_name, run_id=None):
        self.calls.append(("flow_start", flow_name, run_id))

    def on_flow_end(self, flow_name):
        self.calls.append(("flow_end", flow_name))

    def on_node_start(self, node_name):
        self.calls.append(("start", node_name))

    def on_node_end(self, node_name, duration_ms):
        assert duration_ms >= 0
        self.calls.append(("end", node_name))

    def on_node_error(self, node_name, error):
        self.calls.append(("error", node_name, repr(error)))


def test_a_trace_backend_is_told_of_the_run_instead_of_the_trace(capfd):
    from pyoco.core.engine import Engine
    from pyoco.core.models import Flow, Task

    def boom():
        raise ValueError("Boom")

    a, b = Task(func=lambda: 1, name="A"), Task(func=boom, name="B")
    flow = Flow()
    flow.add_task(a)
    flow.add_task(b)
    b.dependencies.add(a)
    backend = RecordingBackend()
    run = Engine(trace_backend=backend, store=False).run(flow, raise_on_failure=False)
    assert backend.calls == [("flow_start", "main", run.run_id), ("start", "A"), ("end", "A"),
                             ("start", "B"), ("error", "B", "ValueError('Boom')"),
                             ("flow_end", "main")]
    assert capfd.readouterr().err == ""         # the backend replaces pyoco's own trace
    with pytest.raises(TypeError, match="trace_backend must be a pyoco.TraceBackend"):
        Engine(trace_backend="cute")


@pytest.mark.parametrize("style, lines", [
    ("cute", ["🐇 pyoco > start flow=main run_id=", "🏃 start node=one", "✅ done node=one (",
              "🥕 done flow=main"]),
    ("plain", ["INFO pyoco start flow=main run_id=", "INFO pyoco start node=one",
               "INFO pyoco end node=one dur_ms=", "INFO pyoco end flow=main"]),
])
def test_console_trace_backend_prints_the_originals_lines_to_stdout(capfd, style, lines):
    from pyoco.trace.console import ConsoleTraceBackend
    from pyoco.core.engine import Engine
    Engine(trace_backend=ConsoleTraceBackend(style=style), store=False).run(
        flow_of_one(lambda: "ok"))
    out = capfd.readouterr().out.splitlines()
    assert [line.startswith(want) for line, want in zip(out, lines)] == [True] * 4, out
    with pytest.raises(ValueError, match="did you mean 'plain'"):
        ConsoleTraceBackend(style="plan")


# ===========================================================================
# Observers: the run store
# ===========================================================================


# ---------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------

def test_retention_keeps_the_newest_runs_even_within_one_second(tmp_path, monkeypatch):
    @task
    def one(ctx):
        return 1

    flow = Flow("many")
    flow >> one
    engine = Engine(trace=False, store=tmp_path)
    ids = [engine.run(flow).run_id for _ in range(6)]
    assert ids == sorted(ids)
    monkeypatch.setenv("PYOCO_MAX_RUN_HISTORY", "2")
    last = engine.run(flow).run_id
    assert pyoco.RunStore(tmp_path).ids() == [ids[-1], last]


def store_tiny_flow():
    @task
    def one(ctx):
        print("one")
        ctx.save_artifact("one.txt", "1")
        return 1

    flow = Flow(name="tiny")
    flow >> one
    return flow


def test_max_run_history_keeps_3_run_folders_after_5_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_MAX_RUN_HISTORY", "3")
    engine = quiet(store=tmp_path)
    flow = store_tiny_flow()
    runs = [engine.run(flow) for _ in range(5)]
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == sorted(r.run_id for r in runs[-3:])
    assert len(RunStore(tmp_path).list()) == 3


def test_max_run_history_prunes_the_oldest_runs_by_time(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_MAX_RUN_HISTORY", "3")
    engine = quiet(store=tmp_path)
    flow = store_tiny_flow()
    for run_id in ["run-e", "run-d", "run-c", "run-b", "run-a"]:      # oldest first
        engine.run(flow, run_id=run_id)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-a", "run-b", "run-c"]


# ---------------------------------------------------------------------------
# The run record
# ---------------------------------------------------------------------------

def store_failing_flow():
    @task
    def ok(ctx):
        return {"n": 1}

    @task
    def bad(ctx, ok):
        raise ValueError("boom %d" % ok["n"])

    @task
    def never(ctx, bad):
        return "never"

    flow = Flow(name="record")
    flow >> ok >> bad >> never
    return flow


def test_recorded_run_has_every_spec_key_with_iso_utc_times_and_nulls(tmp_path):
    run = quiet(store=tmp_path / "store").run(
        store_failing_flow(), {"day": "2026-11-29"}, raise_on_failure=False)
    record = RunStore(tmp_path / "store").get(run.run_id)

    assert set(record) >= RUN_KEYS
    assert record["run_id"] == run.run_id
    assert record["flow"] == "record"
    assert record["status"] == "FAILED"
    assert record["params"] == {"day": "2026-11-29"}
    assert ISO.match(record["started_at"]) and ISO.match(record["ended_at"])
    assert record["started_at"] <= record["ended_at"]
    assert isinstance(record["duration_ms"], (int, float)) and record["duration_ms"] >= 0
    assert record["resumed_from"] is None

    assert set(record["tasks"]) == {"ok", "bad", "never"}
    for name, t in record["tasks"].items():
        assert set(t) >= STORE_TASK_KEYS, name
    ok, bad, never = (record["tasks"][n] for n in ("ok", "bad", "never"))
    assert ok["state"] == "SUCCEEDED" and ok["attempts"] == 1
    assert ISO.match(ok["started_at"]) and ISO.match(ok["ended_at"])
    assert ok["duration_ms"] >= 0
    assert (ok["error"], ok["traceback"], ok["reason"], ok["artifacts"]) == (None, None, None, {})
    assert bad["state"] == "FAILED" and bad["attempts"] == 1
    assert bad["error"] == "ValueError: boom 1"
    assert "Traceback" in bad["traceback"] and 'raise ValueError("boom %d"' in bad["traceback"]
    assert never["state"] == "SKIPPED" and never["attempts"] == 0
    assert (never["started_at"], never["ended_at"], never["duration_ms"]) == (None, None, None)
    assert never["error"] is None and never["traceback"] is None
    assert "bad" in never["reason"]

    events = record["events"]
    for ev in events:
        assert set(ev) >= STORE_EVENT_KEYS, ev
        assert ISO.match(ev["ts"]), ev
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    run_events = [e for e in events if e["task"] is None]
    assert [(e["event"], e["state"]) for e in run_events] == [("run.started", "RUNNING"),
                                                               ("run.failed", "FAILED")]
    assert [(e["event"], e["state"]) for e in events if e["task"] == "bad"] == [
        ("task.started", "RUNNING"), ("task.failed", "FAILED")]


def test_stored_record_equals_the_runs_own_record(tmp_path):
    class Weird(Task):
        name = 'we"ird name'

        def run(self, ctx):
            ctx.save_artifact("out.txt", "x")
            return 1

    flow = store_failing_flow()
    flow.add(Weird())
    run = quiet(store=tmp_path).run(flow, {"n": [1, 2]}, raise_on_failure=False)
    expected = json.loads(json.dumps(run.to_dict()))
    assert RunStore(tmp_path).get(run.run_id) == expected


def store_strict_json(text):
    """json.loads as RFC 8259 reads it: bare NaN, Infinity and -Infinity are errors."""
    def refuse(name):
        raise AssertionError("bare %s in %r" % (name, text[:300]))
    return json.loads(text, parse_constant=refuse)


def test_records_answers_and_webhook_bodies_are_strict_json_whatever_floats_they_hold(
        tmp_path, srv_serve, srv_receiver, monkeypatch):
    receiver = srv_receiver()
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    store = tmp_path / "store"
    nan, inf = float("nan"), float("inf")

    @task
    def ratio(ctx, threshold):
        return threshold

    @task
    def spread(ctx, ratio):
        return {"low": -inf, "high": inf, "seen": [ratio]}

    @task
    def report(ctx, spread):
        raise ValueError("out of range: %r" % spread)

    flow = Flow("floats")
    flow >> ratio >> spread >> report
    params = {"threshold": nan, "limits": [inf, -inf], "nested": {"x": (nan, 1.5)}}
    run = quiet(store=store).run(flow, params, raise_on_failure=False)
    assert run.status == "FAILED"           # a failed run keeps its outputs, for --resume
    pyoco.drain_webhooks()
    [(_, _, body)] = receiver.wait_for(1)
    assert store_strict_json(body.decode("utf-8"))["run_id"] == run.run_id

    folder = store / "runs" / run.run_id
    record = store_strict_json((folder / "run.json").read_text("utf-8"))
    assert record["params"] == {"threshold": "NaN", "limits": ["Infinity", "-Infinity"],
                                "nested": {"x": ["NaN", 1.5]}}
    for line in (folder / "outputs.jsonl").read_text("utf-8").splitlines():
        store_strict_json(line)
    outputs = RunStore(store).load_outputs(run.run_id)      # resume still gets the floats
    assert math.isnan(outputs["ratio"]) and outputs["spread"]["high"] == inf

    for args in (["runs", "show", run.run_id, "--json"], ["runs", "list", "--json"]):
        shown = cli(tmp_path, *args, "--store", store, plain=True)
        assert shown.returncode == 0, shown.stderr
        store_strict_json(shown.stdout)
    server = srv_serve(store)
    for path in ("/runs", "/runs/" + run.run_id):
        status, _, data = srv_request(server.url, "GET", path)
        assert status == 200
        store_strict_json(data.decode("utf-8"))


def test_cli_params_nan_and_infinity_are_strings_as_they_are_not_json(tmp_path, srv_serve):
    flow_file = write(tmp_path / "floats.py", """\
        from pyoco import task, Flow

        @task
        def show(ctx, threshold, big):
            print("GOT", repr(threshold), repr(big))
            return threshold

        flow = Flow("floats")
        flow >> show
        """)
    store = tmp_path / "store"
    done = cli(tmp_path, "run", flow_file, "-p", "threshold=NaN", "-p", "big=-Infinity",
               "--store", store, plain=True)
    assert done.returncode == 0, done.stderr
    assert "GOT 'NaN' '-Infinity'" in done.stdout
    [run_id] = RunStore(store).ids()
    record = store_strict_json((store / "runs" / run_id / "run.json").read_text("utf-8"))
    assert record["params"] == {"threshold": "NaN", "big": "-Infinity"}
    server = srv_serve(store, flows={"floats": pyoco.load_flow(str(flow_file))})
    status, body = srv_json(server.url, "POST", "/runs",
                            b'{"flow": "floats", "params": {"threshold": NaN, "big": 1}}')
    assert status == 400 and "NaN" in body["error"]


# run.json files that hold valid JSON but no pyoco record, by run id
STORE_FOREIGN_RECORDS = {
    "20260101-000000-00001": "{}",
    "20260101-000000-00002": "[]",
    "20260101-000000-00003": '"a string"',
    "20260101-000000-00004": "null",
    "20260101-000000-00005": "42",
    "20260101-000000-00006": '{"kind": "something else", "items": [1, 2]}',
    "20260101-000000-00007": '{"run_id": "x", "flow": "f"}',
    "20260101-000000-00008": '{"run_id": "x", "flow": "f", "status": "COMPLETED", "tasks": []}',
    "20260101-000000-00009": '{"run_id": "x", "flow": "f", "status": "DONE", "tasks": {}}',
    "20260101-000000-0000a": '{"run_id": "x", "flow": "f", "status": "FAILED",'
                             ' "tasks": {"t": {"state": "FAILED", "attempts": "3"}}}',
    "20260101-000000-0000b": '{"run_id": "x", "flow": "f", "status": "COMPLETED", "tasks": {},'
                             ' "started_at": 5, "duration_ms": "1 s"}',
    "20260101-000000-0000c": '{"run_id": "x", "flow": "f", "status": "COMPLETED", "tasks": {},'
                             ' "events": [1]}',
}


def test_record_files_that_are_not_pyoco_records_are_skipped_by_every_reader(
        tmp_path, srv_serve, capsys):
    store = tmp_path / "store"
    good = quiet(store=store).run(store_failing_flow(), {"n": [1]},
                                  raise_on_failure=False)
    for run_id, text in STORE_FOREIGN_RECORDS.items():
        (store / "runs" / run_id).mkdir()
        (store / "runs" / run_id / "run.json").write_text(text, encoding="utf-8")
        (store / "runs" / run_id / "graph.json").write_text("[]", encoding="utf-8")
    # a real record whose process.json has another shape is read, not skipped
    running = "20260101-000000-0000d"
    (store / "runs" / running).mkdir()
    (store / "runs" / running / "run.json").write_text(json.dumps(
        {"run_id": running, "flow": "elsewhere", "status": "RUNNING", "tasks": {},
         "started_at": "2026-01-01T00:00:00.000Z"}), encoding="utf-8")
    (store / "runs" / running / "process.json").write_text("[]", encoding="utf-8")
    bad_files = [str(store / "runs" / run_id / "run.json") for run_id in STORE_FOREIGN_RECORDS]

    def warned_once_each(err):
        assert "Traceback" not in err, err
        for path in bad_files:
            assert err.count(path) == 1, (path, err)
        assert len(err.strip().splitlines()) == len(bad_files), err

    listed = cli(tmp_path, "runs", "list", "--store", store, plain=True)
    assert listed.returncode == 0, listed.stderr
    assert good.run_id in listed.stdout and running in listed.stdout
    warned_once_each(listed.stderr)
    as_json = cli(tmp_path, "runs", "list", "--json", "--store", store, plain=True)
    assert [r["run_id"] for r in json.loads(as_json.stdout)] == [good.run_id, running]
    warned_once_each(as_json.stderr)
    bad = "20260101-000000-00008"
    for args in (["runs", "show", bad], ["runs", "show", bad, "--json"]):
        shown = cli(tmp_path, *args, "--store", store, plain=True)
        assert shown.returncode == 2 and "no run" in shown.stderr, shown.stderr
        assert shown.stderr.count(bad_files[7]) == 1 and "Traceback" not in shown.stderr

    capsys.readouterr()
    server = srv_serve(store)
    status, records = srv_json(server.url, "GET", "/runs")
    assert status == 200 and [r["run_id"] for r in records] == [good.run_id, running]
    samples = srv_metrics(server.url)[2]
    assert srv_value(samples, "pyoco_store_runs") == 2
    assert srv_value(samples, "pyoco_runs_in_progress", flow="elsewhere") == 1
    for run_id in STORE_FOREIGN_RECORDS:
        for path in ("", "/logs", "/graph", "/artifacts/x"):
            assert srv_json(server.url, "GET", "/runs/" + run_id + path)[0] == 404, path
        assert srv_request(server.url, "GET", "/runs/%s/view" % run_id)[0] == 200
        assert srv_json(server.url, "POST", "/runs/%s/cancel" % run_id)[0] == 404
    server.view.refresh(force=True)
    assert srv_metrics(server.url)[0] is not None
    warned_once_each(capsys.readouterr().err)


def test_engine_store_false_writes_nothing_even_with_pyoco_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PYOCO_HOME", str(home))
    run = quiet(store=False).run(store_failing_flow(), raise_on_failure=False)
    assert run.status == "FAILED"
    assert not home.exists()
    assert store_files(tmp_path) == []


def test_pyoco_home_alone_makes_the_api_record(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_HOME", str(tmp_path / "home"))
    run = quiet().run(store_failing_flow(), raise_on_failure=False)
    assert RunStore(tmp_path / "home").get(run.run_id)["status"] == "FAILED"


def test_api_records_nothing_without_store_or_pyoco_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quiet().run(store_failing_flow(), raise_on_failure=False)
    assert store_files(tmp_path) == []


def test_engine_store_path_wins_over_pyoco_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_HOME", str(tmp_path / "home"))
    run = quiet(store=tmp_path / "mine").run(store_failing_flow(), raise_on_failure=False)
    assert RunStore(tmp_path / "mine").ids() == [run.run_id]
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("where", ["default", "pyoco_home", "store_flag"])
def test_cli_records_in_dot_pyoco_unless_pyoco_home_or_store_says_otherwise(tmp_path, where):
    store_signal_flow(tmp_path)
    args = ["run", "signal_flow.py", "-p", "mode=quick"]
    env = child_env(plain=True)
    if where != "default":
        env["PYOCO_HOME"] = str(tmp_path / "home")
    if where == "store_flag":
        args += ["--store", "flagged"]
    result = cli(tmp_path, *args, env=env)
    assert result.returncode == 0, result.stderr
    run_id = run_id_of(result.stderr)
    expected = {"default": tmp_path / ".pyoco", "pyoco_home": tmp_path / "home",
                "store_flag": tmp_path / "flagged"}[where]
    for folder in (tmp_path / ".pyoco", tmp_path / "home", tmp_path / "flagged"):
        assert (folder / "runs" / run_id / "run.json").is_file() == (folder == expected)
    assert RunStore(expected).get(run_id)["status"] == "COMPLETED"


def test_recording_leaves_sys_stdout_and_stderr_as_they_were(tmp_path):
    before = (sys.stdout, sys.stderr)

    @task
    def talk(ctx):
        print("hello")
        return 1

    flow = Flow(name="streams")
    flow >> talk
    quiet(store=tmp_path).run(flow)
    assert (sys.stdout, sys.stderr) == before


def test_params_json_cannot_hold_still_leave_a_readable_record(tmp_path):
    @task
    def fine(ctx):
        return "ok"

    flow = Flow("odd-params")
    flow >> fine
    run = Engine(trace=False, store=tmp_path).run(flow, {"grid": {(0, 0): "x"}})
    assert run.status == "COMPLETED" and run.results["fine"] == "ok"
    record = RunStore(tmp_path).get(run.run_id)
    assert record["status"] == "COMPLETED"
    assert record["params"] == {"grid": {"(0, 0)": "x"}}


# ---------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------

def test_save_artifact_stores_text_bytes_and_copies_of_paths_in_the_run_folder(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"\x00copied\xff")

    @task
    def make(ctx):
        return {"text": ctx.save_artifact("notes/hello.txt", "h\u00e9llo\n"),
                "bytes": ctx.save_artifact("raw.bin", b"\xff\x00\x01"),
                "copy": ctx.save_artifact("copy.bin", source)}

    flow = Flow(name="artifacts")
    flow >> make
    run = quiet(store=tmp_path / "store").run(flow)
    paths = run.results["make"]
    run_folder = (tmp_path / "store" / "runs" / run.run_id).resolve()
    for path in paths.values():
        assert isinstance(path, str)
        assert run_folder in Path(path).resolve().parents
    assert Path(paths["text"]).read_bytes() == "h\u00e9llo\n".encode("utf-8")
    assert Path(paths["bytes"]).read_bytes() == b"\xff\x00\x01"
    assert Path(paths["copy"]).read_bytes() == b"\x00copied\xff"
    assert source.read_bytes() == b"\x00copied\xff"         # copied, not moved


STORE_OBJECT_ARTIFACTS_FLOW = """\
    import sys
    from pyoco import Engine, Flow, task

    class Harvest:
        def __str__(self):
            return "3 carrots"

    @task
    def make(ctx):
        return [ctx.save_artifact("m.json", {"a": 1, "r\u00fcbe": [1.5, None, "\u00e9"]}),
                ctx.save_artifact("rows.json", [{"row": 1}, {"row": 2}]),
                ctx.save_artifact("harvest.txt", Harvest()),
                ctx.save_artifact("count.txt", 42)]

    flow = Flow(name="objects")
    flow >> make

    if __name__ == "__main__":
        Engine(executor="process", workers=1, trace=False, store=sys.argv[1]).run(flow)
"""


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_save_artifact_saves_dicts_and_lists_as_json_and_other_objects_as_text(tmp_path,
                                                                               executor):
    write(tmp_path / "objects.py", STORE_OBJECT_ARTIFACTS_FLOW)
    if executor == "thread":
        result = cli(tmp_path, "run", "objects.py", "--store", "store", plain=True)
    else:
        result = run_python(tmp_path, "objects.py", "store", plain=True)
    assert result.returncode == 0, result.stderr
    [run_id] = RunStore(tmp_path / "store").ids()
    folder = tmp_path / "store" / "runs" / run_id / "artifacts"
    text = (folder / "m.json").read_bytes().decode("utf-8")
    assert json.loads(text) == {"a": 1, "r\u00fcbe": [1.5, None, "\u00e9"]}
    assert "r\u00fcbe" in text and text.endswith("\n")
    assert json.loads((folder / "rows.json").read_text("utf-8")) == [{"row": 1}, {"row": 2}]
    assert (folder / "harvest.txt").read_text("utf-8") == "3 carrots"
    assert (folder / "count.txt").read_text("utf-8") == "42"
    record = RunStore(tmp_path / "store").get(run_id)
    assert record["tasks"]["make"]["state"] == "SUCCEEDED"
    assert sorted(record["tasks"]["make"]["artifacts"]) == [
        "count.txt", "harvest.txt", "m.json", "rows.json"]


def test_artifacts_are_listed_in_ctx_for_downstream_tasks_and_in_the_task_record(tmp_path):
    @task
    def make(ctx):
        ctx.save_artifact("a.txt", "a")
        ctx.save_artifact("sub/b.txt", "b")
        return 1

    @task
    def look(ctx, make):
        return {name: Path(path).read_text() for name, path in ctx.artifacts.items()}

    flow = Flow(name="artifacts")
    flow >> make >> look
    run = quiet(store=tmp_path).run(flow)
    assert run.results["look"] == {"a.txt": "a", "sub/b.txt": "b"}
    record = RunStore(tmp_path).get(run.run_id)
    assert record["tasks"]["make"]["artifacts"] == run.artifacts
    assert set(run.artifacts) == {"a.txt", "sub/b.txt"}
    assert record["tasks"]["look"]["artifacts"] == {}


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "../../../escaped",
                                  "..", "a/.."])
def test_artifact_name_that_leaves_the_run_folder_is_a_value_error_and_writes_nothing(
        tmp_path, name):
    token = "pyoco-escape-%s" % os.urandom(4).hex()

    @task
    def escape(ctx):
        try:
            ctx.save_artifact(name, token)
        except ValueError as exc:
            return str(exc)
        return None

    flow = Flow(name="escape")
    flow >> escape
    run = quiet(store=tmp_path / "store").run(flow)
    assert run.results["escape"] is not None, "save_artifact(%r) did not raise" % name
    assert name in run.results["escape"]
    assert run.artifacts == {}
    assert [p for p in store_files(tmp_path) if token in (tmp_path / p).read_text("latin-1")
            or "artifacts" in p] == []
    assert token not in Path("/etc/passwd").read_text("latin-1")


def test_artifacts_without_a_store_go_to_a_temporary_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    @task
    def make(ctx):
        return ctx.save_artifact("report.txt", "report")

    flow = Flow(name="artifacts")
    flow >> make
    run = quiet(store=False).run(flow)
    try:
        assert run.artifacts_dir and os.path.isdir(run.artifacts_dir)
        path = Path(run.results["make"])
        assert Path(run.artifacts_dir).resolve() in path.resolve().parents
        assert Path(tempfile.gettempdir()).resolve() in path.resolve().parents
        assert path.read_text() == "report"
        assert run.artifacts == {"report.txt": str(path)}
        assert store_files(tmp_path) == []
    finally:
        shutil.rmtree(run.artifacts_dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# Atomic writes, several processes, dead processes
# ---------------------------------------------------------------------------

STORE_WRITER = """\
    import sys
    from pyoco import Engine, Flow, task

    @task
    def one(ctx):
        print("one")
        return 1

    @task
    def two(ctx, one):
        return one + 1

    flow = Flow(name="busy")
    flow >> one >> two
    engine = Engine(store=sys.argv[1], trace=False)
    for _ in range(int(sys.argv[2])):
        engine.run(flow)
"""


def test_four_processes_recording_into_one_store_make_100_valid_records(tmp_path):
    script = write(tmp_path / "writer.py", STORE_WRITER)
    store_dir = tmp_path / "store"
    writers = [subprocess.Popen([sys.executable, str(script), str(store_dir), "25"],
                                cwd=str(tmp_path), env=child_env(plain=True),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                encoding="utf-8") for _ in range(4)]
    try:
        for writer in writers:
            _, err = writer.communicate(timeout=60)
            assert writer.returncode == 0, err
            assert "warning" not in err, err
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()

    folders = sorted((store_dir / "runs").iterdir())
    assert len(folders) == 100
    for folder in folders:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        assert record["run_id"] == folder.name
        assert record["status"] == "COMPLETED"
        assert record["tasks"]["two"]["state"] == "SUCCEEDED"
    assert not [p for p in store_files(store_dir) if p.endswith(".tmp")]

    listed = cli(tmp_path, "runs", "list", "--json", "--limit", "1000",
                 "--store", store_dir, plain=True)
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert len(records) == 100
    assert len({r["run_id"] for r in records}) == 100
    assert {r["status"] for r in records} == {"COMPLETED"}


def test_run_killed_with_sigkill_is_reported_failed_with_a_reason(tmp_path, spawn):
    proc, run_id = store_stubborn_run(tmp_path, spawn)
    proc.proc.kill()
    proc.proc.wait()

    listed = cli(tmp_path, "runs", "list", "--json", plain=True)
    assert listed.returncode == 0, listed.stderr
    [record] = [r for r in json.loads(listed.stdout) if r["run_id"] == run_id]
    assert record["status"] == "FAILED"
    assert isinstance(record["reason"], str) and record["reason"]
    assert not {t["state"] for t in record["tasks"].values()} & {"PENDING", "RUNNING"}

    shown = cli(tmp_path, "runs", "show", run_id, "--json", plain=True)
    assert shown.returncode == 0, shown.stderr
    full = json.loads(shown.stdout)
    assert full["status"] == "FAILED" and full["reason"] == record["reason"]

    table = cli(tmp_path, "runs", "list", plain=True)
    assert table.returncode == 0
    assert re.search(r"%s\s+signals\s+FAILED" % run_id, table.stdout), table.stdout


@pytest.mark.parametrize("heartbeat_age, expected", [(60, "FAILED"), (0, "RUNNING")])
def test_run_of_another_host_is_failed_only_when_its_heartbeat_is_old(
        tmp_path, spawn, heartbeat_age, expected):
    proc, run_id = store_stubborn_run(tmp_path, spawn)
    proc.proc.kill()
    proc.proc.wait()
    # As if the run was made on another machine sharing the store: its pid
    # means nothing here, only the heartbeat (the file's mtime) tells.
    beat = tmp_path / ".pyoco" / "runs" / run_id / "process.json"
    beat.write_text(json.dumps({"pid": 1, "host": "another-host.invalid"}))
    then = time.time() - heartbeat_age
    os.utime(str(beat), (then, then))
    record = RunStore(tmp_path / ".pyoco").get(run_id)
    assert record["status"] == expected
    if expected == "FAILED":
        assert "heartbeat" in record["reason"]


def test_a_corrupt_record_does_not_break_runs_list(tmp_path):
    store_signal_flow(tmp_path)
    done = cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick", plain=True)
    good = run_id_of(done.stderr)
    broken = tmp_path / ".pyoco" / "runs" / "20200101-000000-0badf00d"
    broken.mkdir()
    (broken / "run.json").write_text('{"run_id": "20200101-000000-0badf00d", "sta')
    listed = cli(tmp_path, "runs", "list", "--json", plain=True)
    assert listed.returncode == 0, listed.stderr
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [good]
    assert "20200101-000000-0badf00d" in listed.stderr
    no_traceback(listed)


# ---------------------------------------------------------------------------
# A store that cannot be written
# ---------------------------------------------------------------------------

def store_busy_flow(tmp_path):
    @task
    def make(ctx):
        print("make printed")
        ctx.log.info("make logged")
        return {"path": ctx.save_artifact("a.txt", "artifact")}

    @task
    def use(ctx, make):
        return Path(make["path"]).read_text() + "!"

    flow = Flow(name="busy")
    flow >> make >> use
    return flow


def store_assert_one_warning(err, where):
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, err
    assert where in warnings[0]


def test_unwritable_store_warns_once_and_the_run_completes_intact(tmp_path, capfd):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    store_dir = tmp_path / "file.txt" / "store"
    run = quiet(store=store_dir).run(store_busy_flow(tmp_path))
    try:
        assert run.status == "COMPLETED"
        assert run.results["use"] == "artifact!"
        out, err = capfd.readouterr()
        assert "make printed" in out
        store_assert_one_warning(err, str(store_dir))
        assert (tmp_path / "file.txt").read_text() == "a file, not a folder"
    finally:
        if run.artifacts_dir:
            shutil.rmtree(run.artifacts_dir, ignore_errors=True)


def test_unwritable_store_cli_run_warns_once_and_exits_0(tmp_path):
    store_signal_flow(tmp_path)
    (tmp_path / "file.txt").write_text("a file, not a folder")
    result = cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick",
                 "--store", "file.txt/store", plain=True)
    assert result.returncode == 0, result.stderr
    assert "AFTER RAN" in result.stdout
    store_assert_one_warning(result.stderr, "store")
    assert re.search(r" done flow=signals status=COMPLETED", result.stderr)


def test_read_only_store_folder_warns_once_and_the_run_completes(tmp_path, capfd):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store_dir.chmod(0o500)
    try:
        if os.access(str(store_dir), os.W_OK):
            pytest.skip("this user (root?) can write to a 0o500 folder")
        run = quiet(store=store_dir).run(store_busy_flow(tmp_path))
        assert run.status == "COMPLETED" and run.results["use"] == "artifact!"
        store_assert_one_warning(capfd.readouterr().err, str(store_dir))
        shutil.rmtree(run.artifacts_dir, ignore_errors=True)
    finally:
        store_dir.chmod(0o700)


# Each task waits for a gate file the test creates; `second` then waits until
# the record, written at a heartbeat, shows `first` done: the store is written
# again while the run goes on, not only at its end.
STORE_GATED_FLOW = """\
    import json, os, time
    from pyoco import task, Flow

    HERE = os.path.dirname(os.path.abspath(__file__))

    def wait_for(what, ready):
        deadline = time.monotonic() + 20
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError("waited 20 s for " + what)
            time.sleep(0.02)

    def record_shows_first_done(run_id):
        try:
            with open(os.path.join(os.environ["GATED_STORE"], "runs", run_id, "run.json")) as f:
                return json.load(f)["tasks"]["first"]["state"] == "SUCCEEDED"
        except (OSError, ValueError):
            return False

    @task
    def first(ctx):
        print("FIRST RAN")
        wait_for("disk-full", lambda: os.path.exists(os.path.join(HERE, "disk-full")))
        return 1

    @task
    def second(ctx, first):
        wait_for("disk-free", lambda: os.path.exists(os.path.join(HERE, "disk-free")))
        wait_for("the record", lambda: record_shows_first_done(ctx.run_id))
        print("SECOND SAW THE RECORD")
        return first + 1

    flow = Flow(name="gated")
    flow >> first >> second
"""


@contextlib.contextmanager
def store_small_disk(folder):
    """A 64 KiB tmpfs at ``folder`` (as root), or None when none can be mounted."""
    folder.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted and subprocess.run(["umount", str(folder)]).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)])


def store_fill(folder):
    """Fill the disk under ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:
            pass
        try:
            while True:
                f.write(b"x")
        except OSError:
            pass
    return filler


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="needs a POSIX system")
def test_store_that_fails_for_a_while_is_written_again_and_ends_with_the_final_status(
        tmp_path):
    write(tmp_path / "gated.py", STORE_GATED_FLOW)
    with store_small_disk(tmp_path / "disk") as disk:
        if disk is None and os.geteuid() == 0:
            pytest.skip("cannot mount a small tmpfs, and root writes to read-only folders")
        store = tmp_path / "disk" / "store"
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyoco", "run", "gated.py", "--store", str(store)],
            cwd=str(tmp_path), env=child_env(plain=True, GATED_STORE=str(store)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8")
        output, restore = [], None
        try:
            for line in proc.stdout:
                output.append(line)
                if line.startswith("FIRST RAN"):
                    if disk is not None:                # a full disk
                        filler = store_fill(disk)
                        restore = filler.unlink
                    else:                               # a folder that refuses new files
                        folder = store / "runs" / run_id_of("".join(output))
                        folder.chmod(0o500)
                        restore = lambda: folder.chmod(0o700)    # noqa: E731
                    (tmp_path / "disk-full").touch()
                elif "cannot write to run store" in line:
                    restore()
                    (tmp_path / "disk-free").touch()
            assert proc.wait(timeout=WAIT) == 0, "".join(output)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        text = "".join(output)
        assert "SECOND SAW THE RECORD" in text, text
        warnings = [line for line in output if "warning" in line]
        assert len(warnings) == 1 and str(store) in warnings[0], text
        run_id = run_id_of(text)
        record = RunStore(store).get(run_id)
        assert record["status"] == "COMPLETED" and record["reason"] is None, record
        assert [t["state"] for t in record["tasks"].values()] == ["SUCCEEDED"] * 2
        assert RunStore(store).load_outputs(run_id)["first"] == 1     # saved for --resume


def test_cli_reports_an_unwritable_store_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = cli(tmp_path, "runs", "list", "--store", blocker / "store")
    assert done.returncode == 0 and "no runs" in done.stdout
    done = cli(tmp_path, "runs", "cancel", "20260101-000000-00000000",
               "--store", blocker / "store")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "no run" in done.stderr


# ===========================================================================
# Observers: webhooks
# ===========================================================================


# ---------------------------------------------------------------------------
# Payloads, signatures, retries, budgets
# ---------------------------------------------------------------------------

def srv_outcome_run(store, outcome):
    """Run a flow that ends COMPLETED, FAILED or CANCELLED; returns the Run."""
    engine = quiet(store=str(store))
    if outcome == "cancelled":
        return srv_run_cancelled(engine, "hooked")

    @task
    def first(ctx):
        return 1

    @task
    def second(ctx, first):
        if outcome == "failed":
            raise ValueError("bad row 17")
        return first + 1

    flow = Flow("hooked")
    flow >> first >> second
    return engine.run(flow, raise_on_failure=False)


@pytest.mark.parametrize("outcome, status", [("completed", "COMPLETED"), ("failed", "FAILED"),
                                             ("cancelled", "CANCELLED")])
def test_webhook_posts_the_spec_payload_for_each_outcome(tmp_path, srv_receiver, monkeypatch,
                                                         outcome, status):
    receiver = srv_receiver()
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    run = srv_outcome_run(tmp_path / "store", outcome)
    pyoco.drain_webhooks()
    [(path, headers, body)] = receiver.wait_for(1)
    assert path == "/hooks/s3cret-path"
    assert headers["content-type"] == "application/json"
    assert headers["x-pyoco-event"] == "run." + outcome
    assert "x-pyoco-signature" not in headers
    payload = json.loads(body)
    assert set(payload) == SRV_WEBHOOK_KEYS
    assert (payload["event"], payload["status"]) == ("run." + outcome, status)
    assert (payload["run_id"], payload["flow"]) == (run.run_id, "hooked")
    for key in ("started_at", "ended_at"):
        assert ISO.match(payload[key]), payload[key]
    assert payload["duration_ms"] == run.to_dict()["duration_ms"]
    for name, t in payload["tasks"].items():
        assert set(t) == {"state", "duration_ms", "error"}
        assert t["state"] == run.tasks[name].state
    if outcome == "failed":
        assert payload["tasks"]["second"]["error"] == "ValueError: bad row 17"
    assert srv_webhook_events(tmp_path / "store", run.run_id)[0]["event"] == "webhook.delivered"


def test_webhook_signature_is_hmac_sha256_of_the_raw_body(tmp_path, srv_receiver, monkeypatch):
    receiver = srv_receiver()
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("PYOCO_WEBHOOK_SECRET", "shh, a secret")
    srv_outcome_run(tmp_path / "store", "completed")
    pyoco.drain_webhooks()
    [(_, headers, body)] = receiver.wait_for(1)
    expected = "sha256=" + hmac.new(b"shh, a secret", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-pyoco-signature"], expected)
    assert json.loads(body)["event"] == "run.completed"


def test_webhook_events_setting_sends_only_the_listed_events(tmp_path, srv_receiver,
                                                             monkeypatch):
    receiver = srv_receiver()
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("PYOCO_WEBHOOK_EVENTS", "run.failed")
    store = tmp_path / "store"
    completed = srv_outcome_run(store, "completed")
    cancelled = srv_outcome_run(store, "cancelled")
    failed = srv_outcome_run(store, "failed")
    pyoco.drain_webhooks()
    requests = receiver.wait_for(1)
    assert [json.loads(body)["run_id"] for _, _, body in requests] == [failed.run_id]
    assert json.loads(requests[0][2])["event"] == "run.failed"
    assert srv_webhook_events(store, completed.run_id) == []
    assert srv_webhook_events(store, cancelled.run_id) == []


def test_webhook_slack_format_posts_only_text(tmp_path, srv_receiver, monkeypatch):
    receiver = srv_receiver()
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("PYOCO_WEBHOOK_FORMAT", "slack")
    run = srv_outcome_run(tmp_path / "store", "failed")
    pyoco.drain_webhooks()
    [(_, headers, body)] = receiver.wait_for(1)
    payload = json.loads(body)
    assert list(payload) == ["text"]
    assert isinstance(payload["text"], str)
    assert "hooked" in payload["text"] and run.run_id in payload["text"]
    assert "bad row 17" in payload["text"]


def test_webhook_slack_text_escapes_what_the_run_wrote(tmp_path, srv_receiver, monkeypatch):
    receiver = srv_receiver()
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("PYOCO_WEBHOOK_FORMAT", "slack")

    @task
    def shout(ctx):
        raise ValueError("<!channel> see <https://evil.example|here> & <@U123>")

    flow = Flow("a<b>&c")
    flow >> shout
    quiet(store=str(tmp_path / "store")).run(flow, raise_on_failure=False)
    pyoco.drain_webhooks()
    [(_, _, body)] = receiver.wait_for(1)
    text = json.loads(body)["text"]
    assert "<" not in text and ">" not in text, text
    assert "flow *a&lt;b&gt;&amp;c*" in text
    assert ("&lt;!channel&gt; see &lt;https://evil.example|here&gt; &amp; &lt;@U123&gt;"
            in text)


@pytest.mark.parametrize("retries", [1, 3])
def test_webhook_answered_500_is_tried_exactly_retries_times_and_recorded_failed(
        tmp_path, srv_receiver, monkeypatch, capsys, retries):
    receiver = srv_receiver(status=500)
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("PYOCO_WEBHOOK_RETRIES", str(retries))
    store = tmp_path / "store"
    run = srv_outcome_run(store, "completed")
    pyoco.drain_webhooks()
    assert len(receiver.requests) == retries
    assert len({body for _, _, body in receiver.requests}) == 1     # the same body each time
    gaps = [b - a for a, b in zip(receiver.times, receiver.times[1:])]
    for k, gap in enumerate(gaps):                      # backoff 0.5 s, 1 s, ...
        assert 0.5 * 2 ** k - 0.05 <= gap < 0.5 * 2 ** k + 1.0, gaps
    [event] = srv_webhook_events(store, run.run_id)
    assert event["event"] == "webhook.failed"
    assert (event["attempts"], event["status_code"]) == (retries, 500)
    assert event["url"] == receiver.host                # the path may hold a secret
    record = pyoco.RunStore(str(store)).get(run.run_id)
    assert "s3cret-path" not in json.dumps(record)
    assert run.status == record["status"] == "COMPLETED"     # never changes the outcome
    assert "webhook" in capsys.readouterr().err


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_webhook_answered_with_a_redirect_fails_and_is_never_followed(
        tmp_path, srv_receiver, monkeypatch, code):
    elsewhere = srv_receiver()
    redirecting = srv_receiver(status=code, headers={"Location": elsewhere.url})
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", redirecting.url)
    monkeypatch.setenv("PYOCO_WEBHOOK_RETRIES", "2")
    store = tmp_path / "store"
    run = srv_outcome_run(store, "completed")
    pyoco.drain_webhooks()
    assert len(redirecting.requests) == 2               # retried like any non-2xx answer
    assert elsewhere.requests == []
    [event] = srv_webhook_events(store, run.run_id)
    assert (event["event"], event["attempts"], event["status_code"]) == (
        "webhook.failed", 2, code)


def test_webhook_url_credentials_go_as_basic_auth_and_are_never_recorded(
        tmp_path, srv_receiver, monkeypatch, capsys):
    receiver = srv_receiver()
    refusing = socket.socket()          # bound, never listening: connections are refused
    refusing.bind(("127.0.0.1", 0))
    port, closed = receiver.httpd.server_address[1], refusing.getsockname()[1]
    hook = "http://alice:s3cr%%40t@127.0.0.1:%d/hook"         # the password is s3cr@t
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", "%s,%s" % (hook % port, hook % closed))
    monkeypatch.setenv("PYOCO_WEBHOOK_RETRIES", "1")
    store = tmp_path / "store"
    with refusing:
        run = srv_outcome_run(store, "completed")
        pyoco.drain_webhooks()
    [(path, headers, body)] = receiver.wait_for(1)
    assert path == "/hook"
    assert headers["authorization"] == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert json.loads(body)["run_id"] == run.run_id
    events = {e["url"]: e["event"] for e in srv_webhook_events(store, run.run_id)}
    assert events == {"http://127.0.0.1:%d" % port: "webhook.delivered",
                      "http://127.0.0.1:%d" % closed: "webhook.failed"}
    written = (store / "runs" / run.run_id / "run.json").read_text("utf-8")
    err = capsys.readouterr().err
    assert "webhook to http://127.0.0.1:%d failed" % closed in err
    for secret in ("alice", "s3cr"):
        assert secret not in written and secret not in err, secret


def test_failing_webhook_does_not_change_a_failed_runs_status(tmp_path, srv_receiver,
                                                               monkeypatch):
    receiver = srv_receiver(status=503)
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("PYOCO_WEBHOOK_RETRIES", "1")
    store = tmp_path / "store"
    run = srv_outcome_run(store, "failed")
    pyoco.drain_webhooks()
    assert pyoco.RunStore(str(store)).get(run.run_id)["status"] == "FAILED"
    assert [e["event"] for e in srv_webhook_events(store, run.run_id)] == ["webhook.failed"]


def test_hanging_webhook_holds_pyoco_run_no_longer_than_its_budget(tmp_path):
    hanging = SrvHangingReceiver()
    store = tmp_path / "store"
    try:
        done = cli(tmp_path, "run", srv_flow_file(tmp_path), "--store", store, "--non-cute",
                   PYOCO_WEBHOOK_URL=hanging.url, PYOCO_WEBHOOK_TIMEOUT="0.5",
                   PYOCO_WEBHOOK_RETRIES="2")
        exited = time.time()
    finally:
        hanging.close()
    assert done.returncode == 0, done.stderr
    assert hanging.conns                                # it did try
    [run_id] = pyoco.RunStore(str(store)).ids()
    # two attempts of 0.5 s: the process exits soon after its run ended
    assert exited - epoch(pyoco.RunStore(str(store)).get(run_id)["ended_at"]) < 4.0
    [event] = srv_webhook_events(store, run_id)
    assert (event["event"], event["attempts"]) == ("webhook.failed", 2)
    assert pyoco.RunStore(str(store)).get(run_id)["status"] == "COMPLETED"


def test_webhook_url_path_stays_out_of_events_even_when_the_url_is_invalid(
        tmp_path, srv_receiver, monkeypatch, capsys):
    receiver = srv_receiver()
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.host + "/hooks/s3cret token")
    monkeypatch.setenv("PYOCO_WEBHOOK_RETRIES", "1")
    store = tmp_path / "store"
    run = srv_outcome_run(store, "completed")
    pyoco.drain_webhooks()
    [event] = srv_webhook_events(store, run.run_id)
    assert (event["event"], event["url"]) == ("webhook.failed", receiver.host)
    record = pyoco.RunStore(str(store)).get(run.run_id)
    assert "s3cret" not in json.dumps(record), event
    assert "s3cret" not in capsys.readouterr().err


def test_slow_webhook_url_does_not_delay_the_others(tmp_path, srv_receiver, monkeypatch):
    hanging = SrvHangingReceiver()
    try:
        good = srv_receiver()
        monkeypatch.setenv("PYOCO_WEBHOOK_URL", "%s,%s" % (hanging.url, good.url))
        monkeypatch.setenv("PYOCO_WEBHOOK_TIMEOUT", "3")
        monkeypatch.setenv("PYOCO_WEBHOOK_RETRIES", "1")
        run = srv_outcome_run(tmp_path / "store", "completed")
        ended = epoch(run.to_dict()["ended_at"])
        assert time.time() - ended < 3.0                # the run never waits on the network
        [(_, _, body)] = good.wait_for(1, timeout=3.0)
        assert json.loads(body)["run_id"] == run.run_id
        assert time.time() - ended < 3.0                # nor the good URL on the hanging one
        hanging.close()             # its delivery fails now instead of at its timeout
        pyoco.drain_webhooks()
    finally:
        hanging.close()
    events = {e["url"]: e["event"] for e in srv_webhook_events(tmp_path / "store", run.run_id)}
    assert events == {good.host: "webhook.delivered",
                      hanging.url.rsplit("/", 1)[0]: "webhook.failed"}


@pytest.fixture(scope="module")
def srv_trickled_run(tmp_path_factory):
    """A completed run whose webhook answer trickles past the budget (1 attempt of 1 s,
    plus 1 s), made once: (receiver, run, store, seconds drain_webhooks took, stderr)."""
    trickling = SrvTricklingReceiver()
    store = tmp_path_factory.mktemp("trickled") / "store"
    err = io.StringIO()
    with no_pyoco_env() as mp, contextlib.redirect_stderr(err):
        mp.setenv("PYOCO_WEBHOOK_URL", trickling.url)
        mp.setenv("PYOCO_WEBHOOK_TIMEOUT", "1")
        mp.setenv("PYOCO_WEBHOOK_RETRIES", "1")
        try:
            run = srv_outcome_run(store, "completed")
            began = time.monotonic()
            pyoco.drain_webhooks()
            took = time.monotonic() - began
        finally:
            trickling.close()
    return trickling, run, store, took, err.getvalue()


def test_webhook_answer_trickling_past_its_budget_is_cut_off_and_recorded(srv_trickled_run):
    trickling, run, store, took, err = srv_trickled_run
    assert trickling.asked.is_set()
    assert took < 6.0                                   # the budget is 2 s; the answer 10 s
    record = pyoco.RunStore(str(store)).get(run.run_id)
    [event] = [e for e in record["events"] if e["event"].startswith("webhook.")]
    assert event["event"] == "webhook.failed"
    assert "cut off" in event["error"]
    assert event["url"] == trickling.host
    assert record["status"] == "COMPLETED"
    assert "pyoco: warning: webhook to %s failed" % trickling.host in err
    assert "cut off" in err


def test_webhook_cut_off_warning_says_how_many_attempts_it_made(srv_trickled_run):
    err = srv_trickled_run[4]
    [warning] = [line for line in err.splitlines() if "webhook to" in line]
    assert "None" not in warning, warning


def test_delivered_webhook_sees_the_final_record_and_is_recorded_in_it(tmp_path, srv_receiver,
                                                                       monkeypatch):
    store = tmp_path / "store"
    at_post = []                # the stored record, as the receiver reads it

    def read_record(body):
        at_post.append(pyoco.RunStore(str(store)).get(json.loads(body)["run_id"]))

    receiver = srv_receiver(on_post=read_record)
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    run = srv_outcome_run(store, "completed")
    pyoco.drain_webhooks()
    assert len(receiver.wait_for(1)) == 1
    [seen] = at_post
    assert seen["status"] == "COMPLETED" and seen["ended_at"] is not None
    assert {name: t["state"] for name, t in seen["tasks"].items()} == {
        "first": "SUCCEEDED", "second": "SUCCEEDED"}
    assert seen["events"][-1]["event"] == "run.completed"
    record = pyoco.RunStore(str(store)).get(run.run_id)
    [event] = [e for e in record["events"] if e["event"].startswith("webhook.")]
    assert (event["event"], event["attempts"], event["status_code"]) == (
        "webhook.delivered", 1, 200)
    assert event["url"] == receiver.host
    assert record["events"] == seen["events"] + [event]     # the delivery is all that changed
    assert dict(record, events=None) == dict(seen, events=None)


def test_non_http_webhook_url_is_refused_with_a_warning_and_never_used(
        tmp_path, srv_receiver, monkeypatch, capsys):
    receiver = srv_receiver()
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", "file:///etc/passwd, " + receiver.url)
    store = tmp_path / "store"
    run = srv_outcome_run(store, "completed")
    pyoco.drain_webhooks()
    assert len(receiver.wait_for(1)) == 1
    [event] = srv_webhook_events(store, run.run_id)
    assert (event["event"], event["url"]) == ("webhook.delivered", receiver.host)
    err = capsys.readouterr().err
    assert "refused" in err and "file" in err

    monkeypatch.setenv("PYOCO_WEBHOOK_URL", "file:///etc/passwd")
    alone = srv_outcome_run(store, "completed")
    pyoco.drain_webhooks()
    assert srv_webhook_events(store, alone.run_id) == []
    assert "refused" in capsys.readouterr().err
    assert len(receiver.requests) == 1


def test_webhooks_fire_for_runs_started_through_the_api(srv_api, srv_receiver, monkeypatch):
    receiver = srv_receiver()
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", receiver.url)
    run_id = srv_json(srv_api.url, "POST", "/runs", {"flow": "quick"})[1]["run_id"]
    [(_, _, body)] = receiver.wait_for(1)
    payload = json.loads(body)
    assert (payload["event"], payload["run_id"], payload["flow"]) == (
        "run.completed", run_id, "quick")


def test_webhook_outcomes_are_counted_in_metrics(tmp_path, srv_serve, srv_receiver,
                                                 monkeypatch):
    store = tmp_path / "store"
    server = srv_serve(store)
    samples = srv_metrics(server.url)[2]                    # view primed before the runs
    assert srv_value(samples, "pyoco_webhook_deliveries_total", outcome="delivered") == 0
    assert srv_value(samples, "pyoco_webhook_deliveries_total", outcome="failed") == 0
    good, bad = srv_receiver(), srv_receiver(status=500)
    monkeypatch.setenv("PYOCO_WEBHOOK_URL", "%s,%s" % (good.url, bad.url))
    monkeypatch.setenv("PYOCO_WEBHOOK_RETRIES", "1")
    srv_outcome_run(store, "completed")
    pyoco.drain_webhooks()

    def counted():
        samples = srv_metrics(server.url)[2]
        return (srv_value(samples, "pyoco_webhook_deliveries_total", outcome="delivered"),
                srv_value(samples, "pyoco_webhook_deliveries_total", outcome="failed")) == (1, 1)
    wait_until(counted, what="webhook outcomes in /metrics")
    fresh = srv_serve(store)                            # counted from the store at start
    samples = srv_metrics(fresh.url)[2]
    assert srv_value(samples, "pyoco_webhook_deliveries_total", outcome="delivered") == 1
    assert srv_value(samples, "pyoco_webhook_deliveries_total", outcome="failed") == 1


# ===========================================================================
# Engine
# ===========================================================================


# ---------------------------------------------------------------------------
# Resume: only what failed or never ran runs again
# ---------------------------------------------------------------------------

def test_resume_gives_reused_tasks_artifacts_and_the_old_params(tmp_path, monkeypatch):
    seen = {}

    @task
    def make(ctx):
        return ctx.save_artifact("data.txt", "carrots %s" % ctx.params["n"])

    @task
    def use(ctx, make):
        if os.environ.get("PYOCO_TEST_BREAK"):
            raise ValueError("not yet")
        with open(ctx.artifacts["data.txt"]) as f:
            seen["text"] = f.read()
        seen["n"] = ctx.params["n"]

    flow = Flow("artifact-resume")
    flow >> make >> use
    engine = Engine(trace=False, store=tmp_path)
    monkeypatch.setenv("PYOCO_TEST_BREAK", "1")
    first = engine.run(flow, {"n": 3}, raise_on_failure=False)
    assert first.status == "FAILED"
    monkeypatch.delenv("PYOCO_TEST_BREAK")
    second = engine.run(flow, resume=first.run_id)
    assert second.status == "COMPLETED"
    assert seen == {"text": "carrots 3", "n": 3}
    copied = second.tasks["make"].artifacts["data.txt"]
    assert second.run_id in copied and os.path.exists(copied)


def test_resume_with_a_new_param_reuses_outputs_computed_with_the_old_value(tmp_path):
    # What docs/tutorial/08-runs-and-resume.md and the README say: a resume
    # does not compare values; only the tasks that run again see the new one.
    write(tmp_path / "rows.py", """\
        import os
        from pyoco import task, Flow

        @task
        def count(ctx, rows):
            return rows * 10

        @task
        def report(ctx, count, rows):
            if os.environ.get("ROWS_BROKEN"):
                raise ValueError("printer jammed")
            print("REPORT count=%d rows=%d" % (count, rows))

        flow = Flow(name="rows")
        flow >> count >> report
        """)
    failed = cli(tmp_path, "run", "rows.py", "-p", "rows=1",
                 env=child_env(PYOCO_CUTE="0", ROWS_BROKEN="1"))
    assert failed.returncode == 1, failed.stderr
    run_id = re.search(r"run_id=(\S+)", failed.stderr).group(1)
    resumed = cli(tmp_path, "run", "rows.py", "--resume", run_id, "-p", "rows=2")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "REPORT count=10 rows=2"


def test_run_killed_with_sigkill_can_be_resumed(tmp_path, spawn):
    proc, run_id = store_stubborn_run(tmp_path, spawn)
    proc.proc.kill()
    proc.proc.wait()

    resumed = cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick",
                  "--resume", run_id, plain=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "AFTER RAN" in resumed.stdout
    record = RunStore(tmp_path / ".pyoco").get(run_id_of(resumed.stderr))
    assert record["status"] == "COMPLETED" and record["resumed_from"] == run_id


# b fails while the file "broken" exists next to the flow; every task notes
# each time it runs in ran.txt. `a` returns a tuple and `point` an object of a
# class of the flow file: neither is JSON. `fresh` (cache=False) runs again
# on resume although it succeeded.
STORE_RESUME_FLOW = """\
    import json
    from pathlib import Path
    from pyoco import task, Flow

    HERE = Path(__file__).resolve().parent

    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

    def note(name):
        with open(HERE / "ran.txt", "a") as f:
            f.write(name + "\\n")

    @task
    def a(ctx):
        note("a")
        return (1, "one")

    @task
    def point(ctx):
        note("point")
        return Point(3, 4)

    @task(cache=False)
    def fresh(ctx):
        note("fresh")
        return "fresh"

    @task
    def b(ctx, a, point, fresh):
        note("b")
        if (HERE / "broken").exists():
            raise RuntimeError("b is broken")
        return {"a_type": type(a).__name__, "a": list(a),
                "point_is_point": isinstance(point, Point), "xy": [point.x, point.y]}

    @task
    def c(ctx, b):
        note("c")
        print("C GOT " + json.dumps(b, sort_keys=True), flush=True)
        return b

    flow = Flow(name="resumable")
    flow >> [a, point, fresh] >> b >> c
"""


def store_ran(folder):
    return collections.Counter((folder / "ran.txt").read_text().split())


def test_cli_resume_runs_only_the_failed_task_and_downstream_reusing_other_outputs(tmp_path):
    write(tmp_path / "resume_flow.py", STORE_RESUME_FLOW)
    (tmp_path / "broken").write_text("")
    first = cli(tmp_path, "run", "resume_flow.py", plain=True)
    assert first.returncode == 1, first.stderr
    old_id = run_id_of(first.stderr)
    assert store_ran(tmp_path) == {"a": 1, "point": 1, "fresh": 1, "b": 1}

    (tmp_path / "broken").unlink()                                     # the fix
    second = cli(tmp_path, "run", "resume_flow.py", "--resume", old_id, plain=True)
    assert second.returncode == 0, second.stderr
    assert store_ran(tmp_path) == {"a": 1, "point": 1, "fresh": 2, "b": 2, "c": 1}
    got = json.loads(re.search(r"^C GOT (.*)$", second.stdout, re.M).group(1))
    assert got == {"a_type": "tuple", "a": [1, "one"], "point_is_point": True, "xy": [3, 4]}

    new_id = run_id_of(second.stderr)
    assert new_id != old_id
    record = RunStore(tmp_path / ".pyoco").get(new_id)
    assert record["status"] == "COMPLETED"
    assert record["resumed_from"] == old_id
    assert {t["state"] for t in record["tasks"].values()} == {"SUCCEEDED"}
    assert RunStore(tmp_path / ".pyoco").get(old_id)["status"] == "FAILED"    # untouched


# Instance 2 of the map fails while MAP_BROKEN is set; every instance appends
# its item to items.txt each time it runs. "isolate", so that the failure
# stops none of the other instances: they all run, and succeed.
STORE_RESUME_MAP_FLOW = """\
    import json
    import os
    from pathlib import Path
    from pyoco import task, Flow

    HERE = Path(__file__).resolve().parent

    @task
    def letters(ctx):
        return ["a", "b", "c", "d"]

    @task(fail_policy="isolate")
    def shout(ctx, letter):
        with open(HERE / "items.txt", "a") as f:
            f.write(letter + "\\n")
        if letter == "c" and os.environ.get("MAP_BROKEN"):
            raise ValueError("c is broken")
        return letter.upper()

    @task
    def joined(ctx, shout):
        print("JOINED " + json.dumps(shout), flush=True)
        return shout

    flow = Flow(name="letters")
    flow >> letters >> shout.map("$node.letters.output") >> joined
"""


def test_cli_resume_of_a_map_runs_only_its_failed_instance_again(tmp_path):
    write(tmp_path / "map_flow.py", STORE_RESUME_MAP_FLOW)
    first = cli(tmp_path, "run", "map_flow.py", env=child_env(plain=True, MAP_BROKEN="1"))
    assert first.returncode == 1, first.stderr
    old_id = run_id_of(first.stderr)
    ran = tmp_path / "items.txt"
    assert collections.Counter(ran.read_text().split()) == {"a": 1, "b": 1, "c": 1, "d": 1}
    old = RunStore(tmp_path / ".pyoco").get(old_id)
    assert {name: t["state"] for name, t in old["tasks"].items()} == {
        "letters": "SUCCEEDED", "shout": "FAILED", "shout[0]": "SUCCEEDED",
        "shout[1]": "SUCCEEDED", "shout[2]": "FAILED", "shout[3]": "SUCCEEDED",
        "joined": "SKIPPED"}

    second = cli(tmp_path, "run", "map_flow.py", "--resume", old_id, plain=True)
    assert second.returncode == 0, second.stderr
    assert collections.Counter(ran.read_text().split()) == {"a": 1, "b": 1, "c": 2, "d": 1}
    for k in (0, 1, 3):
        assert re.search(r" INFO reuse node=shout\[%d\] from_run=%s " % (k, old_id),
                         second.stderr), second.stderr
    assert not re.search(r"reuse node=shout\[2\]", second.stderr)
    assert json.loads(re.search(r"^JOINED (.*)$", second.stdout, re.M).group(1)) == [
        "A", "B", "C", "D"]
    record = RunStore(tmp_path / ".pyoco").get(run_id_of(second.stderr))
    assert (record["status"], record["resumed_from"]) == ("COMPLETED", old_id)
    assert {name: t["state"] for name, t in record["tasks"].items()} == dict.fromkeys(
        ["letters", "shout", "shout[0]", "shout[1]", "shout[2]", "shout[3]", "joined"],
        "SUCCEEDED")
    assert "reused" in record["tasks"]["shout[0]"]["reason"]
    assert record["tasks"]["shout[2]"]["reason"] is None


@pytest.mark.parametrize("which", ["completed", "unknown"])
def test_cli_resume_of_a_completed_run_or_an_unknown_id_exits_2(tmp_path, which):
    store_signal_flow(tmp_path)
    done = cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick", plain=True)
    run_id = run_id_of(done.stderr) if which == "completed" else STORE_UNKNOWN_ID
    result = cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick",
                 "--resume", run_id, plain=True)
    assert result.returncode == 2
    assert run_id in result.stderr
    if which == "completed":
        assert "COMPLETED" in result.stderr
    no_traceback(result)
    assert "AFTER RAN" not in result.stdout
    assert len(RunStore(tmp_path / ".pyoco").ids()) == 1        # no new run was recorded


class _StorePoint:
    """An output that is not JSON: resume must bring it back as itself."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, _StorePoint) and (self.x, self.y) == (other.x, other.y)


def test_api_resume_reuses_outputs_that_succeeded_and_reruns_the_rest(tmp_path):
    calls = collections.Counter()
    broken = [True]

    @task
    def a(ctx):
        calls["a"] += 1
        return (1, "one")

    @task
    def point(ctx):
        calls["point"] += 1
        return _StorePoint(3, 4)

    @task(cache=False)
    def fresh(ctx):
        calls["fresh"] += 1
        return "fresh"

    @task
    def b(ctx, a, point, fresh):
        calls["b"] += 1
        if broken[0]:
            raise RuntimeError("b is broken")
        return (a, point)

    @task
    def c(ctx, b):
        calls["c"] += 1
        return b

    flow = Flow(name="resumable")
    flow >> [a, point, fresh] >> b >> c
    engine = quiet(store=tmp_path)
    first = engine.run(flow, raise_on_failure=False)
    assert first.status == "FAILED"

    broken[0] = False
    second = engine.run(flow, resume=first.run_id)
    assert second.status == "COMPLETED"
    assert calls == {"a": 1, "point": 1, "fresh": 2, "b": 2, "c": 1}
    assert second.results["c"] == ((1, "one"), _StorePoint(3, 4))
    assert type(second.results["a"]) is tuple
    assert second.resumed_from == first.run_id
    assert RunStore(tmp_path).get(second.run_id)["resumed_from"] == first.run_id


def test_api_resume_of_a_cancelled_run_runs_its_cancelled_tasks(tmp_path):
    started, ids, answers = threading.Event(), [], []
    flow = store_cancellable_flow(started, ids)
    engine = quiet(store=tmp_path)
    thread = store_cancel_when_started(engine, started, ids, answers)
    first = engine.run(flow, raise_on_failure=False)
    thread.join()
    assert first.status == "CANCELLED"

    second = engine.run(flow, resume=first.run_id)
    assert second.status == "COMPLETED"
    assert ids == [first.run_id]                   # `wait` did not run again
    assert second.results == {"wait": "stopped early", "after": "after"}


def test_api_resume_reruns_a_task_whose_output_could_not_be_saved(tmp_path):
    calls = collections.Counter()
    broken = [True]

    @task
    def make(ctx):
        calls["make"] += 1
        return lambda: "not picklable"

    @task
    def use(ctx, make):
        calls["use"] += 1
        if broken[0]:
            raise RuntimeError("broken")
        return make()

    flow = Flow(name="unsaveable")
    flow >> make >> use
    engine = quiet(store=tmp_path)
    first = engine.run(flow, raise_on_failure=False)
    broken[0] = False
    second = engine.run(flow, resume=first.run_id)
    assert second.results["use"] == "not picklable"
    assert calls == {"make": 2, "use": 2}


@pytest.mark.parametrize("which", ["completed", "unknown"])
def test_api_resume_of_a_completed_run_or_an_unknown_id_is_a_store_error(tmp_path, which):
    @task
    def one(ctx):
        return 1

    flow = Flow(name="simple")
    flow >> one
    engine = quiet(store=tmp_path)
    done = engine.run(flow)
    run_id = done.run_id if which == "completed" else STORE_UNKNOWN_ID
    with pytest.raises(pyoco.StoreError, match=re.escape(run_id)):
        engine.run(flow, resume=run_id)
    assert RunStore(tmp_path).ids() == [done.run_id]


def test_api_resume_without_a_run_store_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    @task
    def one(ctx):
        return 1

    flow = Flow(name="simple")
    flow >> one
    with pytest.raises((pyoco.PyocoError, ValueError), match="(?i)store"):
        quiet().run(flow, resume=STORE_UNKNOWN_ID)


# ---------------------------------------------------------------------------
# Incremental runs: overrides, --only, --from and plans (SPEC section 11)
# ---------------------------------------------------------------------------

def _targets_flow(calls, cache="resume"):
    """fetch -> clean -> report, and fetch -> audit: a flow to select parts of."""
    fetch = task(name="fetch", cache=cache)(lambda ctx: (calls.append("fetch"), [3, 1, 2])[1])
    clean = task(name="clean", cache=cache)(
        lambda ctx, fetch: (calls.append("clean"), sorted(fetch))[1])
    report = task(name="report", cache=cache)(
        lambda ctx, clean: (calls.append("report"), sum(clean))[1])
    audit = task(name="audit", cache=cache)(
        lambda ctx, fetch: (calls.append("audit"), len(fetch))[1])
    flow = Flow(name="targets")
    flow >> fetch >> clean >> report
    flow.add(audit, after=[fetch])
    return flow


def test_overrides_give_a_task_its_output_without_calling_it():
    calls = []
    trace = io.StringIO()
    run = Engine(trace=trace, cute=True).run(_targets_flow(calls), overrides={"fetch": [9, 8]})
    assert "✅ done node=fetch (overridden)" in trace.getvalue()
    assert "fetch" not in calls and sorted(calls) == ["audit", "clean", "report"]
    record = run.tasks["fetch"]
    assert record.state == "SUCCEEDED" and record.reason == "overridden"
    assert record.attempts == 0 and record.reused_from is None
    assert run.results["report"] == 17 and run.results["audit"] == 2


@pytest.mark.parametrize("call, closest", [
    (dict(overrides={"fetc": 1}), "'fetch'"),
    (dict(only=["reprot"]), "'report'"),
    (dict(rerun_from=["claen"]), "'clean'"),
])
def test_an_unknown_task_name_in_targets_or_overrides_is_a_flow_error_naming_the_closest(
        call, closest):
    calls = []
    engine = quiet()
    attempts = [engine.run] + ([] if "overrides" in call else [engine.plan])
    for attempt in attempts:
        with pytest.raises(pyoco.FlowError, match="did you mean %s" % re.escape(closest)):
            attempt(_targets_flow(calls), **call)
    assert calls == []


def test_only_runs_the_named_tasks_and_what_they_need_and_skips_the_rest():
    calls = []
    run = run_quiet(_targets_flow(calls), only=["clean"])
    assert sorted(calls) == ["clean", "fetch"]
    for name in ("report", "audit"):
        assert run.tasks[name].state == "SKIPPED" and run.tasks[name].reason == "not selected"
    assert run.status == "COMPLETED"


@pytest.mark.parametrize("resume, cache, reran", [
    (False, True, ["clean", "report"]),
    (True, True, ["clean", "report"]),
    (True, "resume", ["clean", "report"]),      # a failed run keeps every output
    (False, "resume", ["audit", "clean", "fetch", "report"]),   # a completed one does not
])
def test_from_runs_the_task_and_its_downstream_and_reuses_the_rest(tmp_path, resume, cache,
                                                                   reran):
    calls = []
    engine = Engine(trace=False, store=tmp_path)
    first = engine.run(_targets_flow(calls, cache), overrides={"report": None} if resume else
                       None, raise_on_failure=False)
    if resume and cache != True:
        first = engine.run(_targets_flow(calls, cache), overrides={"clean": "x"},
                           raise_on_failure=False)
        assert first.status == "FAILED"
    del calls[:]
    run = engine.run(_targets_flow(calls, cache), rerun_from=["clean"],
                     resume=first.run_id if resume else None)
    assert sorted(calls) == reran
    reused = {name: first.run_id for name in ("fetch", "audit") if name not in calls}
    assert _reuse_of(run) == dict({"fetch": None, "clean": None, "report": None,
                                   "audit": None}, **reused)
    assert run.results["report"] == 6


def test_only_with_resume_reuses_what_succeeded_and_skips_what_is_not_needed(tmp_path):
    calls = []
    engine = Engine(trace=False, store=tmp_path)
    broken = _targets_flow(calls)
    first = engine.run(broken, overrides={"fetch": "not a list"}, raise_on_failure=False)
    assert first.status == "FAILED"
    del calls[:]
    run = engine.run(_targets_flow(calls), only=["audit"], resume=first.run_id)
    assert run.tasks["report"].reason == "not selected"
    assert run.status == "COMPLETED" and "fetch" not in calls


def _plan_rows(entries):
    return [(e["task"], e["action"], e["reason"], e["reused_from"]) for e in entries]


def test_plan_says_why_each_task_runs_or_is_reused_and_runs_nothing(tmp_path):
    calls = []

    @task(cache=True)
    def fetch(ctx, day):
        calls.append("fetch")
        return day % 2

    @task(cache=True)
    def report(ctx, fetch):
        calls.append("report")
        return fetch

    @task(cache=False)
    def notify(ctx, report):
        calls.append("notify")

    @task
    def archive(ctx, report):
        calls.append("archive")

    @task(cache=True)
    def use(ctx, conn):
        calls.append("use")

    use.task.inputs = {"conn": threading.Lock()}
    flow = Flow(name="planned")
    flow >> fetch >> report >> [notify, archive]
    flow.add(use, after=[report])
    engine = Engine(trace=False, store=tmp_path)
    assert _plan_rows(engine.plan(flow, {"day": 1})) == [
        ("fetch", "run", "no earlier run", None), ("report", "run", "no earlier run", None),
        ("notify", "run", "cache=False", None),
        ("archive", "run", "not cached (cache='resume')", None),
        ("use", "run", "no earlier run", None)]
    assert calls == [] and not (tmp_path / "runs").exists()    # nothing called or written
    first = engine.run(flow, {"day": 1}).run_id
    runs_before = sorted(os.listdir(tmp_path / "runs"))
    same = _plan_rows(engine.plan(flow, {"day": 1}))
    assert same[:2] == [("fetch", "reuse", "same code and inputs as run %s" % first, first),
                        ("report", "reuse", "same code and inputs as run %s" % first, first)]
    assert same[4] == ("use", "run", "not cacheable: input 'conn' has no fingerprint", None)
    changed = _plan_rows(engine.plan(flow, {"day": 3}))
    assert changed[:2] == [
        ("fetch", "run", "input 'day' changed since run %s" % first, None),
        ("report", "depends", "upstream 'fetch' runs: decided when it returns", None)]
    assert _plan_rows(engine.plan(flow, {"day": 1}, only=["fetch"]))[1] == (
        "report", "skip", "not selected", None)
    assert sorted(os.listdir(tmp_path / "runs")) == runs_before


def test_plan_sees_a_changed_function_body(tmp_path):
    engine = Engine(trace=False, store=tmp_path / "store")
    first = engine.run(pyoco.load_flow(str(_cached_flow_file(tmp_path, "one", "return 1"))),
                       {"day": 1})
    flow = pyoco.load_flow(str(_cached_flow_file(tmp_path, "two", "return 2")))
    assert _plan_rows(engine.plan(flow, {"day": 1})) == [
        ("fetch", "run", "code changed since run %s" % first.run_id, None)]


def test_a_parameter_only_an_overridden_or_unselected_task_needs_may_be_left_out():
    @task
    def fetch(ctx, day):
        return day

    @task
    def show(ctx, fetch):
        return "day %s" % fetch

    flow = Flow(name="left-out")
    flow >> fetch >> show
    assert run_quiet(flow, overrides={"fetch": 7}).results["show"] == "day 7"
    with pytest.raises(pyoco.FlowError, match="needs parameter 'day'"):
        run_quiet(flow, overrides={"show": "x"})
    with pytest.raises(pyoco.FlowError, match="needs parameter 'day'"):
        run_quiet(flow, only=["show"])


def test_from_a_cached_map_runs_its_instances_again(tmp_path):
    calls = []
    flow = Flow(name="forced-map")
    flow >> _cached_square(calls).map([1, 2])
    engine = Engine(trace=False, store=tmp_path)
    engine.run(flow)
    assert engine.run(flow).tasks["square[0]"].reused_from is not None
    run = engine.run(flow, rerun_from=["square"])
    assert sorted(calls) == [1, 1, 2, 2] and run.results["square"] == [1, 4]


# ===========================================================================
# Read side: metrics
# ===========================================================================


# ---------------------------------------------------------------------------
# /metrics: format, counters, gauges, histograms
# ---------------------------------------------------------------------------

def test_metrics_content_type_is_prometheus_text_0_0_4(srv_outcomes):
    server, _ = srv_outcomes
    head, text, _ = srv_metrics(server.url)
    assert head["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert text.endswith("\n")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_metrics_pass_promtool_check_metrics_with_awkward_label_values(srv_outcomes):
    server, _ = srv_outcomes
    _, text, _ = srv_metrics(server.url)
    assert "we\\\"ird\\\\\\nname" in text     # escaped as \" \\ \n
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode("utf-8"),
                           capture_output=True, timeout=30)
    assert (check.returncode, check.stdout, check.stderr) == (0, b"", b"")


def test_metrics_label_escaping_round_trips_quote_backslash_newline(srv_outcomes):
    server, runs = srv_outcomes
    _, _, samples = srv_metrics(server.url)
    assert srv_value(samples, "pyoco_runs_total", flow=SRV_WEIRD, status="COMPLETED") == 1
    assert srv_value(samples, "pyoco_task_retries_total", flow=SRV_WEIRD, task="flaky") == 1


def test_metrics_declare_every_documented_family_with_its_type(srv_outcomes):
    server, _ = srv_outcomes
    _, text, _ = srv_metrics(server.url)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    helps = set(re.findall(r"^# HELP (\S+) ", text, re.M))
    assert types == {
        "pyoco_runs_total": "counter", "pyoco_runs_in_progress": "gauge",
        "pyoco_run_duration_seconds": "histogram", "pyoco_task_duration_seconds": "histogram",
        "pyoco_tasks_total": "counter", "pyoco_task_retries_total": "counter",
        "pyoco_tasks_reused_total": "counter",
        "pyoco_last_run_timestamp_seconds": "gauge", "pyoco_webhook_deliveries_total": "counter",
        "pyoco_store_runs": "gauge", "pyoco_build_info": "gauge"}
    assert helps == set(types)


def test_metrics_count_runs_by_flow_and_final_status(srv_outcomes):
    server, _ = srv_outcomes
    _, _, samples = srv_metrics(server.url)
    totals = {(l["flow"], l["status"]): v for n, l, v in samples
              if n == "pyoco_runs_total" and v}
    assert totals == {(SRV_WEIRD, "COMPLETED"): 1, ("fails", "FAILED"): 1,
                      ("twice", "COMPLETED"): 2, ("cancels", "CANCELLED"): 1}
    assert srv_value(samples, "pyoco_store_runs") == 5
    assert srv_value(samples, "pyoco_build_info", version=pyoco.__version__,
                     python="%d.%d.%d" % sys.version_info[:3]) == 1


def test_runs_total_has_a_zero_for_every_status_of_each_flow_with_a_run(srv_outcomes):
    server, _ = srv_outcomes
    _, _, samples = srv_metrics(server.url)
    for flow in (SRV_WEIRD, "fails", "twice", "cancels"):
        counts = {l["status"]: v for n, l, v in samples
                  if n == "pyoco_runs_total" and l["flow"] == flow}
        assert set(counts) == {"COMPLETED", "FAILED", "CANCELLED"}, (flow, counts)
    assert srv_value(samples, "pyoco_runs_total", flow="fails", status="COMPLETED") == 0
    assert srv_value(samples, "pyoco_runs_total", flow="twice", status="FAILED") == 0
    # a timestamp of a status never seen has no value: it stays absent
    assert srv_value(samples, "pyoco_last_run_timestamp_seconds", flow="fails",
                     status="COMPLETED") is None


def test_metrics_count_task_outcomes_and_retries(srv_outcomes):
    server, _ = srv_outcomes
    _, _, samples = srv_metrics(server.url)
    assert srv_value(samples, "pyoco_tasks_total", flow="fails", task="bad",
                     state="FAILED") == 1
    assert srv_value(samples, "pyoco_tasks_total", flow="twice", task="step",
                     state="SUCCEEDED") == 2
    assert srv_value(samples, "pyoco_tasks_total", flow=SRV_WEIRD, task="flaky",
                     state="SUCCEEDED") == 1
    assert srv_value(samples, "pyoco_task_retries_total", flow="twice", task="step") is None


def test_runs_in_progress_is_zero_not_absent_for_flows_with_nothing_running(srv_outcomes):
    server, _ = srv_outcomes
    _, _, samples = srv_metrics(server.url)
    gauges = {l["flow"]: v for n, l, v in samples if n == "pyoco_runs_in_progress"}
    assert gauges == {SRV_WEIRD: 0, "fails": 0, "twice": 0, "cancels": 0}


def test_runs_in_progress_is_one_while_a_run_is_running_then_counted_when_done(
        tmp_path, srv_serve):
    store = tmp_path / "store"
    server = srv_serve(store)
    started, release = threading.Event(), threading.Event()

    @task
    def hold(ctx):
        started.set()
        release.wait(WAIT)

    flow = Flow("slowpoke")
    flow >> hold
    runner = threading.Thread(target=quiet(store=str(store)).run, args=(flow,))
    runner.start()
    try:
        assert started.wait(WAIT)
        wait_until(lambda: srv_value(srv_metrics(server.url)[2], "pyoco_runs_in_progress",
                                     flow="slowpoke") == 1, what="runs_in_progress == 1")
        samples = srv_metrics(server.url)[2]
        for status in ("COMPLETED", "FAILED", "CANCELLED"):     # 0 from its first run on
            assert srv_value(samples, "pyoco_runs_total", flow="slowpoke", status=status) == 0
    finally:
        release.set()
        runner.join(WAIT)

    def settled():
        samples = srv_metrics(server.url)[2]
        return (srv_value(samples, "pyoco_runs_in_progress", flow="slowpoke") == 0
                and srv_value(samples, "pyoco_runs_total", flow="slowpoke",
                              status="COMPLETED") == 1)
    wait_until(settled, what="the finished run to be counted")


def test_histograms_have_cumulative_buckets_ending_at_inf_equal_to_count(srv_outcomes):
    server, _ = srv_outcomes
    _, _, samples = srv_metrics(server.url)
    runs = srv_check_histogram(samples, "pyoco_run_duration_seconds")
    tasks = srv_check_histogram(samples, "pyoco_task_duration_seconds")
    assert set(runs) == {(("flow", f),) for f in (SRV_WEIRD, "fails", "twice", "cancels")}
    assert (("flow", "fails"), ("task", "bad")) in tasks
    assert srv_value(samples, "pyoco_run_duration_seconds_count", flow="twice") == 2
    assert srv_value(samples, "pyoco_task_duration_seconds_count", flow="twice",
                     task="step") == 2


def test_run_duration_lands_in_the_buckets_at_or_above_it(srv_outcomes):
    server, runs = srv_outcomes
    _, _, samples = srv_metrics(server.url)
    seconds = runs["failed"].to_dict()["duration_ms"] / 1000
    for n, labels, value in samples:
        if n == "pyoco_run_duration_seconds_bucket" and labels["flow"] == "fails":
            assert value == (1 if seconds <= float(labels["le"]) else 0), (labels, seconds)
    total = srv_value(samples, "pyoco_run_duration_seconds_sum", flow="fails")
    assert total == pytest.approx(seconds, abs=1e-6)


def test_last_run_timestamp_is_when_the_latest_run_with_that_status_ended(srv_outcomes):
    server, runs = srv_outcomes
    _, _, samples = srv_metrics(server.url)
    for label, flow, status in (("weird", SRV_WEIRD, "COMPLETED"), ("failed", "fails", "FAILED"),
                                ("cancelled", "cancels", "CANCELLED"),
                                ("twice-2", "twice", "COMPLETED")):
        value = srv_value(samples, "pyoco_last_run_timestamp_seconds", flow=flow, status=status)
        assert value == pytest.approx(runs[label].ended_at, abs=0.002), (label, value)
    assert runs["twice-2"].ended_at > runs["twice-1"].ended_at + 0.001


def test_counters_do_not_go_down_when_old_runs_are_pruned(tmp_path, srv_serve):
    store = tmp_path / "store"
    srv_make_outcomes(store)
    server = srv_serve(store)
    before = srv_metrics(server.url)[2]
    assert srv_value(before, "pyoco_store_runs") == 5
    pyoco.RunStore(str(store)).prune(keep=1)

    def pruned():
        return srv_value(srv_metrics(server.url)[2], "pyoco_store_runs") == 1
    wait_until(pruned, what="the view to notice the pruning")
    after = srv_metrics(server.url)[2]
    for name in ("pyoco_runs_total", "pyoco_tasks_total", "pyoco_task_retries_total",
                 "pyoco_run_duration_seconds_count", "pyoco_last_run_timestamp_seconds"):
        assert [s for s in after if s[0] == name] == [s for s in before if s[0] == name], name
    assert len(srv_json(server.url, "GET", "/runs")[1]) == 1


def test_map_instances_share_one_metrics_label(tmp_path):
    @task
    def files(ctx):
        return ["a", "b", "c"]

    @task
    def handle(ctx, name):
        return name.upper()

    flow = Flow("mapped-metrics")
    flow >> files >> handle.map("$node.files.output")
    Engine(trace=False, store=tmp_path).run(flow)
    text = pyoco.MetricsView(RunStore(tmp_path)).render()
    assert 'pyoco_tasks_total{flow="mapped-metrics",task="handle[*]",state="SUCCEEDED"} 3' in text
    assert 'task="handle[0]"' not in text
    assert 'pyoco_tasks_total{flow="mapped-metrics",task="handle",state="SUCCEEDED"} 1' in text


# ---------------------------------------------------------------------------
# A real Prometheus scrapes the server
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def srv_prometheus(tmp_path_factory):
    """One real Prometheus for the session, scraping every second each server a
    test hands to ``scrape(port)`` (which returns that target's instance label
    matcher); yields (scrape, query), ``query(promql)`` being the result list of
    an instant query (None until it answers)."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed")
    folder = tmp_path_factory.mktemp("prometheus")
    targets = folder / "targets.json"
    targets.write_text("[]", encoding="utf-8")
    config = folder / "prometheus.yml"
    config.write_text(textwrap.dedent("""\
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        scrape_configs:
          - job_name: pyoco
            scrape_interval: 1s
            file_sd_configs:
              - files: ["%s"]
                refresh_interval: 1s
        """ % targets), encoding="utf-8")
    log_path = folder / "prometheus.log"
    log = open(str(log_path), "wb")
    prom = subprocess.Popen(["prometheus", "--config.file=%s" % config,
                             "--storage.tsdb.path=%s" % (folder / "tsdb"),
                             "--web.listen-address=127.0.0.1:0"],
                            stdout=log, stderr=log, cwd=str(folder))

    def listening():            # the port it bound, from its log
        assert prom.poll() is None, log_path.read_text()
        return re.search(r'msg="Listening on" address=127\.0\.0\.1:(\d+)', log_path.read_text())
    api = "http://127.0.0.1:%s" % wait_until(listening, what="Prometheus to listen").group(1)
    ports = []

    def scrape(port):
        # Only this test's server: a port scraped after its test may be bound next by
        # something else (a Dask scheduler reads an HTTP request as a huge frame).
        ports[:] = [port]
        staged = folder / "targets.tmp"
        staged.write_text(json.dumps([{"targets": ["127.0.0.1:%d" % p for p in ports]}]),
                          encoding="utf-8")
        os.replace(str(staged), str(targets))       # Prometheus reads it whole
        return 'instance="127.0.0.1:%d"' % port

    def query(promql):
        assert prom.poll() is None, log_path.read_text()
        try:
            status, _, data = srv_request(api, "GET", "/api/v1/query?query=" + quote(promql),
                                          timeout=2)
        except OSError:
            return None
        answer = json.loads(data) if status == 200 else {}
        return answer.get("data", {}).get("result")
    try:
        yield scrape, query
    finally:
        prom.kill()
        prom.wait()
        log.close()


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_real_prometheus_scrapes_runs_total_with_flow_labels(srv_outcomes, srv_prometheus):
    server, _ = srv_outcomes
    scrape, query = srv_prometheus
    mine = scrape(server.port)
    result = wait_until(lambda: query("pyoco_runs_total{%s}" % mine), timeout=30,
                        what="Prometheus to scrape pyoco_runs_total")
    seen = {(r["metric"]["flow"], r["metric"]["status"]): float(r["value"][1])
            for r in result if float(r["value"][1])}
    assert seen == {(SRV_WEIRD, "COMPLETED"): 1, ("fails", "FAILED"): 1,
                    ("twice", "COMPLETED"): 2, ("cancels", "CANCELLED"): 1}
    assert len(result) == 4 * 3             # and a 0 for every other status
    [up] = query("up{%s}" % mine)
    assert up["value"][1] == "1"


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_real_prometheus_alert_expression_fires_on_a_flows_first_failure(tmp_path, srv_serve,
                                                                          srv_prometheus):
    store = tmp_path / "store"
    engine = quiet(store=str(store))

    @task
    def load(ctx, fail=False):
        if fail:
            raise ValueError("bad row 17")

    flow = Flow("nightly")
    flow >> load
    engine.run(flow)
    server = srv_serve(store)
    scrape, query = srv_prometheus
    failed = 'pyoco_runs_total{flow="nightly",status="FAILED",%s}' % scrape(server.port)
    wait_until(lambda: query(failed), timeout=30, what="Prometheus to scrape " + failed)
    assert query("increase(%s[1m]) > 0" % failed) == []
    engine.run(flow, {"fail": True}, raise_on_failure=False)
    wait_until(lambda: query("increase(%s[1m]) > 0" % failed), timeout=30,
               what="the documented alert expression to fire")

# ---------------------------------------------------------------------------
# The Grafana dashboard
# ---------------------------------------------------------------------------

SRV_DASHBOARD = HERE / "docs" / "grafana_pyoco_cute.json"


def srv_dashboard_walk(node):
    """Every dict in the dashboard JSON."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from srv_dashboard_walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from srv_dashboard_walk(value)


def test_grafana_dashboard_is_json_with_a_prometheus_datasource_input():
    dashboard = json.loads(SRV_DASHBOARD.read_text("utf-8"))
    inputs = dashboard["__inputs"]
    assert {"name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}.items() \
        <= [i for i in inputs if i["name"] == "DS_PROMETHEUS"][0].items()
    sources = [d["datasource"] for d in srv_dashboard_walk(dashboard) if "datasource" in d]
    assert sources, "no panel names a datasource"
    for source in sources:
        uid = source.get("uid") if isinstance(source, dict) else source
        assert uid == "${DS_PROMETHEUS}", source


def test_grafana_dashboard_uses_only_metrics_that_metrics_emits(srv_outcomes):
    server, _ = srv_outcomes
    dashboard = json.loads(SRV_DASHBOARD.read_text("utf-8"))
    exprs = [d["expr"] for d in srv_dashboard_walk(dashboard) if isinstance(d.get("expr"), str)]
    assert exprs
    used = {re.sub(r"_(bucket|sum|count)$", "", name)
            for expr in exprs for name in re.findall(r"\bpyoco_[a-zA-Z0-9_]+", expr)}
    emitted = {re.sub(r"_(bucket|sum|count)$", "", name)
               for name, _, _ in srv_metrics(server.url)[2]}
    assert used and used <= emitted, used - emitted


# ---------------------------------------------------------------------------
# Schedules and reused tasks in /metrics
# ---------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_schedule_metrics_pass_promtool_check_metrics(tmp_path, srv_serve):
    store = tmp_path / "store"
    server, clock = sch_server(srv_serve, store, [sch_quick_flow(SRV_WEIRD)], "2026-12-01T10:02Z")
    sch_move([clock], "2026-12-01T10:05Z")
    sch_wait_runs(store, ["2026-12-01T10:05:00.000Z"])
    _, text, samples = srv_metrics(server.url)
    assert srv_value(samples, "pyoco_schedule_skipped_total", flow=SRV_WEIRD) == 0
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode("utf-8"),
                           capture_output=True, timeout=30)
    assert (check.returncode, check.stdout, check.stderr) == (0, b"", b"")


@pytest.fixture
def reused_store(tmp_path, srv_serve):
    """A store where flow "again" ran fetch once and then reused it twice."""
    @task(cache=True)
    def fetch(ctx):
        return 1

    @task
    def show(ctx, fetch):
        return fetch

    flow = Flow(name="again")
    flow >> fetch >> show
    engine = Engine(trace=False, store=tmp_path)
    runs = [engine.run(flow) for _ in range(3)]
    return srv_serve(tmp_path).url, runs


def test_metrics_count_reused_tasks_by_flow_and_task(reused_store):
    url, runs = reused_store
    _, _, body = page_get(url + "/metrics")
    text = body.decode("utf-8")
    assert "# TYPE pyoco_tasks_reused_total counter" in text
    assert 'pyoco_tasks_reused_total{flow="again",task="fetch"} 2' in text
    assert 'pyoco_tasks_reused_total{flow="again",task="show"}' not in text


# ===========================================================================
# Read side: the HTTP server
# ===========================================================================


# ---------------------------------------------------------------------------
# Starting the server: in-process and as the CLI
# ---------------------------------------------------------------------------

def test_in_process_server_listens_on_loopback_free_port_and_answers_healthz(
        tmp_path, srv_serve):
    server = srv_serve(tmp_path / "store")
    assert server.port != 0
    assert server.url == "http://127.0.0.1:%d" % server.port
    status, body = srv_json(server.url, "GET", "/healthz")
    assert status == 200
    assert body == {"status": "ok", "version": pyoco.__version__}


def test_cli_serve_prints_its_url_runs_posted_flows_and_exits_0_on_sigterm(
        tmp_path, srv_cli_serve):
    store = tmp_path / "store"
    server = srv_cli_serve(store, srv_flow_file(tmp_path))
    assert server.first_line.startswith("pyoco serve: listening on http://127.0.0.1:")
    assert server.port != 0
    assert srv_json(server.url, "GET", "/healthz")[0] == 200

    status, body = srv_json(server.url, "POST", "/runs",
                            {"flow": "greet", "params": {"who": "bob"}})
    assert status == 202, body
    assert body["flow"] == "greet" and body["status"] == "RUNNING"
    run_id = body["run_id"]

    def completed():
        status, record = srv_json(server.url, "GET", "/runs/" + run_id)
        return status == 200 and record["status"] == "COMPLETED" and record
    record = wait_until(completed, what="the posted run to complete")
    assert record["params"] == {"who": "bob"}
    status, logs = srv_json(server.url, "GET", "/runs/%s/logs" % run_id)
    assert [line["text"] for line in logs["logs"]] == ["hello bob"]
    assert server.stop() == 0


def test_cli_serve_on_sigterm_cancels_runs_it_started_and_exits_0(tmp_path, srv_cli_serve):
    store = tmp_path / "store"
    flow_file = srv_flow_file(tmp_path, "lingers", """\
        from pyoco import task, Flow

        @task
        def linger(ctx):
            ctx.cancelled.wait(30)

        flow = Flow("lingers")
        flow >> linger
        """)
    server = srv_cli_serve(store, flow_file)
    status, body = srv_json(server.url, "POST", "/runs", {"flow": "lingers"})
    assert status == 202
    run_id = body["run_id"]

    def running():
        record = pyoco.RunStore(str(store)).get(run_id)
        return record is not None and record["status"] == "RUNNING"
    wait_until(running, what="the posted run to be RUNNING")
    began = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - began < WAIT
    record = pyoco.RunStore(str(store)).get(run_id)
    assert record["status"] == "CANCELLED"
    assert record["reason"]


def test_cli_serve_takes_pyoco_api_token_from_its_environment(tmp_path, srv_cli_serve):
    server = srv_cli_serve(tmp_path / "store", srv_flow_file(tmp_path),
                           PYOCO_API_TOKEN="cli-token")
    request = {"flow": "greet"}
    assert srv_json(server.url, "POST", "/runs", request)[0] == 401
    assert srv_json(server.url, "POST", "/runs", request,
                    {"Authorization": "Bearer wrong"})[0] == 401
    status, body = srv_json(server.url, "POST", "/runs", request,
                            {"Authorization": "Bearer cli-token"})
    assert status == 202, body
    wait_until(lambda: srv_json(server.url, "GET", "/runs/" + body["run_id"])[1].get("status")
               == "COMPLETED", what="the run to complete")
    assert server.stop() == 0
    assert server.stop() == 0


def srv_has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not srv_has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_server_listens_on_ipv6_loopback_in_process_and_as_the_cli(tmp_path, srv_serve,
                                                                   srv_cli_serve):
    store = tmp_path / "store"
    server = srv_serve(store, host="::1")
    assert server.url == "http://[::1]:%d" % server.port
    assert srv_json(server.url, "GET", "/healthz")[1]["status"] == "ok"
    # a write passes the Host and loopback checks over IPv6 too: the run is unknown
    assert srv_json(server.url, "POST", "/runs/20991231-235959-deadbeef/cancel")[0] == 404

    cli = srv_cli_serve(store, options=["--host", "::1"])
    assert cli.first_line.startswith("pyoco serve: listening on http://[::1]:")
    assert cli.url == "http://[::1]:%d" % cli.port
    assert srv_json(cli.url, "GET", "/healthz")[0] == 200
    assert cli.stop() == 0


# ---------------------------------------------------------------------------
# Runs made by other processes
# ---------------------------------------------------------------------------

def test_run_by_another_process_shows_in_metrics_and_runs_within_2_s(tmp_path, srv_serve):
    store = tmp_path / "store"
    server = srv_serve(store)
    assert srv_value(srv_metrics(server.url)[2], "pyoco_store_runs") == 0    # view primed
    done = cli(tmp_path, "run", srv_flow_file(tmp_path), "--store", store, "--non-cute")
    assert done.returncode == 0, done.stderr
    finished = time.monotonic()
    run_id = pyoco.RunStore(str(store)).ids()[0]

    def visible():
        samples = srv_metrics(server.url)[2]
        listed = srv_json(server.url, "GET", "/runs")[1]
        return (srv_value(samples, "pyoco_runs_total", flow="greet", status="COMPLETED") == 1
                and [r["run_id"] for r in listed] == [run_id])
    wait_until(visible, timeout=2.0, what="the other process's run")
    assert time.monotonic() - finished < 2.0


def test_run_whose_process_was_killed_is_reported_failed_not_in_progress(tmp_path, srv_serve):
    store = tmp_path / "store"
    server = srv_serve(store)
    flow_file = srv_flow_file(tmp_path, "stuck", """\
        import time
        from pyoco import task, Flow

        @task
        def forever(ctx):
            time.sleep(60)          # work that never ends in time

        flow = Flow("stuck")
        flow >> forever
        """)
    proc = subprocess.Popen([sys.executable, "-m", "pyoco", "run", str(flow_file), "--store",
                             str(store)], env=child_env(), cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: srv_value(srv_metrics(server.url)[2], "pyoco_runs_in_progress",
                                     flow="stuck") == 1, what="the other process's run")
    finally:
        proc.kill()
        proc.wait()

    def settled():
        samples = srv_metrics(server.url)[2]
        return (srv_value(samples, "pyoco_runs_in_progress", flow="stuck") == 0
                and srv_value(samples, "pyoco_runs_total", flow="stuck", status="FAILED") == 1)
    wait_until(settled, what="the dead run to count as FAILED")
    [record] = srv_json(server.url, "GET", "/runs?flow=stuck")[1]
    assert record["status"] == "FAILED"
    assert "died" in record["reason"]


# ---------------------------------------------------------------------------
# GET /runs, /runs/{id}, /runs/{id}/logs, /healthz, errors
# ---------------------------------------------------------------------------

def test_runs_lists_newest_first_without_events(srv_outcomes):
    server, runs = srv_outcomes
    status, listed = srv_json(server.url, "GET", "/runs")
    assert status == 200
    assert [r["run_id"] for r in listed] == [
        runs[k].run_id for k in ("cancelled", "twice-2", "twice-1", "failed", "weird")]
    for record in listed:
        assert set(record) == RUN_KEYS - {"events"}


@pytest.mark.parametrize("query, expected", [
    ("?status=FAILED", ["failed"]),
    ("?flow=twice", ["twice-2", "twice-1"]),
    ("?status=COMPLETED&flow=twice&limit=1", ["twice-2"]),
    ("?limit=2", ["cancelled", "twice-2"]),
    ("?flow=" + quote(SRV_WEIRD, safe=""), ["weird"]),
    ("?status=RUNNING", []),
    ("?limit=1000", ["cancelled", "twice-2", "twice-1", "failed", "weird"]),
])
def test_runs_filters_by_status_flow_and_limit(srv_outcomes, query, expected):
    server, runs = srv_outcomes
    status, listed = srv_json(server.url, "GET", "/runs" + query)
    assert status == 200
    assert [r["run_id"] for r in listed] == [runs[k].run_id for k in expected]


@pytest.mark.parametrize("query", [
    "?status=BOGUS", "?status=completed", "?limit=0", "?limit=1001", "?limit=abc",
    "?limit=-1", "?statsu=FAILED", "?limit", "?&&", "?limit=1&limit=2", "?=1",
])
def test_runs_refuses_bad_parameters_with_400_json_error(srv_outcomes, query):
    server, _ = srv_outcomes
    status, body = srv_json(server.url, "GET", "/runs" + query)
    assert status == 400
    assert set(body) == {"error"} and body["error"]


@pytest.mark.parametrize("limit", ["1_0", "%D9%A3"])
def test_runs_limit_must_be_a_plain_decimal_number(srv_outcomes, limit):
    server, _ = srv_outcomes
    status, body = srv_json(server.url, "GET", "/runs?limit=" + limit)
    assert status == 400, "got %d with %d runs" % (status, len(body))


def test_run_by_id_is_the_full_record_with_events(srv_outcomes):
    server, runs = srv_outcomes
    run = runs["failed"]
    status, record = srv_json(server.url, "GET", "/runs/" + run.run_id)
    assert status == 200
    assert set(record) == RUN_KEYS
    assert record["run_id"] == run.run_id and record["status"] == "FAILED"
    assert record["tasks"]["bad"]["error"] == "ValueError: boom"
    assert record["tasks"]["bad"]["traceback"]
    events = [(e["event"], e["task"], e["state"]) for e in record["events"]]
    assert events[0] == ("run.started", None, "RUNNING")
    assert events[-1] == ("run.failed", None, "FAILED")
    for key in ("started_at", "ended_at"):
        assert ISO.match(record[key]), record[key]
    assert record == pyoco.RunStore(server.store.root).get(run.run_id)


@pytest.mark.parametrize("path", [
    "/runs/20991231-235959-deadbeef", "/runs/..%2F..%2Fetc", "/runs/..%2F..%2Fetc%2Fpasswd",
    "/runs/..", "/runs/%2e%2e", "/runs/.hidden", "/runs/..%2F..%2Fetc/logs",
    "/runs/20991231-235959-deadbeef/logs",
])
def test_unknown_or_path_like_run_ids_are_404_json(srv_outcomes, path):
    server, _ = srv_outcomes
    status, body = srv_json(server.url, "GET", path)
    assert status == 404
    assert set(body) == {"error"} and body["error"]


@pytest.fixture(scope="module")
def srv_logged_run(tmp_path_factory):
    """(server, run) of a run whose task ``talk`` wrote to stdout, stderr and ctx.log."""
    store = tmp_path_factory.mktemp("logged") / "store"

    @task
    def talk(ctx):
        print("line 1")
        print("line 2")
        print("oops", file=sys.stderr)
        ctx.log.info("logged")

    @task
    def other(ctx):
        print("from other")

    flow = Flow("chatty")
    flow >> talk >> other
    with no_pyoco_env():
        run = quiet(store=str(store)).run(flow)
        server = pyoco.Server(str(store), port=0).start()
    yield server, run
    srv_close_later(server)


def test_run_logs_have_the_documented_shape_and_streams(srv_logged_run):
    server, run = srv_logged_run
    status, body = srv_json(server.url, "GET", "/runs/%s/logs?task=talk" % run.run_id)
    assert status == 200
    assert set(body) == {"run_id", "status", "logs"}
    assert (body["run_id"], body["status"]) == (run.run_id, "COMPLETED")
    for line in body["logs"]:
        assert set(line) == {"ts", "task", "stream", "text"}
        assert ISO.match(line["ts"]) and line["task"] == "talk"
    assert [(l["stream"], l["text"]) for l in body["logs"]] == [
        ("stdout", "line 1"), ("stdout", "line 2"), ("stderr", "oops"), ("log", "INFO logged")]
    everything = srv_json(server.url, "GET", "/runs/%s/logs" % run.run_id)[1]["logs"]
    assert sorted((l["task"], l["text"]) for l in everything) == [
        ("other", "from other"), ("talk", "INFO logged"), ("talk", "line 1"),
        ("talk", "line 2"), ("talk", "oops")]


def test_run_logs_tail_keeps_the_last_lines_of_the_task(srv_logged_run):
    server, run = srv_logged_run
    status, body = srv_json(server.url, "GET", "/runs/%s/logs?tail=2&task=talk" % run.run_id)
    assert status == 200
    assert [(l["task"], l["stream"], l["text"]) for l in body["logs"]] == [
        ("talk", "stderr", "oops"), ("talk", "log", "INFO logged")]


@pytest.mark.parametrize("query, code", [
    ("?task=nope", 404), ("?task=..%2F..%2Frun.json", 404), ("?tail=0", 400),
    ("?tail=10001", 400), ("?tail=x", 400), ("?lines=3", 400),
])
def test_run_logs_refuse_unknown_tasks_and_bad_tails(srv_logged_run, query, code):
    server, run = srv_logged_run
    status, body = srv_json(server.url, "GET", "/runs/%s/logs%s" % (run.run_id, query))
    assert status == code
    assert set(body) == {"error"}


def test_run_by_id_refuses_query_parameters(srv_logged_run):
    server, run = srv_logged_run
    assert srv_json(server.url, "GET", "/runs/%s?events=0" % run.run_id)[0] == 400


@pytest.mark.parametrize("path", ["/nope", "/runs/x/y/z", "/metrics/extra", "/healthz/x",
                                  "/runs/20991231-235959-deadbeef/nope"])
def test_unknown_path_is_404_json(srv_outcomes, path):
    server, _ = srv_outcomes
    status, body = srv_json(server.url, "GET", path)
    assert status == 404
    assert set(body) == {"error"}


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/metrics", "GET"), ("POST", "/metrics", "GET"), ("PUT", "/runs", "GET, POST"),
    ("POST", "/healthz", "GET"), ("GET", "/runs/20991231-235959-deadbeef/cancel", "POST"),
    ("PATCH", "/runs/20991231-235959-deadbeef", "GET"),
])
def test_wrong_method_is_405_json_with_allow_header(srv_outcomes, method, path, allowed):
    server, _ = srv_outcomes
    status, head, data = srv_request(server.url, method, path)
    assert status == 405
    assert head["allow"] == allowed
    assert set(json.loads(data)) == {"error"}


def test_head_metrics_sends_headers_without_a_body(srv_outcomes):
    server, _ = srv_outcomes
    status, head, data = srv_request(server.url, "HEAD", "/metrics")
    assert status == 200 and data == b""
    assert int(head["content-length"]) > 0


def test_unsupported_method_is_405_json(srv_outcomes):
    server, _ = srv_outcomes
    status, head, data = srv_request(server.url, "OPTIONS", "/metrics")
    assert status == 405, (status, head.get("content-type"), data[:60])
    assert head["content-type"].startswith("application/json")
    assert set(json.loads(data)) == {"error"}


# ---------------------------------------------------------------------------
# POST /runs and POST /runs/{id}/cancel, and who may send them
# ---------------------------------------------------------------------------

@pytest.fixture
def srv_api(tmp_path, srv_serve):
    """A server that may start ``quick`` (adds its params) and ``waits`` (until cancelled)."""
    store = tmp_path / "store"
    started = threading.Event()

    @task
    def add(ctx, a=1, b=2):
        return a + b

    @task
    def wait_for_cancel(ctx):
        started.set()
        ctx.cancelled.wait(30)

    @task
    def dated(ctx, day):
        return day

    quick = Flow("quick")
    quick >> add
    waits = Flow("waits")
    waits >> wait_for_cancel
    needs = Flow("needs")
    needs >> dated
    server = srv_serve(store, flows={"quick": quick, "waits": waits, "needs": needs})
    server.started = started
    return server


def srv_wait_status(server, run_id, status):
    def reached():
        code, record = srv_json(server.url, "GET", "/runs/" + run_id)
        return code == 200 and record["status"] == status and record
    return wait_until(reached, what="run %s to be %s" % (run_id, status))


def test_post_runs_starts_a_loaded_flow_that_completes(srv_api):
    status, body = srv_json(srv_api.url, "POST", "/runs",
                            {"flow": "quick", "params": {"a": 40}})
    assert status == 202
    assert set(body) == {"run_id", "flow", "status"}
    assert (body["flow"], body["status"]) == ("quick", "RUNNING")
    record = srv_wait_status(srv_api, body["run_id"], "COMPLETED")
    assert record["params"] == {"a": 40}
    assert record["tasks"]["add"]["state"] == "SUCCEEDED"


@pytest.mark.parametrize("body, code", [
    ({"flow": "nope"}, 404),
    (b"{not json", 400),
    ({"flow": "quick", "params": [1, 2]}, 400),
    ({"flow": "quick", "extra": 1}, 400),
    ([1, 2], 400),
    ({"flow": "needs"}, 400),
])
def test_post_runs_refuses_unknown_flows_and_bad_bodies(srv_api, body, code):
    status, answer = srv_json(srv_api.url, "POST", "/runs", body)
    assert status == code
    assert set(answer) == {"error"} and answer["error"]
    assert srv_json(srv_api.url, "GET", "/runs")[1] == []       # nothing was started


def test_post_runs_refuses_params_that_do_not_validate_naming_the_parameter(srv_api):
    status, answer = srv_json(srv_api.url, "POST", "/runs", {"flow": "needs"})
    assert status == 400
    assert "day" in answer["error"]
    status, body = srv_json(srv_api.url, "POST", "/runs",
                            {"flow": "needs", "params": {"day": "2026-11-29"}})
    assert status == 202
    record = srv_wait_status(srv_api, body["run_id"], "COMPLETED")
    assert record["params"] == {"day": "2026-11-29"}


def test_concurrent_posts_start_distinct_runs_that_all_complete(srv_api):
    answers = []
    lock = threading.Lock()
    go = threading.Event()

    def post(i):
        go.wait(WAIT)
        answer = srv_json(srv_api.url, "POST", "/runs", {"flow": "quick", "params": {"a": i}})
        with lock:
            answers.append(answer)
    posters = [threading.Thread(target=post, args=(i,)) for i in range(10)]
    for p in posters:
        p.start()
    go.set()
    for p in posters:
        p.join(WAIT)
    assert [code for code, _ in answers] == [202] * 10
    run_ids = {body["run_id"] for _, body in answers}
    assert len(run_ids) == 10
    params = set()
    for run_id in run_ids:
        params.add(srv_wait_status(srv_api, run_id, "COMPLETED")["params"]["a"])
    assert params == set(range(10))


@pytest.mark.parametrize("body", [{"params": {}}, b""])
def test_post_runs_without_a_flow_name_is_400(srv_api, body):
    status, answer = srv_json(srv_api.url, "POST", "/runs", body)
    assert status == 400, (status, answer)


def test_run_started_through_the_api_can_be_read_at_once(srv_api):
    answers = {}
    for _ in range(40):
        run_id = srv_json(srv_api.url, "POST", "/runs", {"flow": "quick"})[1]["run_id"]
        answers[run_id] = srv_json(srv_api.url, "GET", "/runs/" + run_id)
    for run_id in answers:          # let every run end inside the test
        srv_wait_status(srv_api, run_id, "COMPLETED")
    codes = [code for code, _ in answers.values()]
    assert codes == [200] * 40, "%d of 40 answered 404" % codes.count(404)


def test_cancel_a_running_run_through_the_api(srv_api):
    status, body = srv_json(srv_api.url, "POST", "/runs", {"flow": "waits"})
    assert status == 202
    run_id = body["run_id"]
    assert srv_api.started.wait(WAIT)
    status, answer = srv_json(srv_api.url, "POST", "/runs/%s/cancel" % run_id)
    assert (status, answer) == (202, {"run_id": run_id, "status": "CANCELLING"})
    record = srv_wait_status(srv_api, run_id, "CANCELLED")
    assert record["ended_at"] is not None


def test_cancel_a_run_of_another_engine_through_the_api(tmp_path, srv_serve):
    store = tmp_path / "store"
    server = srv_serve(store)
    started = threading.Event()
    seen = {}
    flow = Flow("elsewhere")
    flow >> srv_waiting_task("wait_for_cancel", started, seen)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault(
        "run", quiet(store=str(store)).run(flow, raise_on_failure=False)))
    runner.start()
    assert started.wait(WAIT)
    status, answer = srv_json(server.url, "POST", "/runs/%s/cancel" % seen["run_id"])
    runner.join(WAIT)
    assert status == 202, answer
    assert result["run"].status == "CANCELLED"
    assert srv_wait_status(server, seen["run_id"], "CANCELLED")


def test_cancel_a_finished_run_is_409_and_an_unknown_one_404(srv_outcomes):
    server, runs = srv_outcomes
    for label in ("weird", "failed", "cancelled"):
        status, body = srv_json(server.url, "POST", "/runs/%s/cancel" % runs[label].run_id)
        assert status == 409 and set(body) == {"error"}
    assert srv_json(server.url, "POST", "/runs/20991231-235959-deadbeef/cancel")[0] == 404


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_api_token_guards_both_post_endpoints(tmp_path, srv_serve, monkeypatch, how):
    store = tmp_path / "store"
    run_id = srv_make_outcomes(store)["weird"].run_id

    @task
    def noop(ctx):
        return None

    flow = Flow("noop")
    flow >> noop
    if how == "environment":
        monkeypatch.setenv("PYOCO_API_TOKEN", "s3cret")
        server = srv_serve(store, flows={"noop": flow})
    else:
        server = srv_serve(store, flows={"noop": flow}, token="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Basic s3cret"}):
        status, head, data = srv_request(server.url, "POST", "/runs", {"flow": "noop"}, headers)
        assert status == 401, headers
        assert head["www-authenticate"] == "Bearer"
        assert srv_request(server.url, "POST", "/runs/%s/cancel" % run_id,
                           headers=headers)[0] == 401
    good = {"Authorization": "Bearer s3cret"}
    status, body = srv_json(server.url, "POST", "/runs", {"flow": "noop"}, good)
    assert status == 202
    srv_wait_status(server, body["run_id"], "COMPLETED")
    assert srv_json(server.url, "POST", "/runs/%s/cancel" % run_id, headers=good)[0] == 409
    assert srv_json(server.url, "GET", "/runs")[0] == 200          # reading needs no token


def test_posts_are_refused_with_403_beyond_loopback_without_a_token(tmp_path, srv_serve):
    # Binding a non-loopback address is not safe here, so the server listens on
    # 127.0.0.1 and is told afterwards that its host is 0.0.0.0: authorize()
    # decides from that attribute, exactly as for a server bound to 0.0.0.0.
    store = tmp_path / "store"
    run_id = srv_make_outcomes(store)["weird"].run_id
    server = srv_serve(store, flows={})
    server.host = "0.0.0.0"
    base = "http://127.0.0.1:%d" % server.port
    status, body = srv_json(base, "POST", "/runs", {"flow": "x"})
    assert status == 403 and set(body) == {"error"}
    assert srv_json(base, "POST", "/runs/%s/cancel" % run_id)[0] == 403
    assert srv_json(base, "GET", "/runs")[0] == 200


def test_posts_beyond_loopback_are_allowed_with_the_right_token(tmp_path, srv_serve):
    store = tmp_path / "store"
    run_id = srv_make_outcomes(store)["weird"].run_id
    server = srv_serve(store, token="tok")
    server.host = "0.0.0.0"         # see the test above
    base = "http://127.0.0.1:%d" % server.port
    assert srv_json(base, "POST", "/runs/%s/cancel" % run_id)[0] == 401
    assert srv_json(base, "POST", "/runs/%s/cancel" % run_id,
                    headers={"Authorization": "Bearer tok"})[0] == 409


# -- the Host header: a page whose name was re-pointed at 127.0.0.1 (DNS rebinding)

SRV_FOREIGN_HOSTS = ["127.0.0.1.attacker.example:{port}", "attacker.example:{port}",
                     "localhost.attacker.example", "127.1:{port}", "[127.0.0.1]:{port}",
                     "::1", "127.0.0.1:{port}x", "[::1]x"]


@pytest.mark.parametrize("host", SRV_FOREIGN_HOSTS)
def test_every_request_whose_host_is_not_an_ip_or_localhost_is_403(srv_outcomes, host):
    server, runs = srv_outcomes
    headers = {"Host": host.format(port=server.port)}
    run_id = runs["failed"].run_id
    for method, path in [("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/runs"),
                         ("GET", "/runs/" + run_id), ("GET", "/runs/%s/logs" % run_id),
                         ("GET", "/"), ("GET", "/nope"), ("POST", "/runs/%s/cancel" % run_id)]:
        status, head, data = srv_request(server.url, method, path, headers=headers)
        assert status == 403, (method, path, status)
        assert head["content-type"] == "application/json"
        assert set(json.loads(data)) == {"error"}


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST",
                                  "[::1]:{port}", "10.20.30.40:9090", "[2001:db8::1]",
                                  "127.0.0.1:"])
def test_hosts_that_are_ip_literals_or_localhost_are_served(srv_outcomes, host):
    server, _ = srv_outcomes
    headers = {"Host": host.format(port=server.port)}
    assert srv_request(server.url, "GET", "/healthz", headers=headers)[0] == 200
    assert srv_request(server.url, "GET", "/metrics", headers=headers)[0] == 200


def test_pyoco_allowed_hosts_adds_names_and_star_allows_any(tmp_path, srv_serve, monkeypatch):
    store = tmp_path / "store"
    run_id = srv_make_outcomes(store)["weird"].run_id
    cancel = "/runs/%s/cancel" % run_id
    monkeypatch.setenv("PYOCO_ALLOWED_HOSTS", "pyoco.internal, Scrape.Example")
    server = srv_serve(store)
    for host in ("pyoco.internal:%d" % server.port, "scrape.example", "SCRAPE.example:80"):
        assert srv_request(server.url, "GET", "/metrics", headers={"Host": host})[0] == 200
    for host in ("other.example", "pyoco.internal.attacker.example", "internal"):
        assert srv_request(server.url, "GET", "/runs", headers={"Host": host})[0] == 403
    # without a token, changes must still be addressed to a loopback name
    assert srv_request(server.url, "POST", cancel, headers={"Host": "pyoco.internal"})[0] == 403
    assert srv_request(server.url, "POST", cancel)[0] == 409

    tokened = srv_serve(store, token="tok")
    headers = {"Host": "pyoco.internal", "Authorization": "Bearer tok"}
    assert srv_request(tokened.url, "POST", cancel, headers=headers)[0] == 409

    monkeypatch.setenv("PYOCO_ALLOWED_HOSTS", "*")
    anyhost = srv_serve(store)
    for host in ("other.example", "127.0.0.1.attacker.example:%d" % anyhost.port):
        assert srv_request(anyhost.url, "GET", "/runs", headers={"Host": host})[0] == 200


def test_request_without_a_host_header_is_served_only_from_loopback(tmp_path, srv_serve):
    server = srv_serve(tmp_path / "store")
    answer = srv_raw(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
    # No client beyond loopback can be made here, so the router is asked directly
    # what it answers to one: the same call the request handler makes.
    no_host = http.client.parse_headers(io.BytesIO(b"\r\n"))
    assert server.route("GET", "/healthz", "", b"", "127.0.0.1", no_host)[0] == 200
    with pytest.raises(pyoco.HTTPError) as refused:
        server.route("GET", "/healthz", "", b"", "192.0.2.7", no_host)
    assert refused.value.status == 403 and "Host" in refused.value.message
    two_hosts = srv_raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                     b"Host: evil.example\r\nConnection: close\r\n\r\n")
    assert two_hosts.startswith(b"HTTP/1.1 400 "), two_hosts[:80]


@pytest.mark.parametrize("header, value, allowed", [
    ("Origin", "http://evil.example", False),
    ("Origin", "null", False),
    ("Origin", "https://127.0.0.1:{port}", False),
    ("Origin", "http://127.0.0.1:{port}", True),
    ("Referer", "http://evil.example/page", False),
    ("Referer", "http://127.0.0.1.attacker.example:{port}/", False),
    ("Referer", "http://127.0.0.1:{port}/runs/x/view", True),
])
def test_writes_from_a_browser_page_must_come_from_the_servers_own_origin(
        srv_outcomes, header, value, allowed):
    server, runs = srv_outcomes
    headers = {header: value.format(port=server.port)}
    status, body = srv_json(server.url, "POST", "/runs/%s/cancel" % runs["weird"].run_id,
                            headers=headers)
    assert status == (409 if allowed else 403), body      # 409: allowed, the run is over


def test_post_addressed_to_a_foreign_host_name_is_refused_without_a_token(tmp_path):
    server = pyoco.Server(tmp_path, port=0).start()
    try:
        status, _, body = srv_request(server.url, "POST", "/runs", {"flow": "x"},
                                      headers={"Host": "rebound.example:%d" % server.port})
        assert status == 403 and b"localhost" in body
        status, _, _ = srv_request(server.url, "POST", "/runs", {"flow": "x"})
        assert status == 404            # addressed to 127.0.0.1: allowed, the flow is unknown
    finally:
        server.close()


def test_cut_short_body_is_408_and_a_body_on_delete_does_not_desync(tmp_path):
    server = pyoco.Server(tmp_path, port=0).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(b"DELETE /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                         b"\r\nXXXXXGET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = srv_read(sock, answers=2)
        assert answer.startswith(b"HTTP/1.1 405")
        assert b"HTTP/1.1 200" in answer
        server.httpd.RequestHandlerClass.timeout = 0.5
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(b"POST /runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n"
                         b"\r\n{\"flow\"")
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    finally:
        server.close()


# ---------------------------------------------------------------------------
# Robustness: concurrent clients, half-sent requests, idle connections, junk
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv_big_store(tmp_path_factory):
    """A store with 200 finished runs."""
    store = tmp_path_factory.mktemp("big") / "store"

    one = task(name="one")(lambda ctx: 1)
    two = task(name="two")(lambda ctx, one: one + 1)
    flow = Flow("bulk")
    flow >> one >> two
    with no_pyoco_env():
        engine = quiet(store=str(store))
        for _ in range(200):
            engine.run(flow)
    return store


def test_metrics_answer_16_concurrent_clients_with_200_runs(srv_big_store, srv_serve):
    server = srv_serve(srv_big_store)
    statuses, failures = [], []
    lock = threading.Lock()
    go = threading.Event()

    def client():
        go.wait(WAIT)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            for _ in range(50):
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read()
                with lock:
                    statuses.append(response.status)
                    if b'pyoco_runs_total{flow="bulk",status="COMPLETED"} 200\n' not in body:
                        failures.append(body[:200])
        except Exception as exc:        # reported by the assertion below
            with lock:
                failures.append(repr(exc))
        finally:
            conn.close()

    clients = [threading.Thread(target=client) for _ in range(16)]
    for c in clients:
        c.start()
    go.set()
    for c in clients:
        c.join(60)
    assert failures == []
    assert statuses == [200] * 800


def test_runs_default_limit_is_50_and_limit_reaches_1000(srv_big_store, srv_serve):
    server = srv_serve(srv_big_store)
    assert len(srv_json(server.url, "GET", "/runs")[1]) == 50
    listed = srv_json(server.url, "GET", "/runs?limit=1000")[1]
    assert len(listed) == 200
    starts = [r["started_at"] for r in listed]
    assert starts == sorted(starts, reverse=True)


def test_half_sent_and_idle_connections_do_not_block_other_clients(tmp_path, srv_serve):
    server = srv_serve(tmp_path / "store")
    half = socket.create_connection(("127.0.0.1", server.port))
    idle = socket.create_connection(("127.0.0.1", server.port))
    try:
        half.sendall(b"GET /metr")
        for _ in range(3):
            began = time.monotonic()
            status, _, _ = srv_request(server.url, "GET", "/healthz")
            assert status == 200
            assert time.monotonic() - began < 5.0   # not the 10 s idle timeout
        half.sendall(b"ics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        half.settimeout(WAIT)
        answer = srv_read(half)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"pyoco_store_runs 0" in answer
    finally:
        half.close()
        idle.close()


def srv_read(sock, answers=None):
    """What the server sends on ``sock``: until it closes, or until ``answers``
    status lines came."""
    data = b""
    while answers is None or data.count(b"HTTP/1.") < answers:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def srv_raw(port, data, timeout=WAIT):
    """Send raw bytes, read until the server closes; returns the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return srv_read(s)


SRV_JUNK = [b"GARBAGE\r\n\r\n", b"GET /metrics HTTP/1.1 extra\r\n\r\n", b"GET\r\n\r\n",
            b"GET /metrics FOO/1.1\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\r\n\r\n"]


@pytest.mark.parametrize("junk", SRV_JUNK)
def test_malformed_request_is_answered_and_the_server_keeps_answering(tmp_path, srv_serve,
                                                                      junk):
    server = srv_serve(tmp_path / "store")
    assert b"400" in srv_raw(server.port, junk)
    assert srv_request(server.url, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize("junk", SRV_JUNK[:2])
def test_malformed_request_line_gets_a_400_status_line_and_json_error(tmp_path, srv_serve,
                                                                      junk):
    server = srv_serve(tmp_path / "store")
    answer = srv_raw(server.port, junk)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 400 ", head), answer[:80]
    assert b"Content-Type: application/json" in head
    assert set(json.loads(body)) == {"error"}


@pytest.mark.parametrize("length", [b"1_0", b"+10", b"-1", b"0x10", b"\r\n 10", b"1 0",
                                    b"10\r\nContent-Length: 10", b"", b"\xb9\xb0"])
def test_content_length_that_is_not_plain_ascii_digits_is_400(tmp_path, srv_serve, length):
    server = srv_serve(tmp_path / "store")
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %s\r\n\r\n"
    answer = srv_raw(server.port, head % length + b"0123456789")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert set(json.loads(answer.partition(b"\r\n\r\n")[2])) == {"error"}
    plain = srv_raw(server.port, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
                    % b"10" + b"0123456789")
    assert plain.startswith(b"HTTP/1.1 200 "), plain[:200]


def test_request_body_over_1_mib_is_413_without_reading_it(tmp_path, srv_serve):
    server = srv_serve(tmp_path / "store", flows={})
    answer = srv_raw(server.port, b"POST /runs HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 2000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'{"error": ' in answer
    assert srv_request(server.url, "GET", "/healthz")[0] == 200


# ---------------------------------------------------------------------------
# pyoco serve's scheduler: an injected clock on a real Server, real HTTP
# ---------------------------------------------------------------------------

class SchClock:
    """The scheduler's clock, moved by the test. ``wait`` returns when the time
    moves (or the scheduler stops); ``move_to`` returns once the scheduler has
    looked at the new time and waits again, so nothing waits for real minutes."""

    def __init__(self, now):
        self.t = self.read = now
        self.idle_at = None         # the time the scheduler is waiting at, if it waits
        self.cond = threading.Condition()

    def now(self):
        with self.cond:
            self.read = self.t
            return self.t

    def wait(self, seconds, stop):
        with self.cond:
            if self.read != self.t:         # moved since the scheduler looked: look again
                return
            self.idle_at = self.t
            self.cond.notify_all()
            while self.t == self.idle_at and not stop.is_set():
                self.cond.wait(0.05)        # also notices stop, which sets no condition
            self.idle_at = None

    def set(self, t):
        with self.cond:
            self.t = t
            self.cond.notify_all()

    def settled(self):
        with self.cond:
            assert self.cond.wait_for(lambda: self.idle_at == self.t, WAIT), \
                "the scheduler did not come back to waiting at %s" % sch_iso(self.t)


def sch_move(clocks, when):
    """Move every clock to ``when`` at once, then wait until each scheduler is idle."""
    for clock in clocks:
        clock.set(sch_ts(when))
    for clock in clocks:
        clock.settled()


def sch_scheduled(store, flow=None):
    """The scheduled_for of every run in the store (of ``flow``), oldest first."""
    records = RunStore(store).list(flow=flow)
    return sorted(r["scheduled_for"] for r in records if r["scheduled_for"])


def sch_wait_runs(store, expected, flow=None):
    """Wait until the store's scheduled runs are ``expected`` (ISO minutes) and all finished."""
    def reached():
        records = RunStore(store).list(flow=flow)
        done = all(r["status"] == "COMPLETED" for r in records)
        return done and sorted(r["scheduled_for"] for r in records) == expected and [records]
    return wait_until(reached, what="scheduled runs %s" % expected)[0]


def sch_server(srv_serve, store, flows, now, **options):
    clock = SchClock(sch_ts(now))
    server = srv_serve(store, flows={f.name: f for f in flows}, clock=clock,
                       engine=quiet(store=str(store)), **options)
    clock.settled()
    return server, clock


def sch_quick_flow(name="every5", schedule="*/5 * * * *", **options):
    @task(name="work_" + name)
    def work(ctx):
        return ctx.run_id

    flow = Flow(name, schedule=schedule, schedule_tz="UTC", **options)
    flow >> work
    return flow


def test_scheduled_runs_start_at_their_times_with_scheduled_for(tmp_path, srv_serve):
    store = tmp_path / "store"
    server, clock = sch_server(srv_serve, store, [sch_quick_flow()], "2026-12-01T10:02Z")
    samples = srv_metrics(server.url)[2]
    assert srv_value(samples, "pyoco_schedule_next_run_timestamp_seconds",
                     flow="every5") == sch_ts("2026-12-01T10:05Z")
    assert srv_value(samples, "pyoco_schedule_skipped_total", flow="every5") == 0
    assert sch_scheduled(store) == []
    sch_move([clock], "2026-12-01T10:05Z")
    sch_wait_runs(store, ["2026-12-01T10:05:00.000Z"])
    sch_move([clock], "2026-12-01T10:09:59Z")           # not yet
    sch_move([clock], "2026-12-01T10:10:30Z")
    sch_wait_runs(store, ["2026-12-01T10:05:00.000Z", "2026-12-01T10:10:00.000Z"])
    sch_move([clock], "2026-12-01T10:31Z")              # asleep for four times: one run, the latest
    records = sch_wait_runs(store, ["2026-12-01T10:05:00.000Z", "2026-12-01T10:10:00.000Z",
                                    "2026-12-01T10:30:00.000Z"])
    assert all(r["params"] == {} for r in records)
    status, full = srv_json(server.url, "GET", "/runs/" + records[0]["run_id"])
    assert status == 200 and set(full) == RUN_KEYS
    assert full["tasks"]["work_every5"]["state"] == "SUCCEEDED"
    samples = srv_metrics(server.url)[2]
    assert srv_value(samples, "pyoco_schedule_next_run_timestamp_seconds",
                     flow="every5") == sch_ts("2026-12-01T10:35Z")
    wait_until(lambda: srv_value(srv_metrics(server.url)[2], "pyoco_runs_total", flow="every5",
                               status="COMPLETED") == 3, what="three runs in /metrics")


def sch_blocking_flow(release, overlap):
    @task
    def hold(ctx):
        release.wait(WAIT)

    flow = Flow("held", schedule="every 1m", schedule_overlap=overlap)
    flow >> hold
    return flow


@pytest.mark.parametrize("overlap, expected, skipped", [
    ("skip", ["10:01", "10:03"], 1),
    ("allow", ["10:01", "10:02", "10:03"], 0),
])
def test_scheduled_time_is_skipped_while_the_flow_still_runs(tmp_path, srv_serve, capsys,
                                                             overlap, expected, skipped):
    store = tmp_path / "store"
    release = threading.Event()
    server, clock = sch_server(srv_serve, store, [sch_blocking_flow(release, overlap)],
                               "2026-12-01T10:00:30Z")
    sch_move([clock], "2026-12-01T10:01Z")
    first = wait_until(lambda: RunStore(store).list(status="RUNNING"), what="the first run")
    sch_move([clock], "2026-12-01T10:02Z")
    samples = srv_metrics(server.url)[2]
    assert srv_value(samples, "pyoco_schedule_skipped_total", flow="held") == skipped
    err = capsys.readouterr().err
    skip_lines = [line for line in err.splitlines() if "skip" in line]
    if skipped:
        assert skip_lines == ["pyoco serve: skip flow 'held' at 2026-12-01T10:02:00.000Z: run"
                              " %s is still RUNNING" % first[0]["run_id"]]
    else:
        assert skip_lines == []
    release.set()
    wait_until(lambda: not RunStore(store).list(status="RUNNING"), what="the runs to end")
    sch_move([clock], "2026-12-01T10:03Z")
    sch_wait_runs(store, ["2026-12-01T%s:00.000Z" % hm for hm in expected])


def sch_history(store, flow, when):
    """A finished scheduled run of ``flow`` for time ``when``, as a previous server made it."""
    quiet(store=str(store)).run(flow, scheduled_for=sch_ts(when))


@pytest.mark.parametrize("catchup, history, expected", [
    ("latest", "2026-12-01T09:00Z", ["2026-12-01T09:00:00.000Z", "2026-12-01T12:00:00.000Z"]),
    ("none", "2026-12-01T09:00Z", ["2026-12-01T09:00:00.000Z"]),
    ("latest", None, []),                   # never scheduled here yet: nothing was missed
    ("latest", "2026-12-01T12:00Z", ["2026-12-01T12:00:00.000Z"]),     # nothing missed since
])
def test_catch_up_runs_the_latest_missed_time_once_at_start(tmp_path, srv_serve, catchup,
                                                            history, expected):
    store = tmp_path / "store"
    flow = sch_quick_flow("hourly", "@hourly", schedule_catchup=catchup)
    if history:
        sch_history(store, flow, history)
    server, clock = sch_server(srv_serve, store, [flow], "2026-12-01T12:30Z")
    sch_wait_runs(store, expected)
    sch_move([clock], "2026-12-01T12:59Z")
    assert sch_scheduled(store) == expected
    sch_move([clock], "2026-12-01T13:00Z")
    sch_wait_runs(store, expected + ["2026-12-01T13:00:00.000Z"])


def test_two_servers_on_one_store_start_each_time_once(tmp_path, srv_serve):
    # Two Server objects rather than two processes: their clocks must be injected
    # to go through several times at once, and they share only the store's files,
    # as two processes do. A claim left by a server that died costs only its time.
    store = tmp_path / "store"
    flow = sch_quick_flow("shared", "every 1m")
    claims = store / "schedule" / "shared"
    claims.mkdir(parents=True)
    (claims / ("%d.claim" % sch_ts("2026-12-01T10:03Z"))).write_text("{}")
    servers = [sch_server(srv_serve, store, [flow], "2026-12-01T10:00:30Z") for _ in range(2)]
    clocks = [clock for _, clock in servers]
    expected = []
    for minute in range(1, 6):
        sch_move(clocks, "2026-12-01T10:%02d:00Z" % minute)
        if minute != 3:
            expected.append("2026-12-01T10:%02d:00.000Z" % minute)
        sch_wait_runs(store, expected)
    assert len(RunStore(store).ids()) == 4          # the claims are not runs to any reader
    listing = cli(tmp_path, "runs", "list", "--store", store, "--json")
    assert listing.returncode == 0 and len(json.loads(listing.stdout)) == 4
    assert sorted(os.listdir(claims)) == sorted("%d.claim" % sch_ts("2026-12-01T10:%02dZ" % m)
                                                for m in range(1, 6))


def test_server_close_stops_the_scheduler(tmp_path):
    store = tmp_path / "store"
    clock = SchClock(sch_ts("2026-12-01T10:02Z"))
    server = pyoco.Server(str(store), port=0, flows={"every5": sch_quick_flow()}, clock=clock,
                          engine=quiet(store=str(store))).start()
    clock.settled()
    thread = server.timetable.thread
    server.close()
    assert not thread.is_alive()
    clock.set(sch_ts("2026-12-01T10:05Z"))
    assert sch_scheduled(store) == []


def test_unscheduled_flows_start_no_scheduler(tmp_path, srv_serve):
    server = srv_serve(tmp_path / "store", flows={"plain": Flow("plain")})
    assert server.timetable is None
    assert "pyoco_schedule" not in srv_metrics(server.url)[1]


SCH_HELD_FLOW = '''\
from pyoco import task, Flow

@task
def hold(ctx):
    ctx.cancelled.wait(30)

flow = Flow("held", schedule="every 1s")
flow >> hold
'''


def test_pyoco_serve_starts_scheduled_runs_and_ctrl_c_cancels_them(tmp_path, srv_cli_serve):
    # Real time, but only a second: "every 1s" starts one run; the next
    # times are skipped while it runs; SIGTERM (Ctrl+C's path) cancels it.
    store = tmp_path / "store"
    flow_file = srv_flow_file(tmp_path, "held", SCH_HELD_FLOW)
    server = srv_cli_serve(store, flow_file)
    record = wait_until(lambda: RunStore(store).list(status="RUNNING"), what="a scheduled run")[0]
    assert ISO.match(record["scheduled_for"])
    assert record["scheduled_for"].endswith(".000Z")
    server.wait_for(r"pyoco serve: skip flow 'held' at ", stream="stderr")
    assert "pyoco serve: flow 'held' runs at 'every 1s' (UTC); next at " in server.text("stderr")
    assert server.stop() == 0
    final = RunStore(store).get(record["run_id"])
    assert final["status"] == "CANCELLED"
    assert final["scheduled_for"] == record["scheduled_for"]
    assert [r["run_id"] for r in RunStore(store).list()] == [record["run_id"]]


def test_pyoco_serve_no_schedule_starts_no_scheduled_runs(tmp_path, srv_cli_serve):
    store = tmp_path / "store"
    flow_file = srv_flow_file(tmp_path, "held", SCH_HELD_FLOW.replace(
        "ctx.cancelled.wait(30)", "return 1"))
    server = srv_cli_serve(store, flow_file, options=["--no-schedule"])
    server.wait_for(r"not scheduled here \(--no-schedule\)", stream="stderr")
    status, flows = srv_json(server.url, "GET", "/flows")
    assert status == 200
    assert [(f["flow"], f["schedule"], f["next_run_at"]) for f in flows] == [
        ("held", "every 1s", None)]
    assert "pyoco_schedule" not in srv_metrics(server.url)[1]
    status, body = srv_json(server.url, "POST", "/runs", {"flow": "held"})     # by hand still
    assert status == 202
    record = srv_wait_status(server, body["run_id"], "COMPLETED")
    assert record["scheduled_for"] is None
    assert server.stop() == 0
    assert [r["run_id"] for r in RunStore(store).list()] == [body["run_id"]]
    assert not (store / "schedule").exists()


# ---------------------------------------------------------------------------
# GET /flows: the loaded flows, their schedules and last runs
# ---------------------------------------------------------------------------

SCH_FLOWS_KEYS = {"flow", "file", "schedule", "next_run_at", "last_run"}


def test_get_flows_lists_loaded_flows_with_schedule_next_time_and_last_run(tmp_path,
                                                                           srv_cli_serve):
    store = tmp_path / "store"
    yearly = srv_flow_file(tmp_path, "yearly", SCH_FLOW.replace("ticker", "yearly")
                           % "0 3 1 jan *")
    greet = srv_flow_file(tmp_path)
    server = srv_cli_serve(store, yearly, greet)
    status, flows = srv_json(server.url, "GET", "/flows")
    assert status == 200
    assert [set(f) for f in flows] == [SCH_FLOWS_KEYS, SCH_FLOWS_KEYS]
    assert flows[0] == {"flow": "yearly", "file": str(yearly), "schedule": "0 3 1 jan *",
                        "next_run_at": "%d-01-01T03:00:00.000Z" % (time.gmtime().tm_year + 1),
                        "last_run": None}
    assert flows[1] == {"flow": "greet", "file": str(greet), "schedule": None,
                        "next_run_at": None, "last_run": None}
    samples = srv_metrics(server.url)[2]
    assert srv_value(samples, "pyoco_schedule_next_run_timestamp_seconds",
                     flow="yearly") == sch_ts(flows[0]["next_run_at"][:16] + "Z")
    assert srv_value(samples, "pyoco_schedule_next_run_timestamp_seconds", flow="greet") is None
    _, body = srv_json(server.url, "POST", "/runs", {"flow": "greet", "params": {"who": "flows"}})
    srv_wait_status(server, body["run_id"], "COMPLETED")

    def last_run():
        last = srv_json(server.url, "GET", "/flows")[1][1]["last_run"]
        return last and last["status"] == "COMPLETED" and last
    last = wait_until(last_run, what="greet's last run")
    assert last["run_id"] == body["run_id"] and "events" not in last
    assert set(last) == RUN_KEYS - {"events"}
    assert srv_request(server.url, "GET", "/flows?x=1")[0] == 400
    assert srv_request(server.url, "POST", "/flows")[0] == 405


# ===========================================================================
# Plugins
# ===========================================================================


PLUG_DEMO_DIR = HERE / "examples" / "pyoco-plugin-demo"
PLUG_DEMO_FLOW = HERE / "examples" / "plugin_flow.py"
PLUG_DEMO_TASKS = ("reverse", "shout", "word_count")
PLUG_TRACEBACK = "Traceback (most recent call last)"


# ---------------------------------------------------------------------------
# Helpers: throwaway distributions
# ---------------------------------------------------------------------------

def plug_python(args, folders, cwd, site=False, timeout=60, **extra):
    """`python [-S] ARGS` with the plugin folders on PYTHONPATH, runs recorded
    in a store of ``cwd`` and the plain trace; the CompletedProcess."""
    env = child_env(*folders, PYOCO_HOME=str(Path(cwd) / ".store"), PYOCO_CUTE="0", **extra)
    return run_python(cwd, *([] if site else ["-S"]), *args, env=env, timeout=timeout)


def plug_cli(folders, cwd, *args, **kwargs):
    """`python -S -m pyoco ARGS`."""
    return plug_python(["-m", "pyoco"] + list(args), folders, cwd, **kwargs)


def plug_json(proc):
    """stdout parsed as JSON; fails the test (showing both streams) when it is not JSON."""
    try:
        return json.loads(proc.stdout)
    except ValueError as exc:
        pytest.fail("stdout is not valid JSON (%s)\nstdout:\n%s\nstderr:\n%s"
                    % (exc, proc.stdout, proc.stderr))


def plug_make_dist(folder, name, packages, entry_points, version="1.0"):
    """Write an installed distribution into ``folder`` without pip.

    ``packages``: package name -> source of its __init__.py; ``entry_points``:
    entry-point name -> "module:attr" in the group pyoco.tasks.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for package, source in packages.items():
        (folder / package).mkdir()
        write(folder / package / "__init__.py", source)
    info = folder / ("%s-%s.dist-info" % (name, version))
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: %s\nVersion: %s\n"
                                   % (name, version), encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[pyoco.tasks]\n" + "".join("%s = %s\n" % item for item in entry_points.items()),
        encoding="utf-8")
    return folder


PLUG_TRIVIAL_FLOW = hello_flow("trivial", "hello from a flow without plugins")


def plug_using_flow(plugin, **options):
    """Source of a flow file whose one node is plugin_task(plugin, **options)."""
    return """\
    import pyoco
    from pyoco import Flow

    node = pyoco.plugin_task(%r, **%r)
    flow = Flow(name="uses_plugin")
    flow >> node
""" % (plugin, options)


# ---------------------------------------------------------------------------
# Fixtures: the demo plugin installed with pip, throwaway broken plugins
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def plug_demo_target(tmp_path_factory):
    """The demo distribution pip-installed (offline, in-tree backend) into a temporary target."""
    check = subprocess.run([sys.executable, "-m", "pip", "--version"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check.returncode != 0:
        pytest.skip("pip is not available for %s" % sys.executable)
    target = tmp_path_factory.mktemp("plug_demo_target")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
         str(target), str(PLUG_DEMO_DIR)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env,
        timeout=120)
    assert proc.returncode == 0, "pip install of the demo failed:\n%s\n%s" % (proc.stdout,
                                                                              proc.stderr)
    return target


@pytest.fixture
def plug_cwd(tmp_path):
    """A working folder holding a trivial flow file that uses no plugin."""
    write(Path(tmp_path) / "trivial.py", PLUG_TRIVIAL_FLOW)
    return tmp_path


PLUG_BROKEN_IMPORT = """\
    import os
    marker = os.environ.get("PLUG_IMPORT_MARKER")
    if marker:
        open(marker, "a").close()
    raise ImportError("plug_missing_dependency_zzz is not installed")
"""

# Every broken case: its distributions (name, packages, entry points), the
# entry-point/task name lint must report, the level and a text its message
# holds; load_problem: it fails to load (or loads with a warning), so even
# `plugins list` reports it on stderr.
PLUG_BROKEN_CASES = {
    "import_error": dict(
        dists=[("plug_import_error", {"plug_imperr": PLUG_BROKEN_IMPORT},
                {"imperr": "plug_imperr:Upload"})],
        plugin="imperr", load_problem=True, level="error", text="plug_missing_dependency_zzz"),
    "not_a_task_int": dict(
        dists=[("plug_int", {"plug_intmod": "VALUE = 42\n"}, {"intval": "plug_intmod:VALUE"})],
        plugin="intval", load_problem=True, level="error", text="int"),
    "plain_function": dict(
        dists=[("plug_func", {"plug_funcmod": '''\
            def double(ctx, x=1):
                """Double a number."""
                return 2 * x
        '''}, {"double": "plug_funcmod:double"})],
        plugin="double", load_problem=True, level="warning", text="Task subclass"),
    "no_docstring": dict(
        dists=[("plug_nodoc", {"plug_nodocmod": '''\
            import pyoco

            class NoDoc(pyoco.Task):
                def run(self, ctx, x=1):
                    return x
        '''}, {"nodoc": "plug_nodocmod:NoDoc"})],
        plugin="nodoc", level="warning", text="no description"),
    "star_args": dict(
        dists=[("plug_star", {"plug_starmod": '''\
            import pyoco

            class Star(pyoco.Task):
                """Take anything positionally."""
                def run(self, ctx, *args):
                    return args
        '''}, {"star": "plug_starmod:Star"})],
        plugin="star", level="error", text="*args"),
    "duplicate_name": dict(
        dists=[("plug_dup_a", {"plug_dupa": '''\
                    import pyoco

                    class Same(pyoco.Task):
                        """The one from A."""
                        def run(self, ctx):
                            return "a"
                '''}, {"same": "plug_dupa:Same"}),
               ("plug_dup_b", {"plug_dupb": '''\
                    import pyoco

                    class Same(pyoco.Task):
                        """The one from B."""
                        def run(self, ctx):
                            return "b"
                '''}, {"same": "plug_dupb:Same"})],
        plugin="same", load_problem=True, level="error", text="plug_dup_"),
    # the other problems docs/plugins.md names
    "non_task_class": dict(
        dists=[("plug_klass", {"plug_klassmod": '''\
            class Helper:
                """Not a task at all."""
                def __init__(self, x):
                    self.x = x
        '''}, {"helper": "plug_klassmod:Helper"})],
        plugin="helper", load_problem=True, level="error", text="type"),
    "no_run_method": dict(
        dists=[("plug_norun", {"plug_norunmod": '''\
            import pyoco

            class NoRun(pyoco.Task):
                """Forgot to implement run."""
        '''}, {"norun": "plug_norunmod:NoRun"})],
        plugin="norun", level="error", text="run"),
    "run_without_ctx": dict(
        dists=[("plug_noctx", {"plug_noctxmod": '''\
            import pyoco

            class NoCtx(pyoco.Task):
                """Forgot ctx."""
                def run(self, text):
                    return text
        '''}, {"noctx": "plug_noctxmod:NoCtx"})],
        plugin="noctx", level="warning", text="ctx"),
    "hook_raises": dict(
        dists=[("plug_hookfail", {"plug_hookmod": '''\
            import pyoco

            class Early(pyoco.Task):
                """Added before the hook fails."""
                name = "early"
                def run(self, ctx):
                    return "early"

            def register(registry):
                registry.add(Early)
                raise RuntimeError("plug hook exploded")
        '''}, {"hooky": "plug_hookmod:register"})],
        plugin="hooky", load_problem=True, level="error", text="plug hook exploded"),
    "system_exit_at_import": dict(
        dists=[("plug_exit", {"plug_exitmod": "import sys\nsys.exit(3)\n"},
                {"exits": "plug_exitmod:Task"})],
        plugin="exits", load_problem=True, level="error", text="SystemExit"),
}


@pytest.fixture(scope="session")
def plug_broken_folders(tmp_path_factory):
    """Case name -> a folder on which that case's distributions are installed."""
    folders = {}
    for case, spec in PLUG_BROKEN_CASES.items():
        folder = tmp_path_factory.mktemp("plug_broken_" + case)
        for name, packages, entry_points in spec["dists"]:
            plug_make_dist(folder, name, packages, entry_points)
        folders[case] = folder
    return folders


def plug_parallel(jobs):
    """Run {key: function} on a few threads (each function waits on a subprocess)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


# What every broken case is run with, once per session, by plug_broken_results.
PLUG_BROKEN_COMMANDS = (("plugins", "list"), ("plugins", "list", "--json"),
                        ("plugins", "lint"), ("plugins", "lint", "--json"),
                        ("run", "trivial.py"))


@pytest.fixture(scope="session")
def plug_broken_results(plug_broken_folders, tmp_path_factory):
    """(case, command) -> `pyoco COMMAND` with only that case installed, run in parallel."""
    jobs = {}
    for case, folder in plug_broken_folders.items():
        cwd = tmp_path_factory.mktemp("plug_cwd_" + case)
        write(Path(cwd) / "trivial.py", PLUG_TRIVIAL_FLOW)
        for args in PLUG_BROKEN_COMMANDS:
            jobs[case, args] = (lambda folder=folder, cwd=cwd, args=args:
                                plug_cli([folder], cwd, *args))
    return plug_parallel(jobs)


@pytest.fixture(params=sorted(PLUG_BROKEN_CASES))
def plug_broken(request, plug_broken_results):
    """(case name, its spec, a function giving `pyoco ARGS` with only that case installed)."""
    case = request.param
    return case, PLUG_BROKEN_CASES[case], lambda *args: plug_broken_results[case, args]


@pytest.fixture
def plug_demo_in_process(plug_demo_target):
    """The demo plugin visible to this interpreter; sys.path and the registry restored after."""
    old_path = list(sys.path)
    sys.path.insert(0, str(plug_demo_target))
    pyoco.load_plugins(refresh=True)
    try:
        yield plug_demo_target
    finally:
        sys.path[:] = old_path
        for module in [m for m in sys.modules if m.split(".")[0] in ("pyoco_plugin_demo",
                                                                     "plug_flakymod")]:
            del sys.modules[module]
        pyoco.load_plugins(refresh=True)


# ---------------------------------------------------------------------------
# The demo plugin, pip-installed: plugins list, lint, the example flow
# ---------------------------------------------------------------------------

def test_pip_installs_the_demo_offline_as_a_distribution_with_dist_info(plug_demo_target):
    assert (plug_demo_target / "pyoco_plugin_demo" / "__init__.py").is_file()
    infos = list(plug_demo_target.glob("*.dist-info"))
    assert len(infos) == 1
    entry_points = (infos[0] / "entry_points.txt").read_text(encoding="utf-8")
    assert "[pyoco.tasks]" in entry_points and "shout" in entry_points


def test_plugins_list_json_shows_shout_as_a_task_of_the_demo_with_docstring_summary(
        plug_demo_target, tmp_path):
    proc = plug_cli([plug_demo_target], tmp_path, "plugins", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in plug_json(proc)}
    shout = rows["shout"]
    assert shout["kind"] == "task"
    assert shout["distribution"] == "pyoco-plugin-demo"
    assert shout["version"] == "1.0.0"
    assert shout["summary"] == "Upper-case a text and add some excitement."


def test_plugins_list_json_shows_hook_tasks_under_the_hooks_distribution(plug_demo_target,
                                                                         tmp_path):
    proc = plug_cli([plug_demo_target], tmp_path, "plugins", "list", "--json")
    rows = plug_json(proc)
    assert sorted(row["name"] for row in rows) == sorted(PLUG_DEMO_TASKS)
    by_name = {row["name"]: row for row in rows}
    for name, summary in (("word_count", "Count the words of a text."),
                          ("reverse", "Reverse a text, character by character.")):
        assert by_name[name]["distribution"] == "pyoco-plugin-demo"
        assert by_name[name]["version"] == "1.0.0"
        assert by_name[name]["kind"] == "task"
        assert by_name[name]["summary"] == summary
    assert proc.stderr == ""            # a healthy plugin: nothing to warn about


def test_plugins_list_table_has_a_header_and_one_row_per_demo_task(plug_demo_target, tmp_path):
    proc = plug_cli([plug_demo_target], tmp_path, "plugins", "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "KIND", "SUMMARY"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == sorted(PLUG_DEMO_TASKS)
    assert rows["shout"].split()[1:4] == ["pyoco-plugin-demo", "1.0.0", "task"]
    assert rows["shout"].endswith("Upper-case a text and add some excitement.")


def test_plugins_lint_exits_0_with_the_demo_alone(plug_demo_target, tmp_path):
    proc = plug_cli([plug_demo_target], tmp_path, "plugins", "lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok")
    assert "3" in proc.stdout                # "ok: 3 plugin tasks, no problems"
    json_proc = plug_cli([plug_demo_target], tmp_path, "plugins", "lint", "--json")
    assert json_proc.returncode == 0
    assert plug_json(json_proc) == []


def test_example_plugin_flow_runs_and_prints_shouted_text_with_word_count(plug_demo_target,
                                                                          tmp_path):
    proc = plug_cli([plug_demo_target], tmp_path, "run", str(PLUG_DEMO_FLOW), "-p", "text=a b c")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "A B C!!! (3 words)" in proc.stdout


def test_python_pyoco_py_is_the_same_program_for_plugins(plug_demo_target, tmp_path):
    script = str(HERE / "pyoco.py")
    listing = plug_python([script, "plugins", "list", "--json"], [plug_demo_target], tmp_path)
    assert listing.returncode == 0, listing.stderr
    kinds = {row["name"]: row["kind"] for row in plug_json(listing)}
    assert kinds == {name: "task" for name in PLUG_DEMO_TASKS}    # Task subclasses recognised
    run = plug_python([script, "run", str(PLUG_DEMO_FLOW), "-p", "text=q r s t"],
                      [plug_demo_target], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Q R S T!!! (4 words)" in run.stdout


def test_check_and_graph_of_the_example_flow_see_the_plugin_nodes(plug_demo_target, tmp_path):
    check = plug_cli([plug_demo_target], tmp_path, "check", str(PLUG_DEMO_FLOW), "--json")
    assert check.returncode == 0, check.stderr
    result = plug_json(check)
    assert result["ok"] is True
    assert sorted(result["tasks"]) == ["count", "report", "shout", "text"]
    graph = plug_cli([plug_demo_target], tmp_path, "graph", str(PLUG_DEMO_FLOW))
    assert graph.returncode == 0, graph.stderr
    assert "shout <- text" in graph.stdout and "count <- text" in graph.stdout


def test_plugins_list_finds_the_demo_with_site_packages_enabled_too(plug_demo_target, tmp_path):
    proc = plug_cli([plug_demo_target], tmp_path, "plugins", "list", "--json", site=True)
    assert proc.returncode == 0, proc.stderr
    demo = [row for row in plug_json(proc) if row["distribution"] == "pyoco-plugin-demo"]
    assert sorted(row["name"] for row in demo) == sorted(PLUG_DEMO_TASKS)


def test_same_distribution_on_the_path_twice_is_not_a_duplicate(plug_demo_target, tmp_path):
    copy = tmp_path / "second_copy"
    shutil.copytree(str(plug_demo_target), str(copy))
    proc = plug_cli([plug_demo_target, copy], tmp_path, "plugins", "lint", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert plug_json(proc) == []
    run = plug_cli([plug_demo_target, copy], tmp_path, "run", str(PLUG_DEMO_FLOW), "-p", "text=x y")
    assert run.returncode == 0, run.stderr
    assert "X Y!!! (2 words)" in run.stdout


def test_no_plugins_installed_list_says_so_and_lint_is_ok(tmp_path):
    listing = plug_cli([], tmp_path, "plugins", "list")
    assert listing.returncode == 0
    assert "no plugin tasks installed" in listing.stdout
    assert plug_json(plug_cli([], tmp_path, "plugins", "list", "--json")) == []
    lint = plug_cli([], tmp_path, "plugins", "lint", "--json")
    assert lint.returncode == 0 and plug_json(lint) == []


def test_example_flow_without_the_demo_installed_is_a_usage_error_naming_the_plugin(tmp_path):
    proc = plug_cli([], tmp_path, "run", str(PLUG_DEMO_FLOW))
    assert proc.returncode == 2
    assert "'shout'" in proc.stderr
    assert "plugin_flow.py" in proc.stderr
    assert PLUG_TRACEBACK not in proc.stderr


def test_plugins_commands_reject_unknown_subcommands_with_exit_2(tmp_path):
    assert plug_cli([], tmp_path, "plugins").returncode == 2
    assert plug_cli([], tmp_path, "plugins", "frobnicate").returncode == 2


# ---------------------------------------------------------------------------
# Broken plugins: reported, never crash the CLI, never stop other flows
# ---------------------------------------------------------------------------

def test_broken_plugin_keeps_list_json_valid_on_stdout_with_warnings_on_stderr(plug_broken):
    case, spec, pyoco_cli = plug_broken
    proc = pyoco_cli("plugins", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = plug_json(proc)
    assert isinstance(rows, list)
    assert all(set(row) >= {"name", "distribution", "version", "kind", "summary"} for row in rows)
    if spec.get("load_problem"):
        assert proc.stderr.strip(), "a plugin that does not load must be reported on stderr"


def test_broken_plugin_lint_json_is_valid_and_exits_1(plug_broken):
    case, spec, pyoco_cli = plug_broken
    proc = pyoco_cli("plugins", "lint", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = plug_json(proc)
    assert all(set(f) >= {"level", "plugin", "distribution", "message"} for f in found)
    matching = [f for f in found if f["plugin"] == spec["plugin"]]
    assert matching, found
    assert any(f["level"] == spec["level"] and spec["text"] in f["message"] for f in matching), \
        matching


def test_broken_plugin_lint_text_output_exits_1_and_names_the_plugin(plug_broken):
    case, spec, pyoco_cli = plug_broken
    proc = pyoco_cli("plugins", "lint")
    assert proc.returncode == 1
    assert any(line.startswith(spec["level"] + ":") and spec["plugin"] in line
               for line in proc.stdout.splitlines()), proc.stdout


def test_broken_plugin_never_prints_a_traceback(plug_broken):
    case, spec, pyoco_cli = plug_broken
    for args in (("plugins", "list"), ("plugins", "list", "--json"), ("plugins", "lint"),
                 ("plugins", "lint", "--json"), ("run", "trivial.py")):
        proc = pyoco_cli(*args)
        assert PLUG_TRACEBACK not in proc.stderr, (args, proc.stderr)
        assert PLUG_TRACEBACK not in proc.stdout, (args, proc.stdout)


def test_broken_plugin_does_not_stop_a_flow_that_uses_no_plugin(plug_broken):
    case, spec, pyoco_cli = plug_broken
    proc = pyoco_cli("run", "trivial.py")
    assert proc.returncode == 0, proc.stderr
    assert "hello from a flow without plugins" in proc.stdout


def test_broken_plugin_does_not_stop_a_flow_using_a_healthy_plugin(plug_broken_folders,
                                                                  plug_demo_target, tmp_path):
    jobs = {}
    for case, folder in plug_broken_folders.items():
        cwd = tmp_path / case
        cwd.mkdir()
        jobs[case] = (lambda folder=folder, cwd=cwd: plug_cli(
            [folder, plug_demo_target], cwd, "run", str(PLUG_DEMO_FLOW), "-p", "text=one two"))
    for case, proc in sorted(plug_parallel(jobs).items()):
        assert proc.returncode == 0, (case, proc.stderr)
        assert "ONE TWO!!! (2 words)" in proc.stdout, case
        assert PLUG_TRACEBACK not in proc.stderr, case


def test_import_error_plugin_is_reported_with_its_distribution_and_the_error(
        plug_broken_folders, tmp_path):
    folder = plug_broken_folders["import_error"]
    listing = plug_cli([folder], tmp_path, "plugins", "list", "--json")
    assert plug_json(listing) == []
    assert "plug_import_error" in listing.stderr
    assert "ImportError" in listing.stderr and "plug_missing_dependency_zzz" in listing.stderr
    lint = plug_json(plug_cli([folder], tmp_path, "plugins", "lint", "--json"))
    assert lint == [{"level": "error", "plugin": "imperr", "distribution": "plug_import_error",
                     "message": lint[0]["message"]}]
    assert "plug_imperr:Upload" in lint[0]["message"]


def test_plugins_are_not_imported_by_a_run_of_a_flow_that_uses_none(plug_broken_folders,
                                                                   plug_cwd):
    folder = plug_broken_folders["import_error"]
    marker = plug_cwd / "plugin-was-imported"
    proc = plug_cli([folder], plug_cwd, "run", "trivial.py", PLUG_IMPORT_MARKER=str(marker))
    assert proc.returncode == 0
    assert not marker.exists()
    plug_cli([folder], plug_cwd, "plugins", "list", PLUG_IMPORT_MARKER=str(marker))
    assert marker.exists()              # the marker works: listing does import the plugin


def test_entry_point_naming_an_int_is_a_lint_error_saying_what_it_is(plug_broken_folders,
                                                                    tmp_path):
    folder = plug_broken_folders["not_a_task_int"]
    assert plug_json(plug_cli([folder], tmp_path, "plugins", "list", "--json")) == []
    (found,) = plug_json(plug_cli([folder], tmp_path, "plugins", "lint", "--json"))
    assert found["level"] == "error" and found["distribution"] == "plug_int"
    assert "plug_intmod:VALUE" in found["message"] and "int" in found["message"]
    assert "Task subclass" in found["message"]


def test_plain_function_plugin_is_listed_as_function_with_a_pluginwarning_on_stderr(
        plug_broken_folders, tmp_path):
    folder = plug_broken_folders["plain_function"]
    proc = plug_cli([folder], tmp_path, "plugins", "list", "--json")
    assert proc.returncode == 0
    (row,) = plug_json(proc)
    assert row["name"] == "double" and row["kind"] == "function"
    assert row["distribution"] == "plug_func" and row["version"] == "1.0"
    assert row["summary"] == "Double a number."
    assert "PluginWarning" in proc.stderr and "double" in proc.stderr


def test_plain_function_plugin_lint_warns_to_make_it_a_task_subclass_and_exits_1(
        plug_broken_folders, tmp_path):
    folder = plug_broken_folders["plain_function"]
    proc = plug_cli([folder], tmp_path, "plugins", "lint", "--json")
    assert proc.returncode == 1
    found = plug_json(proc)
    assert [f["level"] for f in found] == ["warning"]
    assert found[0]["plugin"] == "double" and "Task subclass" in found[0]["message"]


def test_plain_function_plugin_runs_in_a_flow(plug_broken_folders, tmp_path):
    folder = plug_broken_folders["plain_function"]
    write(Path(tmp_path) / "use.py", """\
        import pyoco

        double = pyoco.plugin_task("double", inputs={"x": 21})

        @pyoco.task
        def check(ctx, double):
            print("double gave", double)

        flow = pyoco.Flow(name="uses_function_plugin")
        flow >> double >> check
    """)
    proc = plug_cli([folder], tmp_path, "run", "use.py")
    assert proc.returncode == 0, proc.stderr
    assert "double gave 42" in proc.stdout


def test_task_without_docstring_is_listed_without_summary_and_lint_warns_no_description(
        plug_broken_folders, tmp_path):
    folder = plug_broken_folders["no_docstring"]
    (row,) = plug_json(plug_cli([folder], tmp_path, "plugins", "list", "--json"))
    assert row["name"] == "nodoc" and row["summary"] is None
    lint = plug_cli([folder], tmp_path, "plugins", "lint", "--json")
    assert lint.returncode == 1
    (found,) = plug_json(lint)
    assert found["level"] == "warning" and found["plugin"] == "nodoc"
    assert "no description" in found["message"]


def test_run_taking_star_args_is_a_lint_error(plug_broken_folders, tmp_path):
    folder = plug_broken_folders["star_args"]
    lint = plug_cli([folder], tmp_path, "plugins", "lint", "--json")
    assert lint.returncode == 1
    (found,) = plug_json(lint)
    assert found["level"] == "error" and found["plugin"] == "star"
    assert "*args" in found["message"]


def test_hook_that_raises_keeps_the_tasks_it_added_and_reports_the_error(plug_broken_folders,
                                                                        tmp_path):
    folder = plug_broken_folders["hook_raises"]
    rows = plug_json(plug_cli([folder], tmp_path, "plugins", "list", "--json"))
    assert [(r["name"], r["distribution"]) for r in rows] == [("early", "plug_hookfail")]
    (found,) = plug_json(plug_cli([folder], tmp_path, "plugins", "lint", "--json"))
    assert found["level"] == "error" and "plug hook exploded" in found["message"]


def test_duplicate_task_name_list_and_lint_report_both_distributions(plug_broken_folders,
                                                                     tmp_path):
    folder = plug_broken_folders["duplicate_name"]
    listing = plug_cli([folder], tmp_path, "plugins", "list", "--json")
    assert listing.returncode == 0
    rows = plug_json(listing)
    assert {r["name"] for r in rows} == {"same"}
    reported = listing.stdout + listing.stderr
    assert "plug_dup_a" in reported and "plug_dup_b" in reported
    lint = plug_cli([folder], tmp_path, "plugins", "lint", "--json")
    assert lint.returncode == 1
    errors = [f for f in plug_json(lint) if f["level"] == "error" and f["plugin"] == "same"]
    assert errors, lint.stdout
    assert any("plug_dup_a" in f["message"] and "plug_dup_b" in f["message"] for f in errors)
    text = plug_cli([folder], tmp_path, "plugins", "lint")
    assert text.returncode == 1
    assert "plug_dup_a" in text.stdout and "plug_dup_b" in text.stdout


def test_duplicate_task_name_plugin_task_raises_flowerror_naming_both(plug_broken_folders,
                                                                      tmp_path):
    folder = plug_broken_folders["duplicate_name"]
    proc = plug_python(["-c", textwrap.dedent("""\
        import json, pyoco
        try:
            pyoco.plugin_task("same")
        except pyoco.FlowError as exc:
            print(json.dumps(str(exc)))
        else:
            print(json.dumps(None))
    """)], [folder], tmp_path)
    assert proc.returncode == 0, proc.stderr
    message = json.loads(proc.stdout)
    assert message is not None, "plugin_task('same') did not raise FlowError"
    assert "same" in message and "plug_dup_a" in message and "plug_dup_b" in message


def test_duplicate_task_name_flow_using_it_exits_2_naming_both(plug_broken_folders, tmp_path):
    folder = plug_broken_folders["duplicate_name"]
    write(Path(tmp_path) / "use_same.py", plug_using_flow("same"))
    for command in ("run", "check"):
        proc = plug_cli([folder], tmp_path, command, "use_same.py")
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "plug_dup_a" in proc.stderr and "plug_dup_b" in proc.stderr
        assert "use_same.py" in proc.stderr
        assert PLUG_TRACEBACK not in proc.stderr


def test_unknown_plugin_in_a_flow_file_exits_2_with_a_suggestion(plug_demo_target, tmp_path):
    write(Path(tmp_path) / "typo.py", plug_using_flow("shuot"))
    proc = plug_cli([plug_demo_target], tmp_path, "run", "typo.py")
    assert proc.returncode == 2
    assert "typo.py:4" in proc.stderr           # the file and line of the plugin_task call
    assert "'shout'" in proc.stderr and "word_count" in proc.stderr
    assert PLUG_TRACEBACK not in proc.stderr


# ---------------------------------------------------------------------------
# Hooks, summaries, odd entry points, output encodings, known deviations
# ---------------------------------------------------------------------------

def test_hook_tasks_are_named_by_add_or_class_and_summarised_by_summary_or_docstring(tmp_path):
    folder = plug_make_dist(tmp_path / "site", "plug_extras", {"plug_extrasmod": '''\
        import pyoco

        class Summarised(pyoco.Task):
            """A long docstring that is not what the list shows.

            More text.
            """
            summary = "The short summary."

            def run(self, ctx):
                return 1

        class Multi(pyoco.Task):
            """First paragraph
               spans two lines.

            The second paragraph is not part of the summary.
            """

            def run(self, ctx):
                return 2

        class Renamed(pyoco.Task):
            """Registered under the name given to add."""
            name = "class_level_name"

            def run(self, ctx):
                return 3

        def register(registry):
            registry.add(Summarised, name="summarised")
            registry.add(Multi)
            registry.add(Renamed, name="renamed")
    '''}, {"extras": "plug_extrasmod:register"})
    listing = plug_cli([folder], tmp_path, "plugins", "list", "--json")
    assert listing.returncode == 0 and listing.stderr == "", listing.stderr
    rows = {row["name"]: row for row in plug_json(listing)}
    assert {name: (row["summary"], row["distribution"], row["kind"])
            for name, row in rows.items()} == {
        "summarised": ("The short summary.", "plug_extras", "task"),
        "Multi": ("First paragraph spans two lines.", "plug_extras", "task"),
        "renamed": ("Registered under the name given to add.", "plug_extras", "task"),
    }
    lint = plug_cli([folder], tmp_path, "plugins", "lint", "--json")
    assert lint.returncode == 0 and plug_json(lint) == []


def test_entry_point_naming_a_task_decorated_function_keeps_its_options(tmp_path):
    folder = plug_make_dist(tmp_path / "site", "plug_deco", {"plug_decomod": '''\
        import pyoco

        @pyoco.task(retries=2, timeout=5)
        def upload(ctx, path="x"):
            """Upload a file."""
            return path
    '''}, {"upload": "plug_decomod:upload"})
    listing = plug_cli([folder], tmp_path, "plugins", "list", "--json")
    assert listing.returncode == 0
    rows = plug_json(listing)
    assert [(r["name"], r["kind"], r["summary"]) for r in rows] == [
        ("upload", "task", "Upload a file.")]
    lint = plug_cli([folder], tmp_path, "plugins", "lint", "--json")
    assert lint.returncode == 0, lint.stdout
    assert plug_json(lint) == []
    probe = plug_python(["-c", "import pyoco; n = pyoco.plugin_task('upload', name='up');"
                         " print(n.name, n.retries, n.timeout)"], [folder], tmp_path)
    assert probe.stdout.split() == ["up", "2", "5"], probe.stderr
    for proc in (listing, lint, probe):
        assert PLUG_TRACEBACK not in proc.stderr


def test_plugins_list_survives_a_stdout_that_cannot_encode_the_summary(tmp_path):
    folder = plug_make_dist(tmp_path / "site", "plug_cafe", {"plug_cafemod": '''\
        import pyoco

        class Cafe(pyoco.Task):
            """Brew a caf\u00e9 \u2615 for the team."""
            def run(self, ctx):
                return "coffee"
    '''}, {"cafe": "plug_cafemod:Cafe"})
    as_json = plug_cli([folder], tmp_path, "plugins", "list", "--json", PYTHONIOENCODING="ascii")
    assert as_json.returncode == 0, as_json.stderr
    assert PLUG_TRACEBACK not in as_json.stderr
    (row,) = plug_json(as_json)
    assert row["summary"] == "Brew a caf\u00e9 \u2615 for the team."
    table = plug_cli([folder], tmp_path, "plugins", "list", PYTHONIOENCODING="ascii")
    assert table.returncode == 0, table.stderr
    assert PLUG_TRACEBACK not in table.stderr
    assert "cafe" in table.stdout and "plug_cafe" in table.stdout


def test_flow_using_a_plugin_that_failed_to_import_is_told_why(plug_broken_folders, tmp_path):
    folder = plug_broken_folders["import_error"]
    write(Path(tmp_path) / "use_imperr.py", plug_using_flow("imperr"))
    proc = plug_cli([folder], tmp_path, "run", "use_imperr.py")
    assert proc.returncode == 2
    assert PLUG_TRACEBACK not in proc.stderr
    assert "plug_missing_dependency_zzz" in proc.stderr, proc.stderr


def test_plugin_printing_at_import_does_not_corrupt_list_json(tmp_path):
    folder = plug_make_dist(tmp_path / "site", "plug_chatty", {"plug_chattymod": '''\
        import pyoco
        print("plug_chattymod: loading, please wait")

        class Chatty(pyoco.Task):
            """Talks while it loads."""
            def run(self, ctx):
                return 1
    '''}, {"chatty": "plug_chattymod:Chatty"})
    for command in ("list", "lint"):
        proc = plug_cli([folder], tmp_path, "plugins", command, "--json")
        found = json.loads(proc.stdout)          # raises: the print went to stdout
        assert isinstance(found, list)


# ---------------------------------------------------------------------------
# pyoco.plugin_task: nodes from installed plugins
# ---------------------------------------------------------------------------

def test_plugin_task_name_and_retries_options_give_a_renamed_node(plug_demo_in_process):
    node = pyoco.plugin_task("shout", name="loud", retries=1)
    assert isinstance(node, pyoco.Task)
    assert type(node).__name__ == "Shout"
    assert type(node).__module__ == "pyoco_plugin_demo"
    assert node.name == "loud"
    assert node.retries == 1


def test_plugin_task_node_runs_in_a_flow(plug_demo_in_process):
    loud = pyoco.plugin_task("shout", name="loud", retries=1, inputs={"text": "hi", "marks": 2})
    flow = pyoco.Flow(name="plug_loud")
    flow >> loud
    run = pyoco.Engine(trace=False, store=False).run(flow)
    assert run.status == pyoco.RunState.COMPLETED
    assert run.results["loud"] == "HI!!"


def test_plugin_task_default_name_is_the_plugin_name_for_hook_tasks_too(plug_demo_in_process):
    count = pyoco.plugin_task("word_count", inputs={"text": "one two three"})
    rev = pyoco.plugin_task("reverse", inputs={"text": "abc"})
    assert (count.name, rev.name) == ("word_count", "reverse")
    flow = pyoco.Flow(name="plug_hook_tasks")
    flow >> [count, rev]
    run = pyoco.Engine(trace=False, store=False).run(flow)
    assert run.results["word_count"] == 3
    assert run.results["reverse"] == "cba"


def test_plugin_task_same_plugin_twice_under_different_names(plug_demo_in_process):
    text = pyoco.task(lambda ctx: "go", name="text")
    once = pyoco.plugin_task("shout", name="once", inputs={"text": "$node.text.output"})
    twice = pyoco.plugin_task("shout", name="twice",
                              inputs={"text": "$node.once.output", "marks": 2})
    flow = pyoco.Flow(name="plug_twice")
    flow >> text >> once >> twice
    run = pyoco.Engine(trace=False, store=False).run(flow)
    assert run.results["once"] == "GO!"
    assert run.results["twice"] == "GO!!!"


def test_plugin_task_unknown_name_raises_flowerror_listing_names_and_suggesting_closest(
        plug_demo_in_process):
    with pytest.raises(pyoco.FlowError) as info:
        pyoco.plugin_task("shuot")
    message = str(info.value)
    assert "shuot" in message
    assert "did you mean 'shout'" in message
    for name in PLUG_DEMO_TASKS:
        assert name in message


def test_plugin_task_unknown_option_is_a_typeerror_naming_it(plug_demo_in_process):
    with pytest.raises(TypeError, match="retires"):
        pyoco.plugin_task("shout", retires=2)


def test_plugin_task_keeps_class_options_and_its_retries_option_really_retries(
        plug_demo_in_process, tmp_path):
    folder = plug_make_dist(tmp_path / "site", "plug_flaky", {"plug_flakymod": '''\
        import pyoco

        class Flaky(pyoco.Task):
            """Fail on the first attempt, succeed on the next."""
            retries = 1                     # task options are class attributes

            def run(self, ctx):
                attempts = self.__dict__.get("attempts", 0) + 1
                object.__setattr__(self, "attempts", attempts)
                if attempts == 1:
                    raise RuntimeError("first attempt fails")
                return attempts
    '''}, {"flaky": "plug_flakymod:Flaky"})
    sys.path.insert(0, str(folder))             # plug_demo_in_process restores sys.path
    pyoco.load_plugins(refresh=True)
    node = pyoco.plugin_task("flaky")
    assert node.retries == 1
    flow = pyoco.Flow(name="plug_retry")
    flow >> node
    run = pyoco.Engine(trace=False, store=False).run(flow)
    assert run.results["flaky"] == 2
    assert run.tasks["flaky"].attempts == 2
    flow = pyoco.Flow(name="plug_no_retry")
    flow >> pyoco.plugin_task("flaky", retries=0)
    with pytest.raises(pyoco.RunFailed):
        pyoco.Engine(trace=False, store=False).run(flow)


def test_load_plugins_is_cached_until_refresh(plug_demo_in_process):
    first = pyoco.load_plugins()
    assert pyoco.load_plugins() is first
    assert sorted(first.names()) == sorted(PLUG_DEMO_TASKS)
    info = first.get("shout")
    assert (info.distribution, info.version, info.kind) == ("pyoco-plugin-demo", "1.0.0", "task")
    refreshed = pyoco.load_plugins(refresh=True)
    assert refreshed is not first
    assert refreshed.names() == first.names()


def test_refresh_forgets_plugins_whose_folder_left_sys_path(plug_demo_in_process):
    assert "shout" in pyoco.load_plugins().names()
    sys.path.remove(str(plug_demo_in_process))
    assert "shout" not in pyoco.load_plugins(refresh=True).names()
    with pytest.raises(pyoco.FlowError):
        pyoco.plugin_task("shout")


# ---------------------------------------------------------------------------
# Discovery is lazy: import pyoco stays cheap
# ---------------------------------------------------------------------------

PLUG_LAZY_SCRIPT = """\
import json, sys
import pyoco
seen = {"after_import": "importlib.metadata" in sys.modules}
from pyoco import Engine, Flow, task

@task
def one(ctx):
    return 1

flow = Flow(name="plug_lazy")
flow >> one
Engine(trace=False, store=False).run(flow)
seen["after_run"] = "importlib.metadata" in sys.modules
seen["demo_after_run"] = "pyoco_plugin_demo" in sys.modules
pyoco.plugin_task("shout")
seen["after_plugin_task"] = "importlib.metadata" in sys.modules
seen["demo_after_plugin_task"] = "pyoco_plugin_demo" in sys.modules
print(json.dumps(seen))
"""


def test_import_pyoco_does_not_import_importlib_metadata(tmp_path):
    proc = plug_python(["-c", "import sys, pyoco; print('importlib.metadata' in sys.modules)"],
                       [], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_plugins_are_discovered_only_when_a_plugin_task_is_asked_for(plug_demo_target, tmp_path):
    proc = plug_python(["-c", PLUG_LAZY_SCRIPT], [plug_demo_target], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "after_import": False, "after_run": False, "demo_after_run": False,
        "after_plugin_task": True, "demo_after_plugin_task": True}


# ---------------------------------------------------------------------------
# Register hooks written for the original pyoco (SPEC section 15)
# ---------------------------------------------------------------------------

def test_a_register_hook_written_for_the_original_loads_its_tasks(tmp_path):
    folder = plug_make_dist(tmp_path / "site", "plug_orig", {"plug_origmod": '''\
        from pyoco.core.models import Task

        class ImageClassify(Task):
            """Label an image."""

            def __init__(self):
                super().__init__(func=self.run, name="image_classify")

            def run(self, ctx, path="bunny.png"):
                return "label of " + path

        class Resize(Task):
            def run(self, ctx, size=1):
                return size * 2

        def register(registry):
            registry.task_class(ImageClassify)
            registry.task_class(Resize, name="resize", retries=2)

            @registry.task(name="shout", timeout_sec=5)
            def shout(ctx, text="hi"):
                return text.upper()

            registry.register_callable(lambda ctx: 1, name="one")
            registry.task_info("resize", summary="Resize an image.")
    '''}, {"orig": "plug_origmod:register"})
    listing = plug_cli([folder], tmp_path, "plugins", "list", "--json")
    rows = {row["name"]: (row["kind"], row["summary"]) for row in plug_json(listing)}
    assert rows == {"image_classify": ("task", "Label an image."),
                    "resize": ("task", "Resize an image."), "shout": ("function", None),
                    "one": ("function", None)}, listing.stderr
    lint = plug_cli([folder], tmp_path, "plugins", "lint", "--json")
    assert {(f["plugin"], f["level"]) for f in plug_json(lint)} >= {("shout", "warning")}
    probe = plug_python(["-c", "import pyoco; from pyoco import plugin_task as p;"
                         " r = p('resize'); s = p('shout'); i = p('image_classify', retries=1);"
                         " print(r.name, r.retries, s.timeout, i.name, i.retries)"], [folder],
                        tmp_path)
    assert probe.stdout.split() == ["resize", "2", "5", "image_classify", "1"], probe.stderr


def test_registry_rejects_unknown_options_and_info_keys_naming_the_closest():
    registry = pyoco.PluginRegistry()
    with pytest.raises(TypeError, match="'retries'"):
        registry.task_class(type("T", (Task,), {"run": lambda self, ctx: 1}), retrys=1)
    registry.register_callable(lambda ctx: 1, name="one")
    with pytest.raises(TypeError, match="'summary'"):
        registry.task_info("one", sumary="x")
    with pytest.raises(KeyError, match="'one'"):
        registry.task_info("onee", summary="x")


# ===========================================================================
# CLI
# ===========================================================================


# ---------------------------------------------------------------------------
# run, check, graph, options, flow files
# ---------------------------------------------------------------------------

OK_FLOW = '''\
from pyoco import task, Flow

@task
def hello(ctx, n=1, s="x"):
    print("hello n=%r %s s=%r %s" % (n, type(n).__name__, s, type(s).__name__))
    return n

flow = Flow(name="cli-ok")
flow >> hello

if __name__ == "__main__":
    print("MAIN BLOCK RAN")
'''

FAILING_FLOW = '''\
from pyoco import task, Flow

@task
def explode(ctx):
    raise ValueError("kaboom")

flow = Flow(name="cli-fail")
flow >> explode
'''

TWO_FLOWS = '''\
from pyoco import task, Flow

@task
def a(ctx):
    print("ran a")

@task
def b(ctx):
    print("ran b")

morning = Flow(name="morning-report")
morning >> a
evening = Flow(name="evening")
evening >> b
'''

NEEDS_PARAM_FLOW = '''\
from pyoco import task, Flow

@task
def report(ctx, day):
    print("RAN report for", day)

@task
def first(ctx):
    print("RAN first")

flow = Flow(name="needs-day")
flow >> first >> report
'''

GRAPH_FLOW = '''\
from pyoco import task, Flow

@task
def extract(ctx):
    return 1

@task
def left(ctx):
    return 2

@task
def right(ctx):
    return 3

@task
def load(ctx):
    return 4

flow = Flow(name="etl")
flow >> extract >> [left, right] >> load
'''


def test_cli_run_succeeds_and_skips_the_main_block(tmp_path):
    write(tmp_path / "ok.py", OK_FLOW)
    proc = cli(tmp_path, "run", "ok.py")
    assert proc.returncode == 0, proc.stderr
    assert "hello n=1 int s='x' str" in proc.stdout
    assert "MAIN BLOCK RAN" not in proc.stdout + proc.stderr
    assert "🐇 pyoco > start flow=cli-ok run_id=" in proc.stderr
    assert "🥕 done flow=cli-ok" in proc.stderr


def test_cli_params_are_json_when_they_parse_else_strings(tmp_path):
    write(tmp_path / "ok.py", OK_FLOW)
    proc = cli(tmp_path, "run", "ok.py", "-p", "n=3", "-p", "s=abc")
    assert proc.returncode == 0, proc.stderr
    assert "hello n=3 int s='abc' str" in proc.stdout
    proc = cli(tmp_path, "run", "ok.py", "--param", "n=[1, 2]", "-p", 's="7"')
    assert "hello n=[1, 2] list s='7' str" in proc.stdout
    proc = cli(tmp_path, "run", "ok.py", "-p", "s=a=b", "-p", "n=true")
    assert "hello n=True bool s='a=b' str" in proc.stdout


def test_cli_run_of_a_failing_flow_exits_1_naming_the_task(tmp_path):
    write(tmp_path / "fail.py", FAILING_FLOW)
    proc = cli(tmp_path, "run", "fail.py")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "explode" in last and "kaboom" in last
    assert "Traceback" not in proc.stderr


CUTE_MARKERS = ("🐇 pyoco > ", "🏃 ", "✅ ", "🔁 ", "💥 ", "⏭️ ", "🛑 ", "🚫 ", "♻️ ", "🥕 ", "💔 ")

TWO_LINE_ERROR_FLOW = '''\
from pyoco import task, Flow

@task
def explode(ctx):
    raise ValueError("line one\\nline two")

@task
def after(ctx):
    return None

flow = Flow(name="two-lines")
flow >> explode >> after
'''


def test_cli_cute_trace_prints_a_multi_line_error_as_one_line(tmp_path):
    write(tmp_path / "two_lines.py", TWO_LINE_ERROR_FLOW)
    proc = cli(tmp_path, "run", "two_lines.py")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    end = [k for k, line in enumerate(lines) if line.startswith("💔 failed flow=two-lines")]
    assert end, proc.stderr
    trace = lines[:end[0] + 1]              # what follows is the CLI's closing message
    assert trace[0].startswith("🐇 pyoco > start flow=two-lines")
    for line in trace:
        assert line.startswith(CUTE_MARKERS), line
    [error] = [line for line in trace if line.startswith("💥 error node=explode ")]
    assert "line one" in error and "line two" in error
    assert any(line.startswith("⏭️ skip node=after") for line in trace)


def test_cli_failure_message_of_a_multi_line_error_is_one_line(tmp_path):
    write(tmp_path / "two_lines.py", TWO_LINE_ERROR_FLOW)
    proc = cli(tmp_path, "run", "two_lines.py")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    for line in lines:
        assert line.startswith(CUTE_MARKERS + ("pyoco: ",)), line
    assert lines[-1].startswith("pyoco: run ")
    assert "explode" in lines[-1] and "line one" in lines[-1] and "line two" in lines[-1]


def test_cli_syntax_error_exits_2_with_file_and_line(tmp_path):
    write(tmp_path / "bad.py", "from pyoco import Flow\n\ndef broken(:\n    pass\n")
    proc = usage_error(cli(tmp_path, "run", "bad.py"), "bad.py:3")


def test_cli_flow_file_that_raises_while_loading_exits_2_with_file_and_line(tmp_path):
    write(tmp_path / "raises.py", "from pyoco import Flow\nflow = Flow('x')\n"
                                  "raise RuntimeError('cannot load')\n")
    proc = usage_error(cli(tmp_path, "run", "raises.py"), "raises.py:3", "cannot load")


def test_cli_flow_error_while_building_exits_2_with_file_and_line(tmp_path):
    write(tmp_path / "loop.py", """\
        from pyoco import task, Flow

        @task
        def a(ctx):
            return 1

        flow = Flow(name="loop")
        flow.add(a, after=[a])
        """)
    proc = usage_error(cli(tmp_path, "run", "loop.py"), "loop.py:8", "'a'")


def test_cli_missing_file_exits_2_naming_it(tmp_path):
    proc = usage_error(cli(tmp_path, "run", "nowhere.py"), "nowhere.py")


def test_cli_several_flows_without_flow_option_exits_2_listing_them(tmp_path):
    write(tmp_path / "two.py", TWO_FLOWS)
    proc = usage_error(cli(tmp_path, "run", "two.py"), "morning-report", "evening", "--flow")
    assert "ran a" not in proc.stdout and "ran b" not in proc.stdout


@pytest.mark.parametrize("choice, ran", [("morning-report", "ran a"), ("morning", "ran a"),
                                         ("evening", "ran b")])
def test_cli_flow_option_picks_by_flow_name_or_variable(tmp_path, choice, ran):
    write(tmp_path / "two.py", TWO_FLOWS)
    proc = cli(tmp_path, "run", "two.py", "--flow", choice)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ran


def test_cli_unknown_flow_name_exits_2_listing_choices(tmp_path):
    write(tmp_path / "two.py", TWO_FLOWS)
    proc = usage_error(cli(tmp_path, "run", "two.py", "--flow", "noon"), "noon", "morning-report")


@pytest.mark.parametrize("pair", ["n3", "=3"])
def test_cli_bad_param_exits_2_naming_it(tmp_path, pair):
    write(tmp_path / "ok.py", OK_FLOW)
    proc = usage_error(cli(tmp_path, "run", "ok.py", "-p", pair), pair)
    assert "hello" not in proc.stdout


def test_cli_flow_that_fails_validation_exits_2_before_running(tmp_path):
    write(tmp_path / "needs.py", NEEDS_PARAM_FLOW)
    proc = usage_error(cli(tmp_path, "run", "needs.py"), "'report'", "'day'")
    assert "RAN" not in proc.stdout
    assert "Traceback" not in proc.stderr
    proc = cli(tmp_path, "run", "needs.py", "-p", "day=mon")
    assert proc.returncode == 0, proc.stderr
    assert "RAN report for mon" in proc.stdout


def test_cli_check_validates_without_running(tmp_path):
    write(tmp_path / "ok.py", OK_FLOW.replace("return n", "print('RAN'); return n"))
    proc = cli(tmp_path, "check", "ok.py")
    assert proc.returncode == 0, proc.stderr
    assert "cli-ok" in proc.stdout
    assert "RAN" not in proc.stdout and "hello n=" not in proc.stdout


def test_cli_check_reports_a_broken_flow_and_exits_1(tmp_path):
    write(tmp_path / "cyc.py", GRAPH_FLOW + "flow.add(extract, after=[load])\n")
    proc = cli(tmp_path, "check", "cyc.py")
    assert proc.returncode == 1
    assert "cycle" in proc.stdout + proc.stderr


def test_cli_check_json(tmp_path):
    write(tmp_path / "etl.py", GRAPH_FLOW)
    write(tmp_path / "cyc.py", GRAPH_FLOW + "flow.add(extract, after=[load])\n")
    good = cli(tmp_path, "check", "etl.py", "--json")
    assert good.returncode == 0
    report = json.loads(good.stdout)
    assert report["ok"] is True and report["flow"] == "etl"
    bad = cli(tmp_path, "check", "cyc.py", "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and report["problems"]
    assert "cycle" in report["problems"][0]


def test_cli_check_lists_needed_run_parameters(tmp_path):
    write(tmp_path / "needs.py", NEEDS_PARAM_FLOW)
    proc = cli(tmp_path, "check", "needs.py", "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["needs_params"] == ["day"]


def test_cli_check_accepts_a_flow_reading_ctx_params(tmp_path):
    write(tmp_path / "reads.py", NEEDS_PARAM_FLOW.replace(
        "flow >> first >> report", "flow >> first >> report\n"
        "report.task.inputs = {'day': '$ctx.params.day'}"))
    proc = cli(tmp_path, "check", "reads.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_graph_formats(tmp_path):
    write(tmp_path / "etl.py", GRAPH_FLOW)
    text = cli(tmp_path, "graph", "etl.py")
    assert text.returncode == 0
    assert "etl" in text.stdout
    assert re.search(r"load <- (left, right|right, left)", text.stdout)
    same = cli(tmp_path, "graph", "etl.py", "--format", "text")
    assert same.stdout == text.stdout
    mermaid = cli(tmp_path, "graph", "etl.py", "--format", "mermaid")
    assert mermaid.returncode == 0
    assert mermaid.stdout.startswith("flowchart")
    assert mermaid.stdout.count("-->") == 4
    dot = cli(tmp_path, "graph", "etl.py", "--format", "dot")
    assert dot.returncode == 0
    assert dot.stdout.startswith("digraph")
    for edge in ('"extract" -> "left"', '"extract" -> "right"', '"left" -> "load"',
                 '"right" -> "load"'):
        assert edge in dot.stdout
    bad = cli(tmp_path, "graph", "etl.py", "--format", "png")
    assert bad.returncode == 2


RULES_FLOW = '''\
from pyoco import task, Flow

@task
def check(ctx):
    return {"changed": True}

@task(pool="api", when="$node.check.output.changed")
def publish(ctx):
    return 1

@task(max_parallel=2)
def resize(ctx, item):
    return item

@task(run_if="all_done")
def cleanup(ctx):
    return 2

flow = Flow(name="rules", pools={"api": 2, "slow": {"size": 1, "rate": "10/m"}})
flow >> check >> resize.map([1, 2, 3]) >> cleanup
flow.add(publish)
'''


def _rules(tmp_path, *args):
    """``pyoco ARGS rules.py`` (exit 0) for RULES_FLOW: its stdout."""
    write(tmp_path / "rules.py", RULES_FLOW)
    return ok(cli(tmp_path, *args, "rules.py")).stdout


def test_cli_graph_shows_run_if_when_pool_and_max_parallel_in_every_format(tmp_path):
    lines = _rules(tmp_path, "graph").splitlines()
    assert "  publish [when $node.check.output.changed] [pool=api] <- check" in lines
    assert "  cleanup [run_if=all_done] <- resize" in lines
    assert "  resize [max_parallel=2] <- check" in lines
    mermaid = cli(tmp_path, "graph", "rules.py", "--format", "mermaid")
    assert mermaid.returncode == 0
    for label in ('["publish [when $node.check.output.changed] [pool=api]"]',
                  '["cleanup [run_if=all_done]"]', '["resize [max_parallel=2]"]'):
        assert label in mermaid.stdout
    dot = cli(tmp_path, "graph", "rules.py", "--format", "dot")
    assert dot.returncode == 0
    for label in ('"publish" [label="publish [when $node.check.output.changed] [pool=api]"];',
                  '"cleanup" [label="cleanup [run_if=all_done]"];',
                  '"resize" [label="resize [max_parallel=2]"];', '"check" -> "publish";'):
        assert label in dot.stdout


def test_cli_check_prints_each_tasks_run_if_when_and_pool(tmp_path):
    lines = _rules(tmp_path, "check").splitlines()
    assert "  publish: when $node.check.output.changed, pool=api" in lines
    assert "  cleanup: run_if=all_done" in lines
    assert "  resize: max_parallel=2" in lines
    assert not any(line.startswith("  check:") for line in lines)


def test_cli_check_json_has_the_pools_and_the_rules_of_each_task(tmp_path):
    write(tmp_path / "rules.py", RULES_FLOW)
    proc = cli(tmp_path, "check", "rules.py", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["pools"] == {"api": {"size": 2, "rate": None},
                               "slow": {"size": 1, "rate": "10/m"}}
    assert report["rules"] == {"publish": ["when $node.check.output.changed", "pool=api"],
                               "cleanup": ["run_if=all_done"], "resize": ["max_parallel=2"]}


def test_cli_check_reports_a_bad_pool_set_after_the_flow_was_made(tmp_path):
    write(tmp_path / "later.py", RULES_FLOW + 'flow.pools = {"api": 0}\n')
    run = cli(tmp_path, "run", "later.py")
    assert run.returncode == 2 and "'api'" in run.stderr
    proc = cli(tmp_path, "check", "later.py")
    assert proc.returncode == 1
    assert "'api'" in proc.stdout + proc.stderr
    as_json = cli(tmp_path, "check", "later.py", "--json")
    assert "Traceback" not in as_json.stderr
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and "'api'" in report["problems"][0]


UNDECLARED_POOL_FLOW = '''\
from pyoco import task, Flow

@task(pool="apy")
def call(ctx):
    print("RAN call")

flow = Flow(name="undeclared", pools={"api": 2})
flow >> call
'''


def test_cli_run_of_a_task_naming_an_undeclared_pool_exits_2_before_running(tmp_path):
    write(tmp_path / "undeclared.py", UNDECLARED_POOL_FLOW)
    proc = cli(tmp_path, "run", "undeclared.py")
    assert proc.returncode == 2
    for word in ("undeclared.py", "'call'", "'apy'", "--pool apy="):
        assert word in proc.stderr
    assert "RAN" not in proc.stdout and "Traceback" not in proc.stderr
    proc = cli(tmp_path, "run", "undeclared.py", "--pool", "apy=1")
    assert proc.returncode == 0, proc.stderr
    assert "RAN call" in proc.stdout


@pytest.mark.parametrize("pair", ["api=x", "api=0", "api", "=3", "api=-1"])
def test_cli_bad_pool_option_exits_2_naming_it(tmp_path, pair):
    write(tmp_path / "ok.py", OK_FLOW)
    proc = cli(tmp_path, "run", "ok.py", "--pool", pair)
    assert proc.returncode == 2
    assert "--pool" in proc.stderr and repr(pair) in proc.stderr
    assert "Traceback" not in proc.stderr and "hello" not in proc.stdout


# Each instance counts itself in and out and meets `-p parties` others at a
# barrier; the last task writes the peak to peak.txt.
POOL_PEAK_FLOW = ("import os, threading\nfrom pyoco import task, Flow\n\nWAIT = 10\n\n"
                  + textwrap.dedent(inspect.getsource(_overlap_probe)) + '''
body, state = _overlap_probe(int(os.environ["PARTIES"]))
call = task(name="call", pool="api")(body)

@task
def report(ctx, call):
    with open("peak.txt", "w") as out:
        out.write(str(state["max"]))

flow = Flow(name="peak", pools={"api": 1})
flow >> call.map(list(range(12))) >> report
''')


def test_cli_pool_option_sets_the_size_the_run_uses(tmp_path):
    write(tmp_path / "peak.py", POOL_PEAK_FLOW)
    proc = cli(tmp_path, "run", "peak.py", PARTIES="1")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "peak.txt").read_text() == "1"      # the flow's own size
    proc = cli(tmp_path, "run", "peak.py", "--pool", "api=3", PARTIES="3")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "peak.txt").read_text() == "3"


def test_cli_workers_option(tmp_path):
    write(tmp_path / "ok.py", OK_FLOW)
    assert cli(tmp_path, "run", "ok.py", "--workers", "1").returncode == 0
    bad = cli(tmp_path, "run", "ok.py", "--workers", "0")
    assert bad.returncode == 2
    assert "--workers" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_version(tmp_path):
    proc = cli(tmp_path, "--version")
    assert proc.returncode == 0
    assert pyoco.__version__ in proc.stdout


@pytest.mark.parametrize("command", [[], ["run"], ["check"], ["graph"]],
                         ids=["pyoco", "run", "check", "graph"])
def test_cli_help_for_every_command_exits_0(tmp_path, command):
    proc = cli(tmp_path, *(command + ["--help"]))
    assert proc.returncode == 0
    assert "usage" in proc.stdout.lower()


def test_cli_unknown_command_is_a_usage_error(tmp_path):
    proc = cli(tmp_path, "frobnicate")
    assert proc.returncode == 2


def test_cli_python_pyoco_py_behaves_like_python_m_pyoco(tmp_path):
    write(tmp_path / "ok.py", OK_FLOW)
    write(tmp_path / "fail.py", FAILING_FLOW)
    ok = cli(tmp_path, "run", "ok.py", "-p", "n=3", main_py=True)
    assert ok.returncode == 0, ok.stderr
    assert "hello n=3 int" in ok.stdout
    assert "MAIN BLOCK RAN" not in ok.stdout
    assert cli(tmp_path, "run", "fail.py", main_py=True).returncode == 1
    assert cli(tmp_path, "run", "missing.py", main_py=True).returncode == 2


def _package(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    write(pkg / "flows.py", TWO_FLOWS)


@pytest.mark.parametrize("target, ran", [("mypkg.flows:morning", "ran a"),
                                         ("mypkg.flows:morning-report", "ran a"),
                                         ("mypkg.flows:evening", "ran b")])
def test_cli_package_module_target(tmp_path, target, ran):
    _package(tmp_path)
    proc = cli(tmp_path, "run", target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ran


def test_cli_package_module_target_via_pyoco_py(tmp_path):
    _package(tmp_path)
    proc = cli(tmp_path, "run", "mypkg.flows:evening", main_py=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ran b"


def test_cli_unknown_module_target_exits_2(tmp_path):
    proc = usage_error(cli(tmp_path, "run", "no_such_pkg.flows:daily"), "no_such_pkg")


SIBLING_FLOW = """\
    from pyoco import task, Flow
    import garden_helpers

    @task
    def count(ctx):
        print("counted", garden_helpers.CARROTS)
        return garden_helpers.CARROTS

    flow = Flow(name="shadowing")
    flow >> count
"""


@pytest.mark.parametrize("stem", ["queue", "json", "logging"])
def test_cli_flow_file_named_like_a_stdlib_module_runs_and_imports_its_siblings(tmp_path, stem):
    (tmp_path / "flows").mkdir()
    write(tmp_path / "flows" / ("%s.py" % stem), SIBLING_FLOW)
    write(tmp_path / "flows" / "garden_helpers.py", "CARROTS = 12\n")
    proc = cli(tmp_path, "run", "flows/%s.py" % stem)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "counted 12"
    assert "Traceback" not in proc.stderr


def test_flow_file_named_queue_runs_on_fresh_worker_processes(tmp_path):
    # spawn: the workers import nothing from the parent, so they load the
    # tasks from the flow file by its path and need the stdlib queue too.
    (tmp_path / "flows").mkdir()
    write(tmp_path / "flows" / "queue.py", SIBLING_FLOW)
    write(tmp_path / "flows" / "garden_helpers.py", "CARROTS = 12\n")
    write(tmp_path / "run_it.py", """\
        import multiprocessing
        from pyoco import Engine, load_flow

        if __name__ == "__main__":
            multiprocessing.set_start_method("spawn")
            flow = load_flow("flows/queue.py")
            run = Engine(executor="process", workers=1, trace=False, store=False).run(flow)
            print("RESULT", run.results["count"])
        """)
    proc = run_python(tmp_path, "run_it.py")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["counted 12", "RESULT 12"]


def _relative_package(tmp_path):
    sub = tmp_path / "pkg" / "sub"
    sub.mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("", encoding="utf-8")
    (sub / "__init__.py").write_text("", encoding="utf-8")
    write(sub / "helpers.py", "CARROTS = 5\n")
    write(sub / "flows.py", """\
        from pyoco import task, Flow
        from .helpers import CARROTS

        @task
        def count(ctx):
            print("counted", CARROTS)

        flow = Flow(name="relative")
        flow >> count
        """)


@pytest.mark.parametrize("main_py", [False, True])
def test_cli_flow_file_with_relative_imports_runs_as_its_package_module(tmp_path, main_py):
    _relative_package(tmp_path)
    proc = cli(tmp_path, "run", os.path.join("pkg", "sub", "flows.py"), main_py=main_py)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "counted 5"


def test_cli_relative_imports_out_of_reach_exit_2_naming_the_module(tmp_path):
    _relative_package(tmp_path)
    proc = cli(tmp_path / "pkg", "run", os.path.join("sub", "flows.py"))
    assert proc.returncode == 2
    assert "pyoco run pkg.sub.flows:flow" in proc.stderr and str(tmp_path) in proc.stderr
    assert "flows.py:2" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "pkg" / "sub" / "__init__.py").unlink()
    proc = cli(tmp_path, "run", os.path.join("pkg", "sub", "flows.py"))
    assert proc.returncode == 2
    assert "not a package" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["--non-cute", "PYOCO_CUTE=0"])
def test_cli_non_cute_prints_plain_lines(tmp_path, how):
    write(tmp_path / "ok.py", OK_FLOW)
    if how == "--non-cute":
        proc = cli(tmp_path, "run", "ok.py", "--non-cute")
    else:
        proc = cli(tmp_path, "run", "ok.py", PYOCO_CUTE="0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) >= 4
    for line in lines:
        assert line.isascii() and PLAIN.match(line), line


def test_cli_timeout_does_not_hold_the_process(tmp_path):
    write(tmp_path / "slow.py", '''\
        import time
        from pyoco import task, Flow

        @task(timeout=0.5)
        def stuck(ctx):
            with open("started", "w") as f:
                f.write(repr(time.time()))
            time.sleep(30)

        flow = Flow(name="stuck")
        flow >> stuck
        ''')
    proc = cli(tmp_path, "run", "slow.py")
    elapsed = time.time() - float((tmp_path / "started").read_text())
    assert proc.returncode == 1
    assert "TimeoutError" in proc.stderr
    assert elapsed < 10.0               # the task's 30 s sleep did not hold the process


# ---------------------------------------------------------------------------
# check: a flow's schedule and its next times; a bad schedule does not load
# ---------------------------------------------------------------------------

SCH_FLOW = '''\
from pyoco import task, Flow

@task
def tick(ctx):
    return 1

flow = Flow("ticker", schedule=%r, schedule_tz="UTC")
flow >> tick
'''


def test_cli_check_prints_the_schedule_and_its_next_three_times(tmp_path):
    write(tmp_path / "ticker.py", SCH_FLOW % "0 3 * * *")
    before = time.time()
    done = cli(tmp_path, "check", "ticker.py")
    assert done.returncode == 0, done.stderr
    expected = [pyoco._iso(ts) for ts in Flow("x", schedule="0 3 * * *", schedule_tz="UTC")
                ._schedule.upcoming(3, before)]
    assert "schedule: 0 3 * * * (UTC); next: %s" % ", ".join(expected) in done.stdout
    report = json.loads(cli(tmp_path, "check", "ticker.py", "--json").stdout)
    assert report["schedule"] == "0 3 * * *"
    assert report["next_runs"] == expected
    for stamp in expected:
        assert ISO.match(stamp) and stamp.endswith("T03:00:00.000Z")
    write(tmp_path / "plain.py", "from pyoco import Flow\nflow = Flow('plain')\n")
    plain = json.loads(cli(tmp_path, "check", "plain.py", "--json").stdout)
    assert (plain["schedule"], plain["next_runs"]) == (None, [])


@pytest.mark.parametrize("command", ["run", "check"])
def test_flow_file_with_a_bad_schedule_does_not_load(tmp_path, command):
    write(tmp_path / "ticker.py", SCH_FLOW % "0 3 * * funday")
    done = cli(tmp_path, command, "ticker.py")
    assert done.returncode == 2
    assert "ticker.py:7:" in done.stderr and "day of week" in done.stderr
    assert "'funday'" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------
# --plan, --only and --from (SPEC section 11)
# ---------------------------------------------------------------------------

_PLAN_FLOW = '''
from pyoco import task, Flow

@task(cache=True)
def fetch(ctx):
    print("fetched")
    return 1

@task
def show(ctx, fetch):
    print("shown", fetch)

flow = Flow(name="cli-plan")
flow >> fetch >> show
'''


def test_cli_plan_prints_one_line_per_task_or_json_and_writes_nothing(tmp_path):
    write(tmp_path / "flow.py", _PLAN_FLOW)
    first = cli(tmp_path, "run", "flow.py", "--plan")
    assert first.returncode == 0, first.stderr
    assert "fetched" not in first.stdout and not (tmp_path / ".pyoco").exists()
    lines = first.stdout.splitlines()
    assert lines[0].split() == ["ACTION", "TASK", "REASON"]
    assert re.match(r"run\s+fetch\s+no earlier run$", lines[1])
    assert re.match(r"run\s+show\s+not cached \(cache='resume'\)$", lines[2])
    ran = cli(tmp_path, "run", "flow.py")
    assert ran.returncode == 0 and "fetched" in ran.stdout
    run_id = re.search(r"run_id=(\S+)", ran.stderr).group(1)
    as_json = cli(tmp_path, "run", "flow.py", "--plan", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [
        {"task": "fetch", "action": "reuse", "reason": "same code and inputs as run %s" % run_id,
         "reused_from": run_id},
        {"task": "show", "action": "run", "reason": "not cached (cache='resume')",
         "reused_from": None}]
    again = cli(tmp_path, "run", "flow.py", "--non-cute")
    assert "fetched" not in again.stdout and "shown 1" in again.stdout
    assert re.search(r"INFO reuse node=fetch from_run=%s " % run_id, again.stderr)


@pytest.mark.parametrize("args, words", [
    (("--plan", "--only", "shwo"), "did you mean 'show'?"),
    (("--from", "fetc"), "did you mean 'fetch'?"),
    (("--only", "nothing"), "has no task 'nothing'"),
    (("--json",), "--json goes with --plan"),
])
def test_cli_unknown_targets_and_json_without_plan_exit_2(tmp_path, args, words):
    write(tmp_path / "flow.py", _PLAN_FLOW)
    done = cli(tmp_path, "run", "flow.py", *args)
    assert done.returncode == 2 and words in done.stderr
    assert "Traceback" not in done.stderr and "fetched" not in done.stdout


def test_cli_only_and_from_select_tasks(tmp_path):
    write(tmp_path / "flow.py", _PLAN_FLOW)
    only = cli(tmp_path, "run", "flow.py", "--only", "fetch")
    assert only.returncode == 0 and "fetched" in only.stdout and "shown" not in only.stdout
    assert "⏭️ skip node=show (not selected)" in only.stderr
    again = cli(tmp_path, "run", "flow.py", "--from", "show")
    assert again.returncode == 0 and "fetched" not in again.stdout
    assert "shown 1" in again.stdout


# ---------------------------------------------------------------------------
# YAML flow files written for the original pyoco (SPEC section 15)
# ---------------------------------------------------------------------------

def yaml_python():
    """An interpreter with PyYAML for the YAML flow-file tests: this one, else
    $YAML_TEST_PYTHON (.ci/run makes one); without either the test is skipped."""
    import importlib.util
    if importlib.util.find_spec("yaml") is not None:
        return sys.executable
    if os.environ.get("YAML_TEST_PYTHON"):
        return os.environ["YAML_TEST_PYTHON"]
    pytest.skip("PyYAML is not installed for this Python and YAML_TEST_PYTHON is not set"
                " (.ci/run sets it to a throwaway venv with PyYAML)")


def yaml_cli(cwd, *args, python=None, env=None):
    """``python -m pyoco ARGS`` in ``cwd`` with an interpreter that has PyYAML."""
    return cli(cwd, *args, python=python or yaml_python(), env=env)


@pytest.fixture
def yaml_example(tmp_path):
    """A copy of examples/original_yaml to run in."""
    folder = tmp_path / "original_yaml"
    shutil.copytree(str(HERE / "examples" / "original_yaml"), str(folder))
    return folder


def test_yaml_flow_file_runs_with_config_flow_and_json_params(yaml_example):
    done = yaml_cli(yaml_example, "run", "--config", "flow.yaml", "--flow", "harvest",
                    "--param", "rows=4", "--store", "store")
    assert done.returncode == 0, done.stderr
    assert "planting 4 rows" in done.stdout
    assert "report: sold 4 carrots; pickled 4 carrots" in done.stdout
    record = RunStore(yaml_example / "store").list()[0]
    assert record["params"] == {"rows": 4} and record["flow"] == "harvest"
    assert list(record["tasks"]) == ["plant", "water", "count", "sell", "pickle_them", "report"]


def test_yaml_or_join_runs_after_one_success_and_the_run_still_fails(yaml_example):
    done = yaml_cli(yaml_example, "run", "flow.yaml", "-p", "rows=12", "--store", "store")
    assert done.returncode == 1, done.stderr
    assert "report: pickled 12 carrots" in done.stdout
    assert "task 'sell' raised ValueError: the stall holds 10 carrots" in done.stderr


def test_yaml_check_and_graph_read_the_file_and_run_nothing(yaml_example):
    check = yaml_cli(yaml_example, "check", "flow.yaml", "--json")
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["ok"] and report["flow"] == "harvest" and report["needs_params"] == []
    assert report["rules"] == {"report": ["run_if=any_succeeded"]}
    graph = yaml_cli(yaml_example, "graph", "--config", "flow.yaml")
    assert graph.returncode == 0 and "count <- plant, water" in graph.stdout
    assert "report [run_if=any_succeeded] <- sell, pickle_them" in graph.stdout
    assert "planting" not in check.stdout + graph.stdout
    assert not (yaml_example / ".pyoco").exists()


YAML_TASKS = '''\
from pathlib import Path
from pyoco import task

@task
def A(ctx):
    Path("ran-A").write_text("")

@task
def B(ctx):
    Path("ran-B").write_text("")

@task
def C(ctx):
    Path("ran-C").write_text("")
'''


@pytest.mark.parametrize("graph, message", [
    ("__import__('os').system('touch PWNED')", "expected >> after '__import__', got '('"),
    ("A >> B; __import__('os').system('touch PWNED')", "expected >> after 'B', got ';'"),
    ("A >> B & C", "put the group in parentheses: (a & b)"),
    ("A >> [B, C]", "unexpected '['"),
    ("(A & B | C)", "a group mixes & and |"),
    ("A >> D", "no task 'D' (tasks: A, B, C)"),
    ("A >> B >>", "the chain ends after >>"),
    ("A >> (B & )", "expected a task name inside ( ), got ')'"),
    ("C >> C", "task 'C' cannot run after itself"),
])
def test_yaml_graph_lines_other_than_chains_are_refused_before_anything_runs(tmp_path, graph,
                                                                          message):
    write(tmp_path / "tasks.py", YAML_TASKS)
    write(tmp_path / "flow.yaml", '''\
        discovery:
          glob_modules: ["tasks.py"]
        flows:
          main:
            graph: |
              # a comment line
              A >> B
              %s
        ''' % graph)
    for command in ("run", "check"):
        done = yaml_cli(tmp_path, command, "flow.yaml", "--store", "store") if command == "run" \
            else yaml_cli(tmp_path, command, "flow.yaml")
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert "flow.yaml:8: flow 'main' graph line 3" in done.stderr and message in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.yaml", "tasks.py"]


@pytest.mark.parametrize("text, message", [
    ("flows: {main: {graph: A}}\ntaskz: {}\n", "unknown key 'taskz' in the file; did you mean"
                                               " 'tasks'?"),
    ("flows: {main: {graph: A, default: {}}}\n", "unknown key 'default' in flows.main; did you"
                                                 " mean 'defaults'?"),
    ("tasks: {A: {callable: 'tasks:A', timout_sec: 1}}\nflow: {graph: A}\n",
     "unknown key 'timout_sec' in tasks.A; did you mean 'timeout_sec'?"),
    ("tasks: {A: {callable: 'tasks.A'}}\nflow: {graph: A}\n", "must be \"module:function\""),
    ("tasks: {A: {callable: 'tasks:Nope'}}\nflow: {graph: A}\n", "module 'tasks' has no 'Nope'"),
    ("discovery: {glob_modules: [jobs/*.py]}\nflow: {graph: A}\n", "matches no .py file"),
    ("flows: {one: {graph: A}, two: {graph: B}}\n", "several flows: one, two; pick one with"
                                                    " --flow NAME"),
    ("flows: {main: {graph: A}\n", "not valid YAML"),
])
def test_yaml_file_mistakes_are_usage_errors_naming_the_key(tmp_path, text, message):
    write(tmp_path / "tasks.py", YAML_TASKS)
    (tmp_path / "flow.yaml").write_text(text, encoding="utf-8")
    done = yaml_cli(tmp_path, "run", "--config", "flow.yaml", "--store", "store")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.glob("ran-*"))


def test_a_top_level_flow_runs_tasks_by_callable_and_defaults_yield_to_params(tmp_path):
    write(tmp_path / "tasks.py", YAML_TASKS + '''\

def greet(ctx, who):
    print("hello " + who)
''')
    write(tmp_path / "flow.yaml", '''\
        tasks:
          A: {callable: "tasks:A"}
          greet: {callable: "tasks:greet", inputs: {who: "$ctx.params.who"}}
        flow:
          defaults: {who: world}
          graph: "flow >> A >> greet"
        ''')
    done = yaml_cli(tmp_path, "run", "flow.yaml", "--store", "store")
    assert done.returncode == 0 and "hello world" in done.stdout, done.stderr
    done = yaml_cli(tmp_path, "run", "flow.yaml", "--param", "who=carrot", "--store", "store")
    assert "hello carrot" in done.stdout and (tmp_path / "ran-A").exists()


def test_a_yaml_flow_without_pyyaml_exits_2_saying_pip_install_pyyaml(tmp_path):
    hide = tmp_path / "hide" / "yaml"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError(\"No module named 'yaml'\")\n")
    write(tmp_path / "tasks.py", YAML_TASKS)
    write(tmp_path / "flow.yaml", "discovery: {glob_modules: [tasks.py]}\nflow: {graph: A}\n")
    env = child_env(tmp_path / "hide")
    for args in (("run", "--config", "flow.yaml", "--store", "store"), ("check", "flow.yaml")):
        done = cli(tmp_path, *args, env=env)
        assert done.returncode == 2 and "pip install pyyaml" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "ran-A").exists()
    probe = run_python(tmp_path, "-c", "import pyoco, sys; print('yaml' in sys.modules)")
    assert probe.stdout.strip() == "False"


def test_run_and_check_need_one_flow_file_either_way(tmp_path):
    for args, message in ((("run",), "needs a flow: FLOW.py"),
                          (("check", "a.py", "--config", "b.yaml"), "give the flow file once")):
        done = cli(tmp_path, *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_yaml_examples_python_twin_runs_the_same_flow(yaml_example):
    done = cli(yaml_example, "run", "tasks.py", "-p", "rows=4", "--store", "store")
    assert done.returncode == 0, done.stderr
    assert "report: sold 4 carrots; pickled 4 carrots" in done.stdout
    record = RunStore(yaml_example / "store").list()[0]
    assert set(record["tasks"]) == {"plant", "water", "count", "sell", "pickle_them", "report"}


# ---------------------------------------------------------------------------
# The tutorial: helpers
# ---------------------------------------------------------------------------

TUT_EXAMPLES = HERE / "examples" / "tutorial"
TUT_DOCS = HERE / "docs" / "tutorial"


def tut_example(name):
    path = TUT_EXAMPLES / name
    assert path.is_file(), "missing example %s" % path
    return path


def tut_store(tmp_path):
    return tmp_path / "store"


def tut_run(tmp_path, name, *args, env=None, python_flags=()):
    """``python -m pyoco run examples/tutorial/NAME ARGS --store TMP/store``."""
    return cli(tmp_path, "run", tut_example(name), *args, "--store", tut_store(tmp_path),
               env=env, python_flags=python_flags)


def tut_record(tmp_path, run_id):
    """The run record, as ``pyoco runs show ID --json`` prints it."""
    proc = ok(cli(tmp_path, "runs", "show", run_id, "--json",
                  "--store", tut_store(tmp_path)))
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------
# The tutorial: pages and files stay in sync
# ---------------------------------------------------------------------------

TUT_FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
TUT_PAGES = ["index.md", "01-hello-flow.md", "02-params.md", "03-passing-data.md",
             "04-parallel.md", "05-artifacts.md", "06-errors.md", "07-tasks-and-plugins.md",
             "08-runs-and-resume.md", "09-watching.md", "10-flow-control.md",
             "11-incremental-runs.md"]

# Every example file, and the test that runs it (kept complete by a test below).
TUT_COVERED = {
    "s01_hello.py": "test_tut_s01_hello",
    "s02_params.py": "test_tut_params_from_the_command_line_reach_the_tasks_and_the_record",
    "s03_passing_data.py": "test_tut_outputs_flow_into_parameters_of_the_same_name",
    "s04_fanout.py": "test_tut_fan_out_runs_branches_together_and_the_join_after_them",
    "s04_map.py": "test_tut_map_runs_one_instance_per_row",
    "s05_artifacts.py": "test_tut_artifacts_are_files_in_the_run_folder",
    "s06_retries.py": "test_tut_retries_wait_longer_each_time_and_a_timeout_fails_the_task",
    "s06_fail_policy.py": "test_tut_isolate_skips_what_depends_on_a_failure_stop_skips_the_rest",
    "s06_skip.py": "test_tut_skip_ends_a_task_skipped_with_its_reason",
    "s06_async.py": "test_tut_async_tasks_overlap_and_a_timeout_interrupts_them",
    "s07_task_class.py": "test_tut_task_subclasses_are_nodes_named_by_their_name",
    "s07_plugin.py": "test_tut_a_pip_installed_plugin_task_runs_in_a_flow",
    "s08_resume.py": "test_tut_runs_list_show_and_resume_rerun_only_what_failed",
    "s08_ctrl_c.py": "test_tut_ctrl_c_cancels_the_run_and_resume_finishes_it",
    "s09_watched.py": "test_tut_serve_lists_runs_serves_metrics_and_runs_posted_flows",
    "s09_webhook_receiver.py": "test_tut_webhook_receiver_checks_each_signature",
    "s10_flow_control.py": "test_tut_pools_run_if_and_cleanup_of_the_flow_control_step",
    "s11_incremental.py": "test_tut_unchanged_tasks_are_reused_and_plan_says_what_will_run",
}


def tut_blocks(page):
    """(file named above the block or None, block text) for each ```python block."""
    text = page.read_text(encoding="utf-8")
    out = []
    for match in TUT_FENCE.finditer(text):
        before = [line for line in text[:match.start()].splitlines() if line.strip()]
        named = re.search(r"examples/tutorial/([\w.-]+\.py)", before[-1]) if before else None
        out.append((named.group(1) if named else None, match.group(1)))
    return out


def test_tut_pages_exist_in_order():
    assert TUT_DOCS.is_dir()
    found = sorted(p.name for p in TUT_DOCS.glob("*.md"))
    assert found == sorted(TUT_PAGES)
    index = (TUT_DOCS / "index.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((\d\d-[\w-]+\.md)\)", index)
    assert links == TUT_PAGES[1:], "index.md must link every step, in order"


def test_tut_flow_blocks_are_example_files():
    """Every ```python block that builds a Flow is byte-identical to the
    example file named just above it."""
    checked = 0
    for page in sorted(TUT_DOCS.glob("*.md")):
        for named, block in tut_blocks(page):
            if "Flow(" not in block:
                continue
            assert named, "%s: a flow block must name its file (examples/tutorial/NAME.py)" \
                          " on the line above it:\n%s" % (page.name, block[:200])
            path = TUT_EXAMPLES / named
            assert path.is_file(), "%s names %s, which does not exist" % (page.name, path)
            assert block.encode("utf-8") == path.read_bytes(), (
                "%s: the block for %s differs from the file; copy the file into the page"
                % (page.name, named))
            checked += 1
    assert checked >= 10


def test_tut_every_example_is_shown_and_tested():
    files = sorted(p.name for p in TUT_EXAMPLES.glob("*.py"))
    assert files == sorted(TUT_COVERED), "add new examples to TUT_COVERED and test them"
    shown = set()
    for page in TUT_DOCS.glob("*.md"):
        for named, block in tut_blocks(page):
            if named and (TUT_EXAMPLES / named).is_file() and \
                    block.encode("utf-8") == (TUT_EXAMPLES / named).read_bytes():
                shown.add(named)
    assert shown == set(files), "examples not shown verbatim on a page: %s" % (
        sorted(set(files) - shown))
    for name, test_name in TUT_COVERED.items():
        assert callable(globals().get(test_name)), "%s is not a test here" % test_name


def test_tut_files_and_tests_the_pages_name_exist():
    """A file named in backticks (`test_pyoco.py`, `python examples/...py`) is
    in the tree, and a test named there (`test_tut_s01_hello`) is a test here."""
    named = 0
    for page in TUT_DOCS.glob("*.md"):
        for span in re.findall(r"`([^`\n]+)`", page.read_text(encoding="utf-8")):
            for word in span.split():
                if word.endswith(".py") and not os.path.splitext(word)[0].isupper():
                    assert (HERE / word).is_file(), "%s names %s, which is not in the" \
                                                         " tree" % (page.name, word)
                    named += 1
                elif re.fullmatch(r"test_\w+", word):
                    assert callable(globals().get(word)), "%s names %s, which is not a test" \
                                                          " in test_pyoco.py" % (page.name, word)
                    named += 1
    assert named >= 10


def test_tut_relative_links_resolve():
    pages = list(TUT_DOCS.glob("*.md")) + [HERE / "docs" / "roadmap.md"]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), "%s links to missing %s" % (page.name,
                                                                                target)


def test_tut_examples_are_stdlib_and_pyoco_only():
    allowed_third_party = {"pyoco"}
    stdlib = set(getattr(sys, "stdlib_module_names", ())) or {
        "asyncio", "csv", "hashlib", "hmac", "http", "json", "os", "sqlite3", "sys", "time"}
    for path in TUT_EXAMPLES.glob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            found = re.match(r"\s*(?:from|import)\s+([\w]+)", line)
            if found:
                assert found.group(1) in stdlib | allowed_third_party, (path.name, line)


# ---------------------------------------------------------------------------
# The tutorial, step 1: hello flow
# ---------------------------------------------------------------------------

def test_tut_s01_hello(tmp_path):     # docs/tutorial/index.md names it
    proc = ok(tut_run(tmp_path, "s01_hello.py"))
    assert proc.stdout.splitlines() == ["🐇 yawn... good morning",
                                        "🥕 there is a carrot in the garden",
                                        "munch munch munch"]
    for line in ("🏃 start node=wake_up", "✅ done node=eat", "🥕 done flow=hello"):
        assert line in proc.stderr
    record = tut_record(tmp_path, run_id_of(proc.stderr))
    assert record["status"] == "COMPLETED"
    assert list(record["tasks"]) == ["wake_up", "find_carrot", "eat"]

    plain = ok(tut_run(tmp_path, "s01_hello.py", "--non-cute"))
    assert re.search(r"^\S+Z INFO done flow=hello status=COMPLETED duration_ms=\S+ run_id=\S+$",
                     plain.stderr, re.M), plain.stderr

    script = ok(run_python(tmp_path, tut_example("s01_hello.py")))
    assert "munch munch munch" in script.stdout and "🥕 done flow=hello" in script.stderr

    check = ok(cli(tmp_path, "check", tut_example("s01_hello.py")))
    assert check.stdout.strip() == "ok: flow hello, 3 tasks"
    graph = ok(cli(tmp_path, "graph", tut_example("s01_hello.py")))
    assert graph.stdout == ("flow hello (3 tasks)\n  wake_up\n  find_carrot <- wake_up\n"
                            "  eat <- find_carrot\n")
    mermaid = ok(cli(tmp_path, "graph", tut_example("s01_hello.py"),
                     "--format", "mermaid"))
    assert mermaid.stdout.splitlines()[0] == "flowchart TD"
    assert "    t1 --> t2" in mermaid.stdout


# ---------------------------------------------------------------------------
# The tutorial, step 2: params
# ---------------------------------------------------------------------------

def test_tut_params_from_the_command_line_reach_the_tasks_and_the_record(tmp_path):
    north = ok(tut_run(tmp_path, "s02_params.py", "-p", "garden=north"))
    assert "🐇 planning 3 rows in the north garden" in north.stdout
    assert "🥕 harvested 30 carrots (params: {'garden': 'north'})" in north.stdout

    south = ok(tut_run(tmp_path, "s02_params.py", "-p", "garden=south", "-p", "rows=5"))
    assert "🥕 harvested 50 carrots (params: {'garden': 'south', 'rows': 5})" in south.stdout
    assert tut_record(tmp_path, run_id_of(south.stderr))["params"] == {"garden": "south", "rows": 5}

    runs = tut_store(tmp_path) / "runs"
    before = sorted(os.listdir(str(runs)))
    missing = ok(tut_run(tmp_path, "s02_params.py"), code=2)
    assert "task 'plan' needs parameter 'garden' and nothing supplies it" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert sorted(os.listdir(str(runs))) == before, "checked before anything runs"

    check = ok(cli(tmp_path, "check", tut_example("s02_params.py")))
    assert "needs run parameter 'garden' (for task 'plan'): pass -p garden=..." in check.stdout

    bad = ok(tut_run(tmp_path, "s02_params.py", "-p", "garden=north", "-p", "rows=two"),
             code=1)
    assert "💥 error node=plan TypeError" in bad.stderr

    script = ok(run_python(tmp_path, tut_example("s02_params.py")))
    assert "planning 3 rows in the north garden" in script.stdout


# ---------------------------------------------------------------------------
# The tutorial, step 3: passing data
# ---------------------------------------------------------------------------

def test_tut_outputs_flow_into_parameters_of_the_same_name(tmp_path):
    proc = ok(tut_run(tmp_path, "s03_passing_data.py"))
    assert proc.stdout.strip() == "🐇 usagi picked 15 vegetables, 12 of them carrots 🥕"
    graph = ok(cli(tmp_path, "graph", tut_example("s03_passing_data.py")))
    assert "  report <- count, pick" in graph.stdout

    script = ok(run_python(tmp_path, tut_example("s03_passing_data.py")))
    assert script.stdout.splitlines()[-1] == "{'total': 15, 'carrots': 12}"

    # The two mistakes the page shows: a task name typo is caught before
    # anything runs, a key typo when the task starts.
    source = tut_example("s03_passing_data.py").read_text(encoding="utf-8")
    typo = tmp_path / "typo_task.py"
    typo.write_text(source.replace("$node.pick.output.picker", "$node.pik.output.picker"),
                    encoding="utf-8")
    check = ok(cli(tmp_path, "check", typo), code=1)
    assert ("problem: task 'report' input 'who': '$node.pik.output.picker' refers to task"
            " 'pik', which is not in the flow") in check.stdout
    typo = tmp_path / "typo_key.py"      # another file: no stale bytecode cache
    typo.write_text(source.replace("output.basket.carrots", "output.basket.carots"),
                    encoding="utf-8")
    proc = ok(cli(tmp_path, "run", typo, "--store", tut_store(tmp_path)), code=1)
    assert ("💥 error node=report LookupError: $node.pick.output.basket.carots:"
            " no 'carots' in dict value") in proc.stderr


# ---------------------------------------------------------------------------
# The tutorial, step 4: fan-out, join and map
# ---------------------------------------------------------------------------

def test_tut_fan_out_runs_branches_together_and_the_join_after_them(tmp_path):
    proc = ok(tut_run(tmp_path, "s04_fanout.py"))
    assert "🥕 sunny sky, moist soil: planting 24 seeds" in proc.stdout
    record = tut_record(tmp_path, run_id_of(proc.stderr))
    errands = [record["tasks"][n] for n in ("check_weather", "check_soil", "count_seeds")]
    # They overlapped: each started before any of them ended.
    assert max(t["started_at"] for t in errands) < min(t["ended_at"] for t in errands)
    plant = record["tasks"]["plant"]
    assert plant["started_at"] >= max(t["ended_at"] for t in errands)

    script = ok(run_python(tmp_path, tut_example("s04_fanout.py")))
    assert re.search(r"^all done in 0\.\d s$", script.stdout, re.M), script.stdout


def test_tut_map_runs_one_instance_per_row(tmp_path):
    proc = ok(tut_run(tmp_path, "s04_map.py"))
    assert "🐇 3 rows, 30 carrots in all" in proc.stdout
    for n, carrots in ((1, 5), (2, 10), (3, 15)):
        assert "🥕 row %d gave %d carrots" % (n, carrots) in proc.stdout
    record = tut_record(tmp_path, run_id_of(proc.stderr))
    assert task_states(record) == {name: "SUCCEEDED" for name in (
        "list_rows", "harvest_row", "weigh", "harvest_row[0]", "harvest_row[1]",
        "harvest_row[2]")}

    five = ok(tut_run(tmp_path, "s04_map.py", "-p", "rows=5"))
    assert "🐇 5 rows, 75 carrots in all" in five.stdout
    none = ok(tut_run(tmp_path, "s04_map.py", "-p", "rows=0"))
    assert "🐇 0 rows, 0 carrots in all" in none.stdout
    assert "harvest_row[0]" not in none.stderr

    script = ok(run_python(tmp_path, tut_example("s04_map.py")))
    assert "🐇 3 rows, 30 carrots in all" in script.stdout


@needs_pty
def test_tut_map_in_a_terminal_is_a_few_progress_lines(tmp_path):
    """What the page shows in a terminal: a final line for the map instead of
    lines per instance, and every instance's lines with --progress off."""
    def terminal(*args, stdout=None):
        code, received = pty_run(tmp_path, "run", tut_example("s04_map.py"), *args, "--store",
                                 tut_store(tmp_path), env=child_env(TERM="xterm"), stdout=stdout)
        assert code == 0, received
        rows = screen_of(received)
        assert rows[-1] == ""
        return rows[:-1]
    took = r" \(\d+\.\d\d m?s\)"
    rows = terminal()
    start, done = [row for row in rows if "node=harvest_row" in row]
    assert start == "🏃 start node=harvest_row"
    assert re.fullmatch("✅ done node=harvest_row 3/3" + took, done), rows
    between = rows[rows.index(start) + 1:rows.index(done)]
    assert sorted(between) == ["🥕 row %d gave %d carrots" % (n, 5 * n) for n in (1, 2, 3)]

    rows = terminal("-p", "rows=2000", stdout=subprocess.DEVNULL)
    expected = [r"🐇 pyoco > start flow=harvest run_id=\S+", "🏃 start node=list_rows",
                "✅ done node=list_rows" + took, "🏃 start node=harvest_row",
                "✅ done node=harvest_row 2000/2000" + took, "🏃 start node=weigh",
                "✅ done node=weigh" + took, "🥕 done flow=harvest"]
    assert len(rows) == len(expected), rows
    for pattern, row in zip(expected, rows):
        assert re.fullmatch(pattern, row), (pattern, row)

    rows = terminal("--progress", "off")
    for n in range(3):
        assert "🏃 start node=harvest_row[%d]" % n in rows
        assert any(re.fullmatch(re.escape("✅ done node=harvest_row[%d]" % n) + took, row)
                   for row in rows)


# ---------------------------------------------------------------------------
# The tutorial, step 5: artifacts and scratch
# ---------------------------------------------------------------------------

def test_tut_artifacts_are_files_in_the_run_folder(tmp_path):
    proc = ok(tut_run(tmp_path, "s05_artifacts.py"))
    assert "🥕 2997 carrots; artifacts: ['harvest.csv', 'report.txt']" in proc.stdout
    run_id = run_id_of(proc.stderr)
    record = tut_record(tmp_path, run_id)
    folder = tut_store(tmp_path) / "runs" / run_id / "artifacts"
    csv_path = Path(record["tasks"]["measure"]["artifacts"]["harvest.csv"])
    report_path = Path(record["tasks"]["report"]["artifacts"]["report.txt"])
    assert csv_path.resolve() == (folder / "harvest.csv").resolve()
    assert report_path.read_text(encoding="utf-8") == "carrots: 2997\n"
    assert len(csv_path.read_text(encoding="utf-8").splitlines()) == 1001

    script = ok(run_python(tmp_path, tut_example("s05_artifacts.py")))
    last = script.stdout.splitlines()[-1]
    assert last.startswith("the report is at ") and last.endswith("report.txt")
    assert Path(last[len("the report is at "):]).read_text(encoding="utf-8") == "carrots: 2997\n"


# ---------------------------------------------------------------------------
# The tutorial, step 6: errors, retries, timeouts, fail policies, skip, async
# ---------------------------------------------------------------------------

def test_tut_retries_wait_longer_each_time_and_a_timeout_fails_the_task(tmp_path):
    proc = ok(tut_run(tmp_path, "s06_retries.py"))
    assert "🔁 retry node=dig attempt=2/3 in 0.1s" in proc.stderr
    assert "🔁 retry node=dig attempt=3/3 in 0.2s" in proc.stderr
    assert "🐇 napped 0.1s in a cosy burrow" in proc.stdout
    record = tut_record(tmp_path, run_id_of(proc.stderr))
    assert record["tasks"]["dig"]["attempts"] == 3
    retries = [e for e in record["events"] if e["event"] == "task.retrying"]
    assert retries[0]["error"] == "ConnectionError: the ground is frozen (attempt 1)"

    slow = ok(tut_run(tmp_path, "s06_retries.py", "-p", "nap=2"), code=1)
    assert "💥 error node=nap TimeoutError: task 'nap' timed out after 1s" in slow.stderr
    nap = tut_record(tmp_path, run_id_of(slow.stderr))["tasks"]["nap"]
    assert nap["state"] == "FAILED" and nap["duration_ms"] < 1900, nap

    script = ok(run_python(tmp_path, tut_example("s06_retries.py")))
    assert "napped 0.1s" in script.stdout


def test_tut_isolate_skips_what_depends_on_a_failure_stop_skips_the_rest(tmp_path):
    isolate = ok(tut_run(tmp_path, "s06_fail_policy.py"), code=1)
    assert "🥕 cooking 12 carrots" in isolate.stdout
    assert "⏭️ skip node=wash_lettuce (upstream 'pick_lettuce' failed)" in isolate.stderr
    record = tut_record(tmp_path, run_id_of(isolate.stderr))
    assert record["status"] == "FAILED"
    assert task_states(record) == {"pick_lettuce": "FAILED", "wash_lettuce": "SKIPPED",
                                  "pick_carrots": "SUCCEEDED", "cook_carrots": "SUCCEEDED"}
    assert record["tasks"]["pick_lettuce"]["error"] == "ValueError: a snail ate the lettuce 🐌"

    stop = ok(tut_run(tmp_path, "s06_fail_policy.py",
                      env=child_env(LETTUCE_POLICY="stop")), code=1)
    assert "cooking" not in stop.stdout
    record = tut_record(tmp_path, run_id_of(stop.stderr))
    assert record["tasks"]["cook_carrots"]["state"] == "SKIPPED"
    assert record["tasks"]["cook_carrots"]["reason"] == "run stopped after 'pick_lettuce' failed"

    script = run_python(tmp_path, tut_example("s06_fail_policy.py"))
    assert script.returncode == 1 and "RunFailed" in script.stderr, explain(script)


def test_tut_skip_ends_a_task_skipped_with_its_reason(tmp_path):
    sunny = ok(tut_run(tmp_path, "s06_skip.py"))
    assert "💧 watering the carrots" in sunny.stdout and "📒 used 20 litres" in sunny.stdout

    rainy = ok(tut_run(tmp_path, "s06_skip.py", "-p", "weather=rainy"))
    assert "💧" not in rainy.stdout
    assert "🥕 picking carrots on a rainy day" in rainy.stdout
    assert "⏭️ skip node=water_garden (it rained, the garden is wet already)" in rainy.stderr
    record = tut_record(tmp_path, run_id_of(rainy.stderr))
    assert record["status"] == "COMPLETED"
    assert task_states(record) == {"forecast": "SUCCEEDED", "water_garden": "SKIPPED",
                                  "log_watering": "SKIPPED", "pick_carrots": "SUCCEEDED"}
    assert record["tasks"]["water_garden"]["reason"] == "it rained, the garden is wet already"
    assert record["tasks"]["log_watering"]["reason"] == "upstream 'water_garden' skipped"

    script = ok(run_python(tmp_path, tut_example("s06_skip.py")))
    assert "rainy day" in script.stdout and "skip node=water_garden" in script.stderr


def test_tut_async_tasks_overlap_and_a_timeout_interrupts_them(tmp_path):
    proc = ok(tut_run(tmp_path, "s06_async.py"))
    assert proc.stdout.splitlines() == ["🐇 owl says sunny", "🐇 fox says sunny",
                                        "🐇 hedgehog says sunny"]
    asked = tut_record(tmp_path, run_id_of(proc.stderr))["tasks"]["ask_neighbours"]
    assert asked["duration_ms"] < 500, "the three 0.2 s questions must overlap: %s" % asked

    slow = ok(tut_run(tmp_path, "s06_async.py", "-p", "delay=5"), code=1)
    assert ("💥 error node=ask_neighbours TimeoutError: task 'ask_neighbours' timed out"
            " after 1s") in slow.stderr
    for name in ("owl", "fox", "hedgehog"):     # the coroutine really was cancelled
        assert "🦔 %s was interrupted" % name in slow.stdout
    asked = tut_record(tmp_path, run_id_of(slow.stderr))["tasks"]["ask_neighbours"]
    assert asked["duration_ms"] < 4000

    script = ok(run_python(tmp_path, tut_example("s06_async.py")))
    assert "🐇 hedgehog says sunny" in script.stdout


# ---------------------------------------------------------------------------
# The tutorial, step 7: Task subclasses and plugins
# ---------------------------------------------------------------------------

def test_tut_task_subclasses_are_nodes_named_by_their_name(tmp_path):
    proc = ok(tut_run(tmp_path, "s07_task_class.py"))
    assert proc.stdout.strip() == "🥕 carrots: 3, radishes: 2"
    record = tut_record(tmp_path, run_id_of(proc.stderr))
    assert list(record["tasks"]) == ["basket", "count_carrot", "count_radish", "tally"]
    script = ok(run_python(tmp_path, tut_example("s07_task_class.py")))
    assert "🥕 carrots: 3, radishes: 2" in script.stdout


def test_tut_a_pip_installed_plugin_task_runs_in_a_flow(tmp_path, plug_demo_target):
    # Without the plugin (and without site-packages, where someone may have
    # installed it) the flow file does not load: a usage error naming the line.
    missing = ok(tut_run(tmp_path, "s07_plugin.py", python_flags=("-S",)), code=2)
    assert "no plugin task 'shout'" in missing.stderr and "s07_plugin.py:16" in missing.stderr

    env = child_env(plug_demo_target)
    listed = ok(cli(tmp_path, "plugins", "list", env=env))
    for name in ("reverse", "shout", "word_count"):
        assert re.search(r"^%s\s+pyoco-plugin-demo\s+1\.0\.0\s+task" % name, listed.stdout,
                         re.M), listed.stdout
    proc = ok(tut_run(tmp_path, "s07_plugin.py", "-p", "text=carrots are crunchy",
                      env=env))
    assert proc.stdout.strip() == "🐇 CARROTS ARE CRUNCHY!!! / yhcnurc era storrac / 3 words"
    record = tut_record(tmp_path, run_id_of(proc.stderr))
    assert set(record["tasks"]) == {"text", "shout", "backwards", "word_count", "show"}

    script = ok(run_python(tmp_path, tut_example("s07_plugin.py"), env=env))
    assert "🐇 HELLO CARROT!!! / torrac olleh / 2 words" in script.stdout


# ---------------------------------------------------------------------------
# The tutorial, step 8: run history, Ctrl+C and --resume
# ---------------------------------------------------------------------------

def test_tut_runs_list_show_and_resume_rerun_only_what_failed(tmp_path):
    store = tut_store(tmp_path)
    failed = ok(tut_run(tmp_path, "s08_resume.py", env=child_env(GARDEN_FROZEN="1")),
                code=1)
    assert "💥 error node=plant RuntimeError: the ground is frozen ❄️" in failed.stderr
    first = run_id_of(failed.stderr)

    listing = ok(cli(tmp_path, "runs", "list", "--store", store))
    assert re.search(r"^%s\s+spring\s+FAILED\s.*failed: plant$" % first, listing.stdout,
                     re.M), listing.stdout
    show = ok(cli(tmp_path, "runs", "show", first, "--store", store))
    assert re.search(r"^plant\s+FAILED\s+1\s.*RuntimeError: the ground is frozen",
                     show.stdout, re.M), show.stdout
    assert "--- plant ---" in show.stdout and "Traceback" in show.stdout
    logs = ok(cli(tmp_path, "runs", "logs", first, "--store", store))
    assert re.search(r"buy_seeds stdout \| 🛒 buying seeds", logs.stdout), logs.stdout

    resumed = ok(tut_run(tmp_path, "s08_resume.py", "--resume", first))
    second = run_id_of(resumed.stderr)
    assert "♻️ reuse node=buy_seeds (run %s)" % first in resumed.stderr
    assert "buying seeds" not in resumed.stdout         # the costly task did not run again
    assert "🌱 planted 3 kinds of carrots" in resumed.stdout
    record = tut_record(tmp_path, second)
    assert record["status"] == "COMPLETED" and record["resumed_from"] == first
    ran = {name for name, t in record["tasks"].items() if t["attempts"] > 0}
    assert ran == {"plant", "water"}, "only the failed task and what follows it re-run"
    assert record["tasks"]["buy_seeds"]["reason"] == "output reused from run %s" % first
    logs = ok(cli(tmp_path, "runs", "logs", second, "--store", store))
    assert "plant log | INFO planted nantes, chantenay, imperator" in logs.stdout
    task_logs = ok(cli(tmp_path, "runs", "logs", second, "--task", "water",
                       "--store", store))
    assert task_logs.stdout.strip().endswith("water stdout | 💧 watered 3 rows")

    again = ok(tut_run(tmp_path, "s08_resume.py", "--resume", second), code=2)
    assert "only FAILED or CANCELLED runs can be resumed" in again.stderr

    script = ok(run_python(tmp_path, tut_example("s08_resume.py")))
    assert "💧 watered 3 rows" in script.stdout


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a child process is POSIX only")
def test_tut_ctrl_c_cancels_the_run_and_resume_finishes_it(tmp_path, spawn):
    proc = spawn(tmp_path, "run", tut_example("s08_ctrl_c.py"), "--store", tut_store(tmp_path),
                 PYTHONUNBUFFERED="1")
    proc.wait_for(r"^🐇 digging 100 metres$")
    proc.proc.send_signal(signal.SIGINT)                # what Ctrl+C sends
    assert proc.wait() == 130
    trace = proc.text("stderr")
    assert "🛑 cancel flow=tunnel" in trace and "🛑 cancelled flow=tunnel" in trace
    first = re.search(r"run_id=(\S+)", trace).group(1)
    record = tut_record(tmp_path, first)
    assert record["status"] == "CANCELLED" and record["reason"] == "SIGINT received"
    dig = record["tasks"]["dig_tunnel"]
    assert dig["state"] == "FAILED" and dig["error"].startswith("InterruptedError: stopped after")
    assert record["tasks"]["move_in"]["state"] == "CANCELLED"

    resumed = ok(tut_run(tmp_path, "s08_ctrl_c.py", "--resume", first, "-p", "metres=3"))
    assert "🏡 moved into a 3 metre tunnel" in resumed.stdout
    record = tut_record(tmp_path, run_id_of(resumed.stderr))
    assert record["resumed_from"] == first and record["status"] == "COMPLETED"
    assert record["tasks"]["dig_tunnel"]["attempts"] == 1       # it ran again, not reused


# ---------------------------------------------------------------------------
# The tutorial, step 9: pyoco serve and webhooks
# ---------------------------------------------------------------------------

def test_tut_serve_lists_runs_serves_metrics_and_runs_posted_flows(tmp_path, spawn):
    store = tut_store(tmp_path)
    good = ok(tut_run(tmp_path, "s09_watched.py", "-p", "carrots=5"))
    assert "🐇 5 carrots for 10 friends" in good.stdout
    bad = ok(tut_run(tmp_path, "s09_watched.py", "-p", "carrots=0"), code=1)
    assert "💥 error node=count ValueError: the basket is empty" in bad.stderr
    script = ok(run_python(tmp_path, tut_example("s09_watched.py")))
    assert "🐇 3 carrots for 6 friends" in script.stdout

    server = spawn(tmp_path, "serve", "--port", "0", "--store", store,
                   tut_example("s09_watched.py"), PYTHONUNBUFFERED="1")
    try:
        url = server.wait_for(r"^pyoco serve: listening on (http://127\.0\.0\.1:\d+) "
                              r"\(store .*; flows: snack\)$").group(1)

        status, body = srv_json(url, "GET", "/healthz")
        assert status == 200 and body["status"] == "ok"

        status, runs = srv_json(url, "GET", "/runs")
        assert status == 200
        assert [(r["run_id"], r["status"]) for r in runs] == [
            (run_id_of(bad.stderr), "FAILED"), (run_id_of(good.stderr), "COMPLETED")]
        assert "events" not in runs[0]
        status, runs = srv_json(url, "GET", "/runs?status=FAILED&limit=5")
        assert [r["tasks"]["count"]["error"] for r in runs] == [
            "ValueError: the basket is empty"]
        status, body = srv_json(url, "GET", "/runs?status=failed")
        assert status == 400 and "unknown status 'failed'" in body["error"]

        status, _, metrics = srv_request(url, "GET", "/metrics")
        metrics = metrics.decode("utf-8")
        assert status == 200
        for line in ('pyoco_runs_total{flow="snack",status="COMPLETED"} 1',
                     'pyoco_runs_total{flow="snack",status="FAILED"} 1',
                     'pyoco_runs_in_progress{flow="snack"} 0',
                     'pyoco_tasks_total{flow="snack",task="share",state="SKIPPED"} 1'):
            assert line in metrics.splitlines(), metrics
        assert re.search(r'^pyoco_last_run_timestamp_seconds\{flow="snack",status="COMPLETED"\}'
                         r' \d+(\.\d+)?$', metrics, re.M)

        status, answer = srv_json(url, "POST", "/runs", {"flow": "snack", "params": {"carrots": 4}})
        assert status == 202 and answer["status"] == "RUNNING"
        server.wait_for(r"^🥕 done flow=snack$", stream="stderr")     # the server ran it
        wait_until(lambda: srv_json(url, "GET", "/runs/" + answer["run_id"])[1].get("status")
                   == "COMPLETED", what="its record, saved just after")
        status, body = srv_json(url, "GET", "/runs/%s/logs" % answer["run_id"])
        assert [line["text"] for line in body["logs"]] == ["🐇 4 carrots for 8 friends"]
    finally:
        assert server.stop() == 0


def test_tut_webhook_receiver_checks_each_signature(tmp_path, spawn):
    secret = "carrot-cake"
    out = spawn(tmp_path, tut_example("s09_webhook_receiver.py"), "0", module=None,
                PYOCO_WEBHOOK_SECRET=secret, PYTHONUNBUFFERED="1")
    url = out.wait_for(r"^listening on (http://127\.0\.0\.1:\d+/hook)$").group(1)
    env = child_env(PYOCO_WEBHOOK_URL=url, PYOCO_WEBHOOK_SECRET=secret)
    ok(tut_run(tmp_path, "s09_watched.py", env=env))
    out.wait_for(r"^📬 run\.completed flow=snack status=COMPLETED tasks: count=SUCCEEDED,"
                 r" share=SUCCEEDED \(signature ok\)$")
    bad = ok(tut_run(tmp_path, "s09_watched.py", "-p", "carrots=0", env=env), code=1)
    out.wait_for(r"^📬 run\.failed flow=snack status=FAILED tasks: count=FAILED,"
                 r" share=SKIPPED \(signature ok\)$")
    # A wrong secret on the sending side shows up at the receiver.
    ok(tut_run(tmp_path, "s09_watched.py",
               env=child_env(PYOCO_WEBHOOK_URL=url, PYOCO_WEBHOOK_SECRET="wrong")))
    out.wait_for(r"^📬 run\.completed .*\(BAD SIGNATURE\)$")
    events = tut_record(tmp_path, run_id_of(bad.stderr))["events"]
    delivered = [e for e in events if e["event"] == "webhook.delivered"]
    assert len(delivered) == 1 and delivered[0]["status_code"] == 204, events


# ---------------------------------------------------------------------------
# The tutorial, step 10: pools, conditions and cleanup
# ---------------------------------------------------------------------------

def test_tut_pools_run_if_and_cleanup_of_the_flow_control_step(tmp_path):
    good = ok(tut_run(tmp_path, "s10_flow_control.py"))
    assert "🥕 new prices: nantes 60¢, chantenay 90¢, danvers 70¢, imperator 90¢" in good.stdout
    assert "🧹 baskets put away" in good.stdout and "telling the gardener" not in good.stdout
    assert ("⏭️ skip node=alert (run_if='any_failed' not met: 'price' succeeded,"
            " 'compare' succeeded, 'publish' succeeded)") in good.stderr
    failed = ok(tut_run(tmp_path, "s10_flow_control.py", "-p", "flaky=true"), code=1)
    assert "💥 error node=price[2] ConnectionError: the market hung up" in failed.stderr
    assert "📣 something failed: telling the gardener" in failed.stdout
    assert "🧹 baskets put away" in failed.stdout
    assert "⏭️ skip node=publish (run stopped after 'price[2]' failed)" in failed.stderr
    one = ok(tut_run(tmp_path, "s10_flow_control.py", "--pool", "market=1"))
    assert "🧹 baskets put away" in one.stdout
    graph = ok(cli(tmp_path, "graph", str(TUT_EXAMPLES / "s10_flow_control.py")))
    page = (TUT_DOCS / "10-flow-control.md").read_text(encoding="utf-8")
    assert graph.stdout in page, graph.stdout


# ---------------------------------------------------------------------------
# The tutorial, step 11: incremental runs
# ---------------------------------------------------------------------------

def test_tut_unchanged_tasks_are_reused_and_plan_says_what_will_run(tmp_path):
    first = ok(tut_run(tmp_path, "s11_incremental.py", "-p", "rows=3"))
    assert "🧺 harvesting 3 rows" in first.stdout and "⚖️ 2.9 kg" in first.stdout
    origin = run_id_of(first.stderr)
    again = ok(tut_run(tmp_path, "s11_incremental.py", "-p", "rows=3"))
    assert "harvesting" not in again.stdout and "⚖️" not in again.stdout
    assert "📣 today's harvest: 2.9 kg of carrots" in again.stdout
    for name in ("harvest", "weigh"):
        assert "♻️ reuse node=%s (run %s)" % (name, origin) in again.stderr
    record = tut_record(tmp_path, run_id_of(again.stderr))
    assert record["tasks"]["weigh"]["reused_from"] == origin
    assert record["tasks"]["announce"]["reused_from"] is None

    plan = ok(tut_run(tmp_path, "s11_incremental.py", "-p", "rows=4", "--plan"))
    rows = [line.split(None, 2) for line in plan.stdout.splitlines()[1:]]
    assert rows == [
        ["run", "harvest", "input 'rows' changed since run %s" % run_id_of(again.stderr)],
        ["depends", "weigh", "upstream 'harvest' runs: decided when it returns"],
        ["run", "announce", "cache=False"]]
    assert len(os.listdir(tut_store(tmp_path) / "runs")) == 2   # the plan wrote nothing
    invalid = ok(tut_run(tmp_path, "s11_incremental.py", "--plan"), code=2)
    assert "needs parameter 'rows'" in invalid.stderr and "Traceback" not in invalid.stderr

    only = ok(tut_run(tmp_path, "s11_incremental.py", "--only", "harvest", "-p", "rows=5"))
    assert "🧺 harvesting 5 rows" in only.stdout and "⚖️" not in only.stdout
    assert "⏭️ skip node=announce (not selected)" in only.stderr
    as_json = json.loads(ok(tut_run(tmp_path, "s11_incremental.py", "-p", "rows=5",
                                        "--plan", "--json")).stdout)
    assert as_json[0] == {"task": "harvest", "action": "reuse", "reused_from": run_id_of(only.stderr),
                          "reason": "same code and inputs as run %s" % run_id_of(only.stderr)}

    script = ok(run_python(tmp_path, tut_example("s11_incremental.py")))
    assert "🧪 the flow weighs 100 carrots as 8.0 kg" in script.stdout
    assert "harvesting" not in script.stdout


# ---------------------------------------------------------------------------
# The README's examples
# ---------------------------------------------------------------------------

def test_readme_python_examples_run_in_order(tmp_path):
    """The README's code blocks, run one after the other in one namespace."""
    text = (HERE / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    script = "\n".join(blocks).replace('if __name__ == "__main__":', "if True:")
    done = run_python(tmp_path, "-c", script, PYOCO_CUTE="0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "✨ Saved: CARROT" in done.stdout
    assert "COMPLETED {'fetch': [1, 2, 3], 'total': 6, 'Upload': 'uploaded 6'}" in done.stdout


def test_scheduled_report_example_checks_and_runs(tmp_path):
    example = HERE / "examples" / "scheduled_report.py"
    report = json.loads(cli(tmp_path, "check", example, "--json").stdout)
    assert report["ok"] and report["schedule"] == "30 6 * * mon-fri"
    for stamp in report["next_runs"]:                   # 06:30 in Tokyo, Monday to Friday
        day = time.gmtime(sch_ts(stamp[:19] + "Z") + 9 * 3600)
        assert (day.tm_hour, day.tm_min, day.tm_wday < 5) == (6, 30, True)
    done = cli(tmp_path, "run", example, "--store", tmp_path / "store")
    assert done.returncode == 0, done.stderr
    record = RunStore(tmp_path / "store").list()[0]
    assert record["status"] == "COMPLETED" and record["scheduled_for"] is None
    assert "report.txt" in record["tasks"]["write_report"]["artifacts"]
    assert "docs/scheduling.md" in (HERE / "README.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# pyoco runs list / show / logs
# ---------------------------------------------------------------------------

STORE_ALPHA_FLOW = hello_flow("alpha", "hello from alpha")

STORE_BETA_FLOW = """\
    from pyoco import task, Flow

    @task
    def fine(ctx):
        return 1

    @task
    def boom_task(ctx, fine):
        raise KeyError("boom")

    flow = Flow(name="beta")
    flow >> fine >> boom_task
"""


@pytest.fixture(scope="module")
def store_history(tmp_path_factory):
    """A store with three runs, oldest first: alpha COMPLETED, beta FAILED, alpha COMPLETED."""
    folder = tmp_path_factory.mktemp("history")
    write(folder / "alpha.py", STORE_ALPHA_FLOW)
    write(folder / "beta.py", STORE_BETA_FLOW)
    ids = []
    for name, code in (("alpha.py", 0), ("beta.py", 1), ("alpha.py", 0)):
        result = cli(folder, "run", name, plain=True)
        assert result.returncode == code, result.stderr
        ids.append(run_id_of(result.stderr))
    return folder, ids


def store_listed_ids(folder, *args):
    result = cli(folder, "runs", "list", "--json", *args, plain=True)
    assert result.returncode == 0, result.stderr
    return [r["run_id"] for r in json.loads(result.stdout)]


def test_runs_list_table_shows_runs_newest_first(store_history):
    folder, (a1, b, a2) = store_history
    result = cli(folder, "runs", "list", plain=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "RUN ID" in lines[0] and "STATUS" in lines[0] and "FLOW" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == [a2, b, a1]
    assert re.search(r"^%s\s+beta\s+FAILED\b.*boom_task" % b, result.stdout, re.M)
    assert re.search(r"^%s\s+alpha\s+COMPLETED\b" % a1, result.stdout, re.M)


def test_runs_list_json_is_a_bare_list_of_records_without_events(store_history):
    folder, (a1, b, a2) = store_history
    result = cli(folder, "runs", "list", "--json", plain=True)
    records = json.loads(result.stdout)
    assert isinstance(records, list)
    assert [r["run_id"] for r in records] == [a2, b, a1]
    for record in records:
        assert set(record) >= RUN_KEYS - {"events"}
        assert "events" not in record
    assert [r["status"] for r in records] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert records[1]["tasks"]["boom_task"]["error"] == "KeyError: 'boom'"


@pytest.mark.parametrize("args, expected", [
    (("--status", "FAILED"), [1]),
    (("--status", "COMPLETED"), [2, 0]),
    (("--flow", "alpha"), [2, 0]),
    (("--flow", "beta"), [1]),
    (("--limit", "1"), [2]),
    (("--limit", "2"), [2, 1]),
    (("--flow", "alpha", "--status", "FAILED"), []),
    (("--flow", "nobody"), []),
])
def test_runs_list_filters_by_status_flow_and_limit(store_history, args, expected):
    folder, ids = store_history
    assert store_listed_ids(folder, *args) == [ids[i] for i in expected]


def test_runs_list_table_with_no_match_says_so(store_history):
    folder, _ = store_history
    result = cli(folder, "runs", "list", "--flow", "nobody", plain=True)
    assert result.returncode == 0
    assert "no runs" in result.stdout


@pytest.mark.parametrize("args", [("--limit", "0"), ("--status", "BOGUS"), ("--limit", "x")])
def test_runs_list_bad_options_exit_2(store_history, args):
    folder, _ = store_history
    result = cli(folder, "runs", "list", *args, plain=True)
    assert result.returncode == 2
    assert result.stderr.strip()
    no_traceback(result)


def test_runs_show_table_names_tasks_states_and_the_traceback(store_history):
    folder, (_, b, _) = store_history
    result = cli(folder, "runs", "show", b, plain=True)
    assert result.returncode == 0, result.stderr
    assert b in result.stdout and "beta" in result.stdout and "FAILED" in result.stdout
    assert re.search(r"^fine\s+SUCCEEDED\b", result.stdout, re.M)
    assert re.search(r"^boom_task\s+FAILED\s+1\b.*KeyError", result.stdout, re.M)
    assert "Traceback" in result.stdout and 'raise KeyError("boom")' in result.stdout


def test_runs_show_json_is_the_full_record(store_history):
    folder, (_, b, _) = store_history
    result = cli(folder, "runs", "show", b, "--json", plain=True)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record == RunStore(folder / ".pyoco").get(b)
    assert set(record) >= RUN_KEYS
    assert record["events"][-1]["event"] == "run.failed"


def test_runs_logs_shows_what_the_run_printed(store_history):
    folder, (a1, _, _) = store_history
    result = cli(folder, "runs", "logs", a1, "--task", "hello", plain=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"hello stdout \| hello from alpha$", result.stdout, re.M)


@pytest.mark.parametrize("args", [("--task", "nobody"), ("--tail", "0")])
def test_runs_logs_with_an_unknown_task_or_bad_tail_exits_2(store_history, args):
    folder, (a1, _, _) = store_history
    result = cli(folder, "runs", "logs", a1, *args, plain=True)
    assert result.returncode == 2
    assert args[1] in result.stderr
    no_traceback(result)


@pytest.mark.parametrize("args", [("runs", "list"), ("runs", "list", "--json")])
def test_runs_output_into_a_closed_pipe_is_not_a_traceback(store_history, args):
    folder, _ = store_history
    proc = subprocess.Popen([sys.executable, "-m", "pyoco"] + list(args), cwd=str(folder),
                            env=child_env(plain=True), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8")
    proc.stdout.close()                 # the reader is gone before pyoco writes a thing
    err = proc.stderr.read()
    proc.wait(WAIT)
    proc.stderr.close()
    assert "Traceback" not in err, err


@pytest.mark.parametrize("run_id", ["../etc", "..", "a/b", STORE_UNKNOWN_ID])
@pytest.mark.parametrize("command", ["show", "logs", "cancel", "resume"])
def test_bad_or_unknown_run_id_exits_2_with_a_message_not_a_traceback(tmp_path, command,
                                                                      run_id):
    if command == "resume":
        store_signal_flow(tmp_path)
        args = ("run", "signal_flow.py", "-p", "mode=quick", "--resume", run_id)
    else:
        args = ("runs", command, run_id)
    result = cli(tmp_path, *args, plain=True)
    assert result.returncode == 2
    assert run_id in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    no_traceback(result)
    assert "AFTER RAN" not in result.stdout


# ===========================================================================
# The pyoco.core.* names of the original package
# ===========================================================================


# ---------------------------------------------------------------------------
# The original README example and the pyoco.core.* names
# ---------------------------------------------------------------------------

HELLO_EXAMPLE = '''\
from pyoco import task
from pyoco.core.models import Flow
from pyoco.core.engine import Engine

@task
def fetch_data(ctx):
    print("🐰 Fetching data...")
    return {"id": 1, "value": "carrot"}

@task
def process_data(ctx, data):
    print(f"🥕 Processing: {data['value']}")
    return data['value'].upper()

@task
def save_result(ctx, result):
    print(f"✨ Saved: {result}")

# Define the flow
flow = Flow(name="hello_pyoco")
flow >> fetch_data >> process_data >> save_result

# Wire inputs (explicitly for this example)
process_data.task.inputs = {"data": "$node.fetch_data.output"}
save_result.task.inputs = {"result": "$node.process_data.output"}

if __name__ == "__main__":
    engine = Engine()
    engine.run(flow)
'''


def test_original_readme_example_runs_as_a_script(tmp_path):
    script = tmp_path / "hello_pyoco.py"
    script.write_text(HELLO_EXAMPLE, encoding="utf-8")
    proc = run_python(tmp_path, script, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "✨ Saved: CARROT" in proc.stdout.splitlines()
    expected = [
        r"🐇 pyoco > start flow=hello_pyoco run_id=\S+",
        r"🏃 start node=fetch_data", r"✅ done node=fetch_data \(\d+\.\d\d m?s\)",
        r"🏃 start node=process_data", r"✅ done node=process_data \(\d+\.\d\d m?s\)",
        r"🏃 start node=save_result", r"✅ done node=save_result \(\d+\.\d\d m?s\)",
        r"🥕 done flow=hello_pyoco",
    ]
    lines = proc.stderr.splitlines()
    assert len(lines) == len(expected), proc.stderr
    for pattern, line in zip(expected, lines):
        assert re.fullmatch(pattern, line), (pattern, line)


def test_shipped_hello_example_matches_the_original_readme_example():
    shipped = HERE / "examples" / "hello_pyoco.py"
    if not shipped.exists():
        pytest.skip("examples/hello_pyoco.py is not shipped next to the tests")
    assert shipped.read_text(encoding="utf-8") == HELLO_EXAMPLE


def test_core_module_names_of_the_original_package_work():
    from pyoco.core.engine import Engine as CoreEngine
    from pyoco.core.models import Flow as CoreFlow
    from pyoco.core.models import task as core_task
    assert CoreFlow is Flow and CoreEngine is Engine and core_task is task
    import pyoco.core.models
    import pyoco.core.engine
    assert pyoco.core.models.Flow is Flow


# ---------------------------------------------------------------------------
# Code written for the original pyoco: states, tasks, groups, context (SPEC section 15)
# ---------------------------------------------------------------------------

def test_original_state_names_are_strings_with_value_and_one_object_each():
    from pyoco.core.models import RunStatus, TaskState

    assert TaskState.SUCCEEDED == "SUCCEEDED" and TaskState.SUCCEEDED.value == "SUCCEEDED"
    assert RunStatus.COMPLETED == "COMPLETED" and RunStatus.CANCELLING.value == "CANCELLING"
    assert RunStatus is pyoco.RunState and TaskState is pyoco.TaskState
    run = run_quiet(flow_of_one(lambda: 1))
    assert run.status is RunStatus.COMPLETED and run.tasks["one"].state is TaskState.SUCCEEDED
    assert json.loads(json.dumps({"s": TaskState.FAILED})) == {"s": "FAILED"}
    assert "%s/%s" % (TaskState.SKIPPED, RunStatus.FAILED.value) == "SKIPPED/FAILED"
    assert TaskState("FAILED") is TaskState.FAILED and RunStatus("CANCELLED") is RunStatus.CANCELLED
    assert [s.value for s in RunStatus] == ["PENDING", "RUNNING", "COMPLETED", "FAILED",
                                           "CANCELLING", "CANCELLED"]
    with pytest.raises(ValueError, match="did you mean 'SKIPPED'"):
        TaskState("SKIPED")


def flow_of_one(fn, **options):
    """Flow() (named main) holding one Task(func=fn, name="one", ...), added with add_task."""
    flow = Flow()
    flow.add_task(Task(func=fn, name="one", **options))
    return flow


def test_task_with_func_is_a_node_of_a_flow_named_main_that_add_task_fills():
    seen = []

    def add_one(ctx, x):
        seen.append(ctx.params["x"])
        return x + 1

    node = Task(func=add_one, name="t", inputs={"x": "$ctx.params.x"}, retries=1)
    assert isinstance(node, Task) and node.name == "t" and node.retries == 1
    flow = Flow()
    flow.add_task(node)
    run = Engine(trace=False).run(flow, params={"x": 1})
    assert flow.name == "main" and run.results == {"t": 2} and seen == [1]
    positional = Task(lambda: "p", name="p")
    assert run_quiet(Flow("p").add(positional).flow).results == {"p": "p"}


def test_timeout_sec_set_on_a_decorated_node_fails_the_task_at_its_deadline():
    release = threading.Event()

    @task
    def slow(ctx):
        release.wait(WAIT)          # stands for 0.3 s of work that outlives its timeout
        return "late"

    slow.task.timeout_sec = 0.05
    assert slow.task.timeout == 0.05 and slow.task.timeout_sec == 0.05
    flow = Flow("slow")
    flow >> slow
    started = time.monotonic()
    run = quiet().run(flow, raise_on_failure=False)
    release.set()
    assert run.status == "FAILED" and isinstance(run.tasks["slow"].exception, TimeoutError)
    assert time.monotonic() - started < WAIT
    assert Task(func=lambda: 1, name="x", timeout_sec=2).timeout == 2


@pytest.mark.parametrize("make, expected", [
    (lambda: Task(func=lambda: 1, name="x", timout_sec=1), (TypeError, "'timeout_sec'")),
    (lambda: Task(func=lambda: 1, name="x", trigger_policy="SOME"), (FlowError, "'ANY'")),
    (lambda: Task(func=lambda: 1, name="x", outputs=["scrach.k"]), (FlowError, "'scratch'")),
    (lambda: Task(func=lambda: 1, name="x", outputs="scratch.k"), (TypeError, "list of paths")),
])
def test_original_option_names_are_aliases_and_misspellings_stay_errors(make, expected):
    with pytest.raises(expected[0]) as info:
        make()
    assert expected[1] in str(info.value)


def test_trigger_policy_any_is_run_if_any_succeeded():
    node = Task(func=lambda: 1, name="x", trigger_policy="ANY")
    assert node.run_if == "any_succeeded" and node.trigger_policy == "ANY"
    node.trigger_policy = "ALL"
    assert node.run_if == "all_succeeded" and node.trigger_policy == "ALL"


def test_dependencies_and_dependents_are_live_edge_sets_the_flow_follows():
    order = []
    first = Task(func=lambda: order.append("first"), name="first")
    second = Task(func=lambda: order.append("second"), name="second")
    third = Task(func=lambda: order.append("third"), name="third")
    second.dependencies.add(first)
    first.dependents.add(second)            # the same edge, made from the other end
    third.dependencies.add(second)
    assert first in second.dependencies and second in first.dependents
    assert len(second.dependencies) == 1 and second.dependencies == {first}
    flow = Flow()
    flow.add_task(third)                    # its upstream tasks join the flow
    run_quiet(flow)
    assert order == ["first", "second", "third"]

    @task
    def a(ctx):
        return 1

    @task
    def b(ctx):
        return 2

    chained = Flow("chained")
    chained >> a >> b
    assert a.task in b.task.dependencies and b.task in a.task.dependents
    b.task.dependencies.discard(a)
    assert a.task not in b.task.dependencies and chained.upstream(b) == []
    third.dependencies = {first}            # assigning replaces the node's own edges
    assert third.dependencies == {first} and second.dependents == set()


def test_outputs_store_the_return_value_at_scratch_results_and_params_paths():
    flow = flow_of_one(lambda: {"n": 1}, outputs=["scratch.deep.nested.value", "results.copy",
                                                  "params.seen"])
    run = run_quiet(flow)
    assert run.scratch == {"deep": {"nested": {"value": {"n": 1}}}}
    assert run.results == {"one": {"n": 1}, "copy": {"n": 1}} and run.params == {"seen": {"n": 1}}
    clash = Flow("clash")
    clash >> Task(func=lambda ctx: ctx.scratch.update(deep=5), name="put") >> Task(
        func=lambda: 2, name="two", outputs=["scratch.deep.x"])
    run = quiet().run(clash, raise_on_failure=False)
    assert run.tasks["two"].state == "FAILED" and "holds a int" in run.tasks["two"].error


def test_and_groups_run_side_by_side_and_or_joins_need_one_success():
    both = threading.Barrier(2, timeout=WAIT)   # b and c each wait for the other: in parallel

    @task
    def a(ctx):
        return "a"

    @task
    def b(ctx):
        both.wait()
        return "b"

    @task
    def c(ctx):
        both.wait()
        raise ValueError("c broke")

    @task
    def d(ctx):
        return "d"

    c.task.fail_policy = "isolate"
    flow = Flow("groups")
    flow >> a >> (b & c) >> d
    assert set(d.task.dependencies) == {b.task, c.task} and d.task.run_if == "all_succeeded"
    run = quiet().run(flow, raise_on_failure=False)
    assert run.tasks["d"].state == "SKIPPED"
    either = Flow("either")
    either >> a >> (b | c) >> d
    both.reset()
    run = quiet().run(either, raise_on_failure=False)
    assert d.task.trigger_policy == "ANY" and run.tasks["d"].state == "SUCCEEDED"
    assert run.status == "FAILED"               # isolate still fails the run


def test_groups_outside_a_flow_link_the_nodes_themselves():
    from pyoco.dsl.syntax import Branch, task as dsl_task

    @dsl_task
    def left(ctx):
        return 1

    @dsl_task
    def right(ctx):
        return 2

    @dsl_task
    def after(ctx):
        return 3

    branch = left | right
    assert isinstance(branch, Branch) and len(branch) == 2
    branch >> after
    assert after.task.trigger_policy == "ANY" and after.task.dependencies == {left.task, right.task}
    assert dsl_task is task


def test_context_original_helpers_read_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_TEST_COLOUR", "orange")
    seen = {}

    @task
    def make(ctx):
        return {"carrots": 3}

    @task
    def use(ctx):
        seen["result"] = ctx.get_result("make")
        seen["cancelled"] = ctx.is_cancelled
        seen["colour"] = ctx.env["PYOCO_TEST_COLOUR"]
        with pytest.raises(KeyError) as info:
            ctx.get_result("nothing")
        seen["missing"] = str(info.value)
        return [ctx.save_artifact("a.json", {"k": [1]}), ctx.save_artifact("b.txt", 42)]

    flow = Flow("helpers")
    flow >> make >> use
    run = quiet(store=tmp_path).run(flow)
    assert seen == {"result": {"carrots": 3}, "cancelled": False, "colour": "orange",
                    "missing": seen["missing"]} and "'make'" in seen["missing"]
    json_path, text_path = run.results["use"]
    assert json.loads(Path(json_path).read_text()) == {"k": [1]}
    assert Path(text_path).read_text() == "42"


def test_a_standalone_context_resolves_expressions_for_unit_tests(monkeypatch):
    monkeypatch.setenv("PYOCO_TEST_MODE", "prod")
    ctx = pyoco.Context(params={"n": 2})
    ctx.results["fetch"] = {"rows": [10, 20]}
    assert [ctx.resolve(v) for v in ("$node.fetch.output.rows.1", "$ctx.params.n",
                                     "$env.PYOCO_TEST_MODE", "plain", 7)] == [20, 2, "prod",
                                                                             "plain", 7]
    for missing in ("$node.other.output", "$ctx.params.nope"):
        with pytest.raises(KeyError):
            ctx.resolve(missing)
    with pytest.raises(FlowError):
        ctx.resolve("$unknown.pattern")


def test_pyoco_run_returns_the_run_and_is_silent_without_trace(capfd):
    flow = flow_of_one(lambda: "ok")
    run = pyoco.run(flow, trace=False)
    assert isinstance(run, pyoco.Run) and run.results == {"one": "ok"}
    assert capfd.readouterr().err == ""
    pyoco.run(flow, params={"p": 1}, cute=False)
    assert "INFO start flow=main" in capfd.readouterr().err


def test_a_failed_run_raises_run_failed_that_is_also_the_tasks_error_class():
    def boom():
        raise ValueError("Boom")

    with pytest.raises(ValueError, match="Boom") as info:
        pyoco.run(flow_of_one(boom), trace=False)
    assert isinstance(info.value, RunFailed) and type(info.value).__name__ == "RunFailed"
    assert isinstance(info.value.__cause__, ValueError) and info.value.run.status == "FAILED"

    def leave():
        raise SystemExit(3)

    with pytest.raises(RunFailed) as info:
        pyoco.run(flow_of_one(leave), trace=False)
    assert not isinstance(info.value, SystemExit)


@task
def _original_first(ctx):
    return os.getpid()


@task
def _original_second(ctx):
    return (ctx.get_result("_original_first"), ctx.is_cancelled, ctx.env.get("PYOCO_TEST_SEEN"),
            os.getpid())


def test_context_original_helpers_work_in_a_process_pool_too(monkeypatch):
    monkeypatch.setenv("PYOCO_TEST_SEEN", "yes")
    flow = Flow("original-process")
    flow >> _original_first >> _original_second
    run = Engine(executor="process", workers=1, trace=False).run(flow)
    first, cancelled, seen, pid = run.results["_original_second"]
    assert first == run.results["_original_first"] and cancelled is False and seen == "yes"
    assert pid != os.getpid()


def test_a_flow_written_as_one_chain_runs_from_python_and_the_cli(tmp_path):
    write(tmp_path / "spec_style.py", '''\
        from pyoco import task, Flow, run

        @task
        def A(ctx, x):
            return x + 1

        @task
        def B(ctx, x):
            print("B got", x)

        @task
        def C(ctx, x):
            print("C got", x)

        flow = Flow() >> A >> (B & C)          # the chain, as the original's examples wrote it
        ''')
    done = cli(tmp_path, "run", "spec_style.py", "-p", "x=1", "--store", tmp_path / "store")
    assert done.returncode == 0, done.stderr
    assert "B got 1" in done.stdout and "C got 1" in done.stdout
    probe = run_python(tmp_path, "-c", "import spec_style as s;"
                       " print(s.run(s.flow, params={'x': 2}, trace=False).results['A'])")
    assert probe.stdout.splitlines()[-1] == "3", probe.stderr


# ===========================================================================
# The browser page
# ===========================================================================


# ---------------------------------------------------------------------------
# The page, its endpoints and a real headless Chromium
# ---------------------------------------------------------------------------

PAGE_FLOW = textwrap.dedent('''
    import time
    from pyoco import task, Flow

    @task
    def extract(ctx):
        time.sleep(0.05)
        print("extracted 3 files")
        return ["a.csv", "b.csv", "c.csv"]

    @task(retries=2, retry_delay=0.05)
    def clean(ctx, path):
        time.sleep(0.04)
        if path == "b.csv" and ctx.attempt == 1:
            raise ValueError("flaky disk")
        return path

    @task
    def load(ctx, clean):
        time.sleep(0.03)
        ctx.save_artifact("report.txt", "rows: 42\\n")
        return len(clean)

    @task(fail_policy="isolate")
    def notify(ctx, extract):
        time.sleep(0.02)
        raise ConnectionError("mail server said no")

    @task
    def archive(ctx, notify):
        return True

    flow = Flow("nightly_etl")
    flow >> extract >> clean.map("$node.extract.output") >> load
    flow.add(notify, after=[extract])
    flow.add(archive, after=[notify])
''')


def page_get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


@pytest.fixture(scope="module")
def page_site(tmp_path_factory):
    """A store with one run that fans out, retries and fails, and a server over it."""
    folder = tmp_path_factory.mktemp("page")
    flow_file = write(folder / "etl.py", PAGE_FLOW)
    store = folder / "store"
    done = cli(folder, "run", flow_file, "--store", store, PYOCO_CUTE="0")
    assert done.returncode == 1, done.stderr
    run_id = pyoco.RunStore(store).ids()[0]
    server = pyoco.Server(store, port=0).start()
    yield server.url, run_id, store
    server.close()


def test_page_is_one_self_contained_document(page_site):
    url, run_id, _ = page_site
    for path in ("/", "/runs/%s/view" % run_id):
        status, headers, body = page_get(url + path)
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        text = body.decode("utf-8")
        assert "<script>" in text and "<style>" in text
        # Nothing is fetched from elsewhere: no CDN, no external script or style.
        for marker in ('src="http', "src='http", 'href="http', "@import", "//cdn"):
            assert marker not in text


def test_graph_endpoint_gives_the_runs_dag_with_map_instances(page_site):
    url, run_id, _ = page_site
    _, _, body = page_get("%s/runs/%s/graph" % (url, run_id))
    graph = json.loads(body)
    assert graph["run_id"] == run_id
    assert set(graph["nodes"]) == {"extract", "clean", "load", "notify", "archive",
                                   "clean[0]", "clean[1]", "clean[2]"}
    edges = {tuple(e) for e in graph["edges"]}
    assert {("extract", "clean"), ("clean", "load"), ("extract", "notify"),
            ("notify", "archive"), ("clean", "clean[1]")} <= edges


def test_graph_of_unknown_run_is_404(page_site):
    url, _, _ = page_site
    with pytest.raises(urllib.error.HTTPError) as caught:
        page_get(url + "/runs/20000101-000000-00000000/graph")
    assert caught.value.code == 404
    assert "error" in json.loads(caught.value.read())


def test_artifact_is_served_inert_and_paths_cannot_escape(page_site):
    url, run_id, store = page_site
    status, headers, body = page_get("%s/runs/%s/artifacts/report.txt" % (url, run_id))
    assert status == 200 and body == b"rows: 42\n"
    assert headers["Content-Security-Policy"] == "sandbox"
    assert headers["X-Content-Type-Options"] == "nosniff"
    secret = Path(store) / "runs" / run_id / "run.json"
    assert secret.exists()
    for bad in ("..%2Frun.json", "%2E%2E/run.json", "nope.txt", "..%2F..%2F..%2Fetc%2Fpasswd"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            page_get("%s/runs/%s/artifacts/%s" % (url, run_id, bad))
        assert caught.value.code == 404, bad


def test_record_tells_the_page_everything_it_draws(page_site):
    # The page computes nothing the API cannot tell: states, times, attempts,
    # retries (as events), errors and tracebacks, artifacts.
    url, run_id, _ = page_site
    _, _, body = page_get("%s/runs/%s" % (url, run_id))
    record = json.loads(body)
    tasks = record["tasks"]
    assert tasks["clean[1]"]["attempts"] == 2
    assert any(e["event"] == "task.retrying" and e["task"] == "clean[1]" for e in record["events"])
    assert tasks["notify"]["state"] == "FAILED"
    assert "ConnectionError: mail server said no" in tasks["notify"]["traceback"]
    assert "pyoco.py" not in tasks["notify"]["traceback"].splitlines()[1]
    assert tasks["archive"]["state"] == "SKIPPED"
    assert "report.txt" in tasks["load"]["artifacts"]
    for name in ("extract", "clean[0]", "clean[1]", "clean[2]", "load"):
        assert tasks[name]["started_at"] and tasks[name]["ended_at"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_browser(url, *extra):
    profile = tempfile.mkdtemp(prefix="pyoco-chromium-")
    try:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--user-data-dir=" + profile, "--virtual-time-budget=5000",
             "--window-size=1280,1300", *extra, url],
            capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return done


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_browser_renders_run_list_and_timeline(page_site, tmp_path):
    url, run_id, _ = page_site
    listing = page_browser(url + "/", "--dump-dom")
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert 'id="runs"' in listing.stdout
    assert 'data-run="%s"' % run_id in listing.stdout

    view = page_browser("%s/runs/%s/view" % (url, run_id), "--dump-dom")
    dom = view.stdout
    assert 'id="timeline"' in dom
    for name in ("extract", "clean[0]", "clean[1]", "clean[2]", "load", "notify", "archive"):
        assert 'class="tl-row" data-task="%s"' % name in dom
    assert 'data-task="clean[1]" data-state="SUCCEEDED"' in dom
    assert 'data-task="notify" data-state="FAILED"' in dom
    assert 'data-task="archive" data-state="SKIPPED"' in dom
    assert 'class="tl-tick"' in dom                      # the retry of clean[1]
    assert 'id="dag"' in dom and "mail server said no" in dom
    assert "/runs/%s/artifacts/report.txt" % run_id in dom

    shot = tmp_path / "page.png"
    done = page_browser("%s/runs/%s/view" % (url, run_id), "--screenshot=%s" % shot)
    assert done.returncode == 0 and shot.stat().st_size > 10000
    target = os.environ.get("PYOCO_UPDATE_SCREENSHOT")
    if target:                      # how docs/serve-page.png is made
        shutil.copyfile(shot, target)


# ---------------------------------------------------------------------------
# The flows view: each flow's runs, rate, trend and buttons
# ---------------------------------------------------------------------------

def sch_site_flows(hold):
    """Three flows for the flows view: nightly (fails now and then), sync (can be
    held running by a parameter) and an unscheduled report."""
    @task
    def extract(ctx, n=0):
        time.sleep(0.01 + 0.004 * (n % 5))      # work of varying length
        if n in (3, 8):
            raise ValueError("upstream was down")

    @task
    def sync(ctx, n=0, held=False):
        time.sleep(0.005 + 0.002 * n)           # work
        if held:
            hold.wait(60)

    @task
    def report(ctx):
        return "ok"

    nightly = Flow("nightly_etl", schedule="0 3 * * *", schedule_tz="Europe/Paris")
    nightly >> extract
    hourly = Flow("hourly_sync", schedule="every 15m")
    hourly >> sync
    adhoc = Flow("adhoc_report")
    adhoc >> report
    return [nightly, hourly, adhoc]


@pytest.fixture
def sch_flows_site(tmp_path, srv_serve):
    """A server with a history of runs of three flows and one run still running;
    its clock stands still just after the last scheduled times, so no scheduled
    run starts (or is caught up) while the page is read."""
    store = tmp_path / "store"
    hold = threading.Event()
    flows = sch_site_flows(hold)
    engine = quiet(store=str(store))
    for n in range(12):
        engine.run(flows[0], {"n": n}, raise_on_failure=False,
                   scheduled_for=sch_ts("2026-11-20T02:00Z") + n * 86400)
    for n in range(7):
        engine.run(flows[1], {"n": n}, scheduled_for=sch_ts("2026-12-01T07:30Z") + n * 900)
    engine.run(flows[2])
    clock = SchClock(sch_ts("2026-12-01T09:10Z"))
    server = srv_serve(store, flows={f.name: f for f in flows}, clock=clock, engine=engine,
                       files={f.name: "flows/%s.py" % f.name for f in flows})
    clock.settled()
    _, body = srv_json(server.url, "POST", "/runs",
                       {"flow": "hourly_sync", "params": {"n": 7, "held": True}})
    srv_wait_status(server, body["run_id"], "RUNNING")
    server.running_id = body["run_id"]
    yield server
    hold.set()


SCH_SCREENSHOT = os.environ.get("PYOCO_UPDATE_FLOWS_SCREENSHOT")   # read before fixtures clear it


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_browser_flows_view_shows_each_flow_with_runs_rate_trend_and_buttons(sch_flows_site,
                                                                             tmp_path):
    server = sch_flows_site
    done = page_browser(server.url + "/", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'id="flows"' in dom
    rows = {name: re.search(r'<tr data-flow="%s">(.*?)</tr>' % name, dom, re.S).group(1)
            for name in ("nightly_etl", "hourly_sync", "adhoc_report")}
    nightly = rows["nightly_etl"]
    assert "0 3 * * *" in nightly and "2026-12-02 02:00:00.000" in nightly   # 03:00 in Paris
    assert nightly.count('class="cell s-COMPLETED"') == 10
    assert nightly.count('class="cell s-FAILED"') == 2
    assert '<td class="rate" title="10 of 12 finished runs completed">83%</td>' in nightly
    assert nightly.count("<polyline") == 1 and 'data-flow="nightly_etl"' in nightly
    for record in RunStore(server.store.root).list(flow="nightly_etl"):
        assert 'href="/runs/%s/view"' % record["run_id"] in nightly      # each cell is a link
    sync = rows["hourly_sync"]
    assert "every 15m" in sync and "2026-12-01 09:15:00.000" in sync
    assert 'class="cell s-RUNNING" href="/runs/%s/view"' % server.running_id in sync
    assert '<button type="button" class="cancel" data-run="%s"' % server.running_id in sync
    assert ">100%<" in sync
    adhoc = rows["adhoc_report"]
    assert "class=\"mono next\">–<" in adhoc and adhoc.count('class="cell s-') == 1
    assert "Run now" in adhoc and "cancel" not in adhoc

    shot = tmp_path / "flows.png"
    done = page_browser(server.url + "/", "--screenshot=%s" % shot)
    assert done.returncode == 0 and shot.stat().st_size > 10000
    if SCH_SCREENSHOT:              # how docs/flows-view.png is made
        shutil.copyfile(shot, SCH_SCREENSHOT)


def test_page_buttons_are_refused_without_the_token_when_one_is_set(tmp_path, srv_serve):
    # The buttons send what this sends: a POST from the page's own origin.
    store = tmp_path / "store"
    hold = threading.Event()
    flows = {f.name: f for f in sch_site_flows(hold)}
    server = srv_serve(store, flows=flows, token="s3cret", clock=SchClock(time.time()))
    page = {"Origin": server.url}
    body = {"flow": "hourly_sync", "params": {"held": True}}
    assert srv_json(server.url, "POST", "/runs", body, page)[0] == 401
    assert srv_json(server.url, "POST", "/runs", body, {
        "Origin": "http://evil.example", "Authorization": "Bearer s3cret"})[0] == 403
    status, started = srv_json(server.url, "POST", "/runs", body,
                               dict(page, Authorization="Bearer s3cret"))
    assert status == 202
    cancel = "/runs/%s/cancel" % started["run_id"]
    assert srv_json(server.url, "POST", cancel, None, page)[0] == 401
    assert srv_json(server.url, "POST", cancel, None,
                    dict(page, Authorization="Bearer s3cret"))[0] == 202
    hold.set()
    srv_wait_status(server, started["run_id"], "CANCELLED")
    text = page_get(server.url + "/")[2].decode("utf-8")
    assert 'sessionStorage.setItem("pyoco-token"' in text and 'localStorage.setItem("pyoco-token"' not in text
    assert '"Authorization"] = "Bearer " + token' in text


# ---------------------------------------------------------------------------
# A reused task on the run view
# ---------------------------------------------------------------------------

@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_page_marks_a_reused_task_with_its_origin_run(reused_store):
    url, runs = reused_store
    view = page_browser("%s/runs/%s/view" % (url, runs[2].run_id), "--dump-dom")
    assert view.returncode == 0, view.stderr[-2000:]
    assert "reused from" in view.stdout
    assert "/runs/%s/view" % runs[0].run_id in view.stdout
