"""Tests for pyoco's run store: run records, task logs, artifacts, atomic and
concurrent writes, cancellation, signals, resume, retention and the
``pyoco runs`` commands.

They are written against SPEC.md (sections 2 "Cancellation" and "ctx", 4 and
5) and use real parts only: real files, real subprocesses of the command
line, real signals. Synchronisation waits on a marker line a task prints or
on an Event, never on a ``time.sleep``; a sleep inside a task only stands
for work. Helpers carry a ``store_`` prefix so this file can be merged into
test_pyoco.py.

Run with ``python -m pytest -q --import-mode=importlib .store_tests.py``
(pytest cannot import a file whose name starts with a dot otherwise).
"""

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

STORE_HERE = Path(__file__).resolve().parent
if str(STORE_HERE) not in sys.path:         # under --import-mode=importlib nobody adds it
    sys.path.insert(0, str(STORE_HERE))

import pyoco                                                            # noqa: E402
from pyoco import Engine, Flow, RunCancelled, RunStore, Task, task      # noqa: E402

STORE_WAIT = 10.0       # the longest a test waits for a marker line, an Event or an exit

STORE_ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
STORE_RUN_KEYS = {"run_id", "flow", "status", "params", "started_at", "ended_at",
                  "duration_ms", "reason", "resumed_from", "tasks", "events"}
STORE_TASK_KEYS = {"state", "attempts", "started_at", "ended_at", "duration_ms", "error",
                   "traceback", "reason", "artifacts"}
STORE_EVENT_KEYS = {"ts", "event", "task", "state"}
STORE_UNKNOWN_ID = "20990101-000000-deadbeef"


@pytest.fixture(autouse=True)
def store_no_pyoco_settings(monkeypatch):
    """Tests start from no PYOCO_* settings: no run store unless a test asks for one."""
    for key in list(os.environ):
        if key.startswith("PYOCO_"):
            monkeypatch.delenv(key)


def store_env(**extra):
    """The environment for a subprocess: pyoco importable, plain trace, unbuffered pipes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOCO_")}
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(STORE_HERE) + (os.pathsep + old if old else "")
    env["PYOCO_CUTE"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra)
    return env


def store_cli(cwd, *args, env=None, timeout=30):
    """Run ``python -m pyoco ARGS`` in ``cwd`` to the end."""
    return subprocess.run([sys.executable, "-m", "pyoco"] + [str(a) for a in args],
                          cwd=str(cwd), env=env or store_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, encoding="utf-8", timeout=timeout)


def store_write(path, source):
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def store_run_id(trace):
    """The run id from a plain trace (its start line names it)."""
    match = re.search(r"run_id=(\S+)", trace)
    assert match, "no run_id in the trace:\n%s" % trace
    return match.group(1)


def store_quiet(**options):
    return Engine(trace=False, **options)


def store_files(root):
    """Every file under root, as paths relative to it (str, with /)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)).replace(os.sep, "/")
                  for p in root.rglob("*") if p.is_file())


def store_poll(condition, timeout=STORE_WAIT):
    """Wait for condition() to be true, polling: for files, where nothing can be waited on."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition still false after %.1f s" % timeout
        time.sleep(0.05)


def store_no_traceback(result):
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


class StoreProc:
    """A running ``python -m pyoco ...`` whose output lines are read as they come."""

    def __init__(self, cwd, *args, env=None, read=("stdout", "stderr")):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyoco"] + [str(a) for a in args], cwd=str(cwd),
            env=env or store_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            encoding="utf-8")
        self.lines = {"stdout": [], "stderr": []}
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

    def text(self, name):
        with self.cond:
            return "\n".join(self.lines[name])

    def wait_for(self, pattern, stream="stdout", timeout=STORE_WAIT):
        """The first match of ``pattern`` in a line of ``stream``; fails at the deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[stream]:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or stream in self.ended:
                    pytest.fail("no line matching %r on %s\n--- stdout:\n%s\n--- stderr:\n%s"
                                % (pattern, stream, "\n".join(self.lines["stdout"]),
                                   "\n".join(self.lines["stderr"])))
                self.cond.wait(left)

    def wait(self, timeout=STORE_WAIT):
        """The exit code; fails when the process is still running at the deadline."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail("pyoco still running after %.1f s\n--- stderr:\n%s"
                        % (timeout, self.text("stderr")))
        for reader in self.readers:
            reader.join(STORE_WAIT)
        return rc

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def store_spawn():
    """Start ``pyoco`` subprocesses; any still running at the end of the test is killed."""
    started = []

    def spawn(cwd, *args, env=None, read=("stdout", "stderr")):
        proc = StoreProc(cwd, *args, env=env, read=read)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.stop()


# A flow whose first task prints "MARK <run id>" and then waits: for a cancel
# (the default, cooperative), or in time.sleep (-p mode=stubborn), or not at
# all (-p mode=quick, which prints no marker). It writes with
# sys.stdout.write, not print(): a print() still under way when a second
# Ctrl+C ends the run can crash the interpreter (see
# test_task_thread_still_printing_after_its_run_ended_does_not_crash_python).
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


def store_signal_flow(folder):
    return store_write(folder / "signal_flow.py", STORE_SIGNAL_FLOW)


# ---------------------------------------------------------------------------
# Run store: the run record
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
    run = store_quiet(store=tmp_path / "store").run(
        store_failing_flow(), {"day": "2026-11-29"}, raise_on_failure=False)
    record = RunStore(tmp_path / "store").get(run.run_id)

    assert set(record) >= STORE_RUN_KEYS
    assert record["run_id"] == run.run_id
    assert record["flow"] == "record"
    assert record["status"] == "FAILED"
    assert record["params"] == {"day": "2026-11-29"}
    assert STORE_ISO_UTC.match(record["started_at"]) and STORE_ISO_UTC.match(record["ended_at"])
    assert record["started_at"] <= record["ended_at"]
    assert isinstance(record["duration_ms"], (int, float)) and record["duration_ms"] >= 0
    assert record["resumed_from"] is None

    assert set(record["tasks"]) == {"ok", "bad", "never"}
    for name, t in record["tasks"].items():
        assert set(t) >= STORE_TASK_KEYS, name
    ok, bad, never = (record["tasks"][n] for n in ("ok", "bad", "never"))
    assert ok["state"] == "SUCCEEDED" and ok["attempts"] == 1
    assert STORE_ISO_UTC.match(ok["started_at"]) and STORE_ISO_UTC.match(ok["ended_at"])
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
        assert STORE_ISO_UTC.match(ev["ts"]), ev
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
    run = store_quiet(store=tmp_path).run(flow, {"n": [1, 2]}, raise_on_failure=False)
    expected = json.loads(json.dumps(run.to_dict()))
    assert RunStore(tmp_path).get(run.run_id) == expected


def test_engine_store_false_writes_nothing_even_with_pyoco_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PYOCO_HOME", str(home))
    run = store_quiet(store=False).run(store_failing_flow(), raise_on_failure=False)
    assert run.status == "FAILED"
    assert not home.exists()
    assert store_files(tmp_path) == []


def test_pyoco_home_alone_makes_the_api_record(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_HOME", str(tmp_path / "home"))
    run = store_quiet().run(store_failing_flow(), raise_on_failure=False)
    assert RunStore(tmp_path / "home").get(run.run_id)["status"] == "FAILED"


def test_api_records_nothing_without_store_or_pyoco_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store_quiet().run(store_failing_flow(), raise_on_failure=False)
    assert store_files(tmp_path) == []


def test_engine_store_path_wins_over_pyoco_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_HOME", str(tmp_path / "home"))
    run = store_quiet(store=tmp_path / "mine").run(store_failing_flow(), raise_on_failure=False)
    assert RunStore(tmp_path / "mine").ids() == [run.run_id]
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("where", ["default", "pyoco_home", "store_flag"])
def test_cli_records_in_dot_pyoco_unless_pyoco_home_or_store_says_otherwise(tmp_path, where):
    store_signal_flow(tmp_path)
    args = ["run", "signal_flow.py", "-p", "mode=quick"]
    env = store_env()
    if where != "default":
        env["PYOCO_HOME"] = str(tmp_path / "home")
    if where == "store_flag":
        args += ["--store", "flagged"]
    result = store_cli(tmp_path, *args, env=env)
    assert result.returncode == 0, result.stderr
    run_id = store_run_id(result.stderr)
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
    store_quiet(store=tmp_path).run(flow)
    assert (sys.stdout, sys.stderr) == before


# ---------------------------------------------------------------------------
# Run store: task logs
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
    store_write(tmp_path / "log_flow.py", STORE_LOG_FLOW)
    result = store_cli(tmp_path, "run", "log_flow.py")
    assert result.returncode == 0, result.stderr
    assert "to stdout 1\n" in result.stdout and "to stdout 2\n" in result.stdout
    assert "other line\n" in result.stdout
    assert "to stderr 1\n" in result.stderr
    run_id = store_run_id(result.stderr)

    lines = RunStore(tmp_path / ".pyoco").logs(run_id, task="talk")
    assert [(l["task"], l["stream"], l["text"]) for l in lines] == [
        ("talk", "stdout", "to stdout 1"), ("talk", "stderr", "to stderr 1"),
        ("talk", "log", "INFO via ctx.log info"), ("talk", "stdout", "to stdout 2")]
    assert all(STORE_ISO_UTC.match(l["ts"]) for l in lines)

    shown = store_cli(tmp_path, "runs", "logs", run_id, "--task", "talk")
    assert shown.returncode == 0, shown.stderr
    assert "to stdout 1" in shown.stdout and "to stderr 1" in shown.stdout
    assert re.search(r"talk log .*INFO via ctx\.log info", shown.stdout)
    assert "other line" not in shown.stdout and "debug is not kept" not in shown.stdout

    tail = store_cli(tmp_path, "runs", "logs", run_id, "--task", "talk", "--tail", "1")
    assert tail.returncode == 0, tail.stderr
    assert tail.stdout.strip().splitlines() == [
        line for line in shown.stdout.strip().splitlines() if "to stdout 2" in line]

    everything = store_cli(tmp_path, "runs", "logs", run_id)
    assert "other line" in everything.stdout and "to stdout 1" in everything.stdout


def test_runstore_logs_filters_by_task_and_keeps_the_last_n_lines(tmp_path):
    @task
    def count(ctx):
        for i in range(10):
            print("count %d" % i)
        return 1

    @task
    def other(ctx, count):
        print("other")
        return 2

    flow = Flow(name="tails")
    flow >> count >> other
    run = store_quiet(store=tmp_path).run(flow)
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
    run = store_quiet(store=tmp_path).run(flow)
    assert [l["text"] for l in RunStore(tmp_path).logs(run.run_id, task="timed")] == [
        "inside the timeout thread"]


def test_64_parallel_tasks_keep_whole_lines_each_in_its_own_log(tmp_path):
    everyone_running = threading.Barrier(64)

    class Chatty(Task):
        def run(self, ctx):
            everyone_running.wait(STORE_WAIT)       # all 64 print at the same time
            for j in range(50):
                stream = sys.stderr if j % 5 == 0 else sys.stdout
                print("task=%s line=%02d %s" % (ctx.task_name, j, "x" * 60), file=stream)
            return ctx.task_name

    flow = Flow(name="chatty")
    names = ["chatty%02d" % k for k in range(64)]
    for name in names:
        flow.add(Chatty(name=name))
    run = store_quiet(store=tmp_path, workers=64).run(flow)
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
    run = store_quiet(store=tmp_path).run(flow)
    texts = [l["text"] for l in RunStore(tmp_path).logs(run.run_id, task="loud", tail=1000)]
    assert texts[-1] == "line 0399"
    assert "line 0000" not in texts
    first = int(texts[0].split()[1])
    assert texts == ["line %04d" % i for i in range(first, 400)]     # a whole, unbroken tail
    log_file = tmp_path / "runs" / run.run_id / "logs" / "loud.jsonl"
    assert 1000 < log_file.stat().st_size <= 2000


@pytest.mark.xfail(strict=True, reason="a line longer than PYOCO_MAX_LOG_BYTES empties the"
                                       " whole task log instead of keeping its tail")
def test_max_log_bytes_keeps_the_end_of_a_last_line_longer_than_the_cap(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_MAX_LOG_BYTES", "1000")

    @task
    def dump(ctx):
        print("short first line")
        print("x" * 3000 + " END")
        return 1

    flow = Flow(name="dump")
    flow >> dump
    run = store_quiet(store=tmp_path).run(flow)
    texts = [l["text"] for l in RunStore(tmp_path).logs(run.run_id, task="dump")]
    log_file = tmp_path / "runs" / run.run_id / "logs" / "dump.jsonl"
    assert log_file.stat().st_size <= 1000
    assert texts and texts[-1].endswith(" END")


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
    run = store_quiet(store=tmp_path).run(flow)
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
    store_write(tmp_path / "process_flow.py", STORE_PROCESS_FLOW)
    script = store_write(tmp_path / "process_run.py", STORE_PROCESS_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "store")],
                            cwd=str(tmp_path), env=store_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", timeout=60)
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


@pytest.mark.xfail(strict=True, reason="the store's stdout/stderr tee is freed when a recorded"
                                       " run ends while a task thread is inside print():"
                                       " the interpreter segfaults")
def test_task_thread_still_printing_after_its_run_ended_does_not_crash_python(tmp_path):
    script = store_write(tmp_path / "chatty.py", STORE_CHATTY_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "store")],
                            cwd=str(tmp_path), env=store_env(), stdout=subprocess.DEVNULL,
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
    run = store_quiet(store=tmp_path / "store").run(flow)
    assert [p for p in store_files(tmp_path) if "sneaky" in p] == [
        "store/runs/%s/logs/%%2E%%2E%%2F%%2E%%2E%%2Fsneaky.jsonl" % run.run_id]
    lines = RunStore(tmp_path / "store").logs(run.run_id, task="../../sneaky")
    assert [(l["task"], l["text"]) for l in lines] == [("../../sneaky", "sneaky line")]


# ---------------------------------------------------------------------------
# Run store: artifacts
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
    run = store_quiet(store=tmp_path / "store").run(flow)
    paths = run.results["make"]
    run_folder = (tmp_path / "store" / "runs" / run.run_id).resolve()
    for path in paths.values():
        assert isinstance(path, str)
        assert run_folder in Path(path).resolve().parents
    assert Path(paths["text"]).read_bytes() == "h\u00e9llo\n".encode("utf-8")
    assert Path(paths["bytes"]).read_bytes() == b"\xff\x00\x01"
    assert Path(paths["copy"]).read_bytes() == b"\x00copied\xff"
    assert source.read_bytes() == b"\x00copied\xff"         # copied, not moved


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
    run = store_quiet(store=tmp_path).run(flow)
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
    run = store_quiet(store=tmp_path / "store").run(flow)
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
    run = store_quiet(store=False).run(flow)
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
# Run store: atomic writes, several processes, dead processes
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
    script = store_write(tmp_path / "writer.py", STORE_WRITER)
    store_dir = tmp_path / "store"
    writers = [subprocess.Popen([sys.executable, str(script), str(store_dir), "25"],
                                cwd=str(tmp_path), env=store_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, encoding="utf-8") for _ in range(4)]
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

    listed = store_cli(tmp_path, "runs", "list", "--json", "--limit", "1000",
                       "--store", store_dir)
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert len(records) == 100
    assert len({r["run_id"] for r in records}) == 100
    assert {r["status"] for r in records} == {"COMPLETED"}


def test_run_killed_with_sigkill_is_reported_failed_with_a_reason(tmp_path, store_spawn):
    store_signal_flow(tmp_path)
    proc = store_spawn(tmp_path, "run", "signal_flow.py", "-p", "mode=stubborn")
    run_id = proc.wait_for(r"^MARK (\S+)$").group(1)
    proc.proc.kill()
    proc.proc.wait()

    listed = store_cli(tmp_path, "runs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [record] = [r for r in json.loads(listed.stdout) if r["run_id"] == run_id]
    assert record["status"] == "FAILED"
    assert isinstance(record["reason"], str) and record["reason"]
    assert not {t["state"] for t in record["tasks"].values()} & {"PENDING", "RUNNING"}

    shown = store_cli(tmp_path, "runs", "show", run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    full = json.loads(shown.stdout)
    assert full["status"] == "FAILED" and full["reason"] == record["reason"]

    table = store_cli(tmp_path, "runs", "list")
    assert table.returncode == 0
    assert re.search(r"%s\s+signals\s+FAILED" % run_id, table.stdout), table.stdout


@pytest.mark.parametrize("heartbeat_age, expected", [(60, "FAILED"), (0, "RUNNING")])
def test_run_of_another_host_is_failed_only_when_its_heartbeat_is_old(
        tmp_path, store_spawn, heartbeat_age, expected):
    store_signal_flow(tmp_path)
    proc = store_spawn(tmp_path, "run", "signal_flow.py", "-p", "mode=stubborn")
    run_id = proc.wait_for(r"^MARK (\S+)$").group(1)
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


def test_run_killed_with_sigkill_can_be_resumed(tmp_path, store_spawn):
    store_signal_flow(tmp_path)
    proc = store_spawn(tmp_path, "run", "signal_flow.py", "-p", "mode=stubborn")
    run_id = proc.wait_for(r"^MARK (\S+)$").group(1)
    proc.proc.kill()
    proc.proc.wait()

    resumed = store_cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick",
                        "--resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert "AFTER RAN" in resumed.stdout
    record = RunStore(tmp_path / ".pyoco").get(store_run_id(resumed.stderr))
    assert record["status"] == "COMPLETED" and record["resumed_from"] == run_id


def test_a_corrupt_record_does_not_break_runs_list(tmp_path):
    store_signal_flow(tmp_path)
    done = store_cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick")
    good = store_run_id(done.stderr)
    broken = tmp_path / ".pyoco" / "runs" / "20200101-000000-0badf00d"
    broken.mkdir()
    (broken / "run.json").write_text('{"run_id": "20200101-000000-0badf00d", "sta')
    listed = store_cli(tmp_path, "runs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [good]
    assert "20200101-000000-0badf00d" in listed.stderr
    store_no_traceback(listed)


# ---------------------------------------------------------------------------
# Cancellation: signals, `pyoco runs cancel`, Engine.cancel
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_cancels_the_run_cooperative_task_succeeds_cli_exits_130(
        tmp_path, store_spawn, signum):
    store_signal_flow(tmp_path)
    proc = store_spawn(tmp_path, "run", "signal_flow.py")
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
        tmp_path, store_spawn):
    store_signal_flow(tmp_path)
    proc = store_spawn(tmp_path, "run", "signal_flow.py", "-p", "mode=stubborn")
    run_id = proc.wait_for(r"^MARK (\S+)$").group(1)
    proc.proc.send_signal(signal.SIGINT)
    proc.wait_for(r" cancel flow=signals ", stream="stderr")     # the first one was handled
    sent = time.monotonic()
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130
    assert time.monotonic() - sent < 3.0

    record = RunStore(tmp_path / ".pyoco").get(run_id)
    assert record["status"] == "CANCELLED"
    assert {name: t["state"] for name, t in record["tasks"].items()} == {
        "work": "CANCELLED", "after": "CANCELLED", "last": "CANCELLED"}
    assert record["ended_at"] is not None


# The trace of the first Ctrl+C can block: stderr is a pipe nobody reads at
# the moment (a pager, a full CI log pipe). The second Ctrl+C must still stop
# the run. The test sees, in /proc, when a thread is blocked writing to fd 2.
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


def store_writing_to_stderr(syscall_file):
    """True when the thread of this /proc/.../syscall file is blocked in write(2, ...)."""
    try:
        with open(syscall_file) as f:
            fields = f.read().split()
    except OSError:
        return False
    return (len(fields) > 1 and fields[0] == str(STORE_WRITE_SYSCALL)
            and int(fields[1], 16) == 2)


def store_can_see_syscalls():
    return STORE_WRITE_SYSCALL is not None and os.access("/proc/self/syscall", os.R_OK)


@pytest.mark.skipif(not store_can_see_syscalls(),
                    reason="needs /proc/PID/syscall (Linux on x86_64 or aarch64)")
@pytest.mark.xfail(strict=True, reason="the signal handler does the cancel itself: a second"
                                       " SIGINT arriving while the first one's trace line"
                                       " holds the trace lock (stderr blocked) deadlocks")
def test_second_sigint_while_the_first_ones_trace_line_is_blocked_still_exits_130(
        tmp_path, store_spawn):
    store_write(tmp_path / "blocked_flow.py", STORE_BLOCKED_FLOW)
    proc = store_spawn(tmp_path, "run", "blocked_flow.py", read=("stdout",))
    pid = proc.proc.pid
    proc.wait_for(r"^MARK ")
    store_poll(lambda: any(store_writing_to_stderr(f) for f in Path(
        "/proc/%d/task" % pid).glob("*/syscall") if f.parent.name != str(pid)))
    proc.proc.send_signal(signal.SIGINT)       # its trace line now waits on the full pipe
    store_poll(lambda: store_writing_to_stderr("/proc/%d/syscall" % pid))
    proc.proc.send_signal(signal.SIGINT)
    threading.Thread(target=proc.proc.stderr.read, daemon=True).start()    # unblock it
    try:
        rc = proc.proc.wait(5)
    except subprocess.TimeoutExpired:
        rc = "still running 5 s after the second SIGINT"
    assert rc == 130


def test_runs_cancel_from_another_process_cancels_a_running_run(tmp_path, store_spawn):
    store_signal_flow(tmp_path)
    proc = store_spawn(tmp_path, "run", "signal_flow.py")
    run_id = proc.wait_for(r"^MARK (\S+)$").group(1)

    running = store_cli(tmp_path, "runs", "list", "--json", "--status", "RUNNING")
    assert [r["run_id"] for r in json.loads(running.stdout)] == [run_id]   # alive, not "dead"
    store_poll(lambda: RunStore(tmp_path / ".pyoco").get(run_id)["tasks"]["work"]["state"]
               == "RUNNING")                # the record follows the run while it runs

    cancel = store_cli(tmp_path, "runs", "cancel", run_id)
    assert cancel.returncode == 0, cancel.stderr
    assert proc.wait() == 130
    assert "AFTER RAN" not in proc.text("stdout")
    record = RunStore(tmp_path / ".pyoco").get(run_id)
    assert record["status"] == "CANCELLED"
    assert record["reason"]
    assert record["tasks"]["work"]["state"] == "SUCCEEDED"
    assert record["tasks"]["after"]["state"] == "CANCELLED"

    again = store_cli(tmp_path, "runs", "cancel", run_id)
    assert again.returncode not in (0, 130)
    assert run_id in again.stderr and "CANCELLED" in again.stderr
    store_no_traceback(again)


def test_runs_cancel_of_a_finished_run_exits_non_zero_with_a_message(tmp_path):
    store_signal_flow(tmp_path)
    done = store_cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick")
    run_id = store_run_id(done.stderr)
    result = store_cli(tmp_path, "runs", "cancel", run_id)
    assert result.returncode != 0
    assert run_id in result.stderr and "COMPLETED" in result.stderr
    store_no_traceback(result)
    assert RunStore(tmp_path / ".pyoco").get(run_id)["status"] == "COMPLETED"


def test_runs_cancel_of_an_unknown_id_exits_2(tmp_path):
    result = store_cli(tmp_path, "runs", "cancel", STORE_UNKNOWN_ID)
    assert result.returncode == 2
    assert STORE_UNKNOWN_ID in result.stderr
    store_no_traceback(result)


def store_cancellable_flow(started, ids):
    @task
    def wait(ctx):
        ids.append(ctx.run_id)
        started.set()
        return "stopped early" if ctx.cancelled.wait(STORE_WAIT) else "not cancelled"

    @task
    def after(ctx, wait):
        return "after"

    flow = Flow(name="cancellable")
    flow >> wait >> after
    return flow


def store_cancel_when_started(engine, started, ids, answers):
    def cancel():
        if started.wait(STORE_WAIT):
            answers.append(engine.cancel(ids[0]))
    thread = threading.Thread(target=cancel)
    thread.start()
    return thread


def test_engine_cancel_from_another_thread_records_the_run_cancelled(tmp_path):
    started, ids, answers = threading.Event(), [], []
    flow = store_cancellable_flow(started, ids)
    engine = store_quiet(store=tmp_path)
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

    @task
    def interrupt(ctx):
        os.kill(os.getpid(), signal.SIGINT)         # as if Ctrl+C was pressed
        return "stopped early" if ctx.cancelled.wait(STORE_WAIT) else "not cancelled"

    @task
    def after(ctx, interrupt):
        return "after"

    flow = Flow(name="interrupted")
    flow >> interrupt >> after
    run = store_quiet(store=tmp_path).run(flow, raise_on_failure=False)
    assert signal.getsignal(signal.SIGINT) is before
    assert run.status == "CANCELLED"
    assert run.results == {"interrupt": "stopped early"}
    record = RunStore(tmp_path).get(run.run_id)
    assert record["status"] == "CANCELLED" and "SIGINT" in record["reason"]
    assert record["tasks"]["after"]["state"] == "CANCELLED"


def test_engine_cancel_of_a_run_it_is_not_running_returns_false(tmp_path):
    assert store_quiet(store=tmp_path).cancel(STORE_UNKNOWN_ID) is False


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------

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
    store_write(tmp_path / "resume_flow.py", STORE_RESUME_FLOW)
    (tmp_path / "broken").write_text("")
    first = store_cli(tmp_path, "run", "resume_flow.py")
    assert first.returncode == 1, first.stderr
    old_id = store_run_id(first.stderr)
    assert store_ran(tmp_path) == {"a": 1, "point": 1, "fresh": 1, "b": 1}

    (tmp_path / "broken").unlink()                                     # the fix
    second = store_cli(tmp_path, "run", "resume_flow.py", "--resume", old_id)
    assert second.returncode == 0, second.stderr
    assert store_ran(tmp_path) == {"a": 1, "point": 1, "fresh": 2, "b": 2, "c": 1}
    got = json.loads(re.search(r"^C GOT (.*)$", second.stdout, re.M).group(1))
    assert got == {"a_type": "tuple", "a": [1, "one"], "point_is_point": True, "xy": [3, 4]}

    new_id = store_run_id(second.stderr)
    assert new_id != old_id
    record = RunStore(tmp_path / ".pyoco").get(new_id)
    assert record["status"] == "COMPLETED"
    assert record["resumed_from"] == old_id
    assert {t["state"] for t in record["tasks"].values()} == {"SUCCEEDED"}
    assert RunStore(tmp_path / ".pyoco").get(old_id)["status"] == "FAILED"    # untouched


@pytest.mark.parametrize("which", ["completed", "unknown"])
def test_cli_resume_of_a_completed_run_or_an_unknown_id_exits_2(tmp_path, which):
    store_signal_flow(tmp_path)
    done = store_cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick")
    run_id = store_run_id(done.stderr) if which == "completed" else STORE_UNKNOWN_ID
    result = store_cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick",
                       "--resume", run_id)
    assert result.returncode == 2
    assert run_id in result.stderr
    if which == "completed":
        assert "COMPLETED" in result.stderr
    store_no_traceback(result)
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
    engine = store_quiet(store=tmp_path)
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
    engine = store_quiet(store=tmp_path)
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
    engine = store_quiet(store=tmp_path)
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
    engine = store_quiet(store=tmp_path)
    done = engine.run(flow)
    run_id = done.run_id if which == "completed" else STORE_UNKNOWN_ID
    with pytest.raises(pyoco.StoreError, match=re.escape(run_id)):
        engine.run(flow, resume=run_id)
    assert RunStore(tmp_path).ids() == [done.run_id]


@pytest.mark.xfail(strict=True, reason="Engine(store=False).run(flow, resume=ID) raises"
                                       " AttributeError: 'NoneType' object has no attribute"
                                       " 'reusable_outputs'")
def test_api_resume_without_a_run_store_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    @task
    def one(ctx):
        return 1

    flow = Flow(name="simple")
    flow >> one
    with pytest.raises((pyoco.PyocoError, ValueError), match="(?i)store"):
        store_quiet().run(flow, resume=STORE_UNKNOWN_ID)


# ---------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------

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
    engine = store_quiet(store=tmp_path)
    flow = store_tiny_flow()
    runs = [engine.run(flow) for _ in range(5)]
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 3
    assert set(folders) <= {r.run_id for r in runs}
    assert len(RunStore(tmp_path).list()) == 3


@pytest.mark.xfail(strict=True, reason="prune orders runs by run id, not by time: it deletes"
                                       " the newest runs when their ids sort first (also"
                                       " generated ids within one second, whose suffix is"
                                       " random)")
def test_max_run_history_prunes_the_oldest_runs_by_time(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOCO_MAX_RUN_HISTORY", "3")
    engine = store_quiet(store=tmp_path)
    flow = store_tiny_flow()
    for run_id in ["run-e", "run-d", "run-c", "run-b", "run-a"]:      # oldest first
        engine.run(flow, run_id=run_id)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-a", "run-b", "run-c"]


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
    run = store_quiet(store=store_dir).run(store_busy_flow(tmp_path))
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
    result = store_cli(tmp_path, "run", "signal_flow.py", "-p", "mode=quick",
                       "--store", "file.txt/store")
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
        run = store_quiet(store=store_dir).run(store_busy_flow(tmp_path))
        assert run.status == "COMPLETED" and run.results["use"] == "artifact!"
        store_assert_one_warning(capfd.readouterr().err, str(store_dir))
        shutil.rmtree(run.artifacts_dir, ignore_errors=True)
    finally:
        store_dir.chmod(0o700)


# ---------------------------------------------------------------------------
# CLI: pyoco runs list / show / logs
# ---------------------------------------------------------------------------

STORE_ALPHA_FLOW = """\
    from pyoco import task, Flow

    @task
    def hello(ctx):
        print("hello from alpha")
        return 1

    flow = Flow(name="alpha")
    flow >> hello
"""

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
    store_write(folder / "alpha.py", STORE_ALPHA_FLOW)
    store_write(folder / "beta.py", STORE_BETA_FLOW)
    ids = []
    for name, code in (("alpha.py", 0), ("beta.py", 1), ("alpha.py", 0)):
        result = store_cli(folder, "run", name)
        assert result.returncode == code, result.stderr
        ids.append(store_run_id(result.stderr))
    return folder, ids


def store_listed_ids(folder, *args):
    result = store_cli(folder, "runs", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return [r["run_id"] for r in json.loads(result.stdout)]


def test_runs_list_table_shows_runs_newest_first(store_history):
    folder, (a1, b, a2) = store_history
    result = store_cli(folder, "runs", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "RUN ID" in lines[0] and "STATUS" in lines[0] and "FLOW" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == [a2, b, a1]
    assert re.search(r"^%s\s+beta\s+FAILED\b.*boom_task" % b, result.stdout, re.M)
    assert re.search(r"^%s\s+alpha\s+COMPLETED\b" % a1, result.stdout, re.M)


def test_runs_list_json_is_a_bare_list_of_records_without_events(store_history):
    folder, (a1, b, a2) = store_history
    result = store_cli(folder, "runs", "list", "--json")
    records = json.loads(result.stdout)
    assert isinstance(records, list)
    assert [r["run_id"] for r in records] == [a2, b, a1]
    for record in records:
        assert set(record) >= STORE_RUN_KEYS - {"events"}
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
    result = store_cli(folder, "runs", "list", "--flow", "nobody")
    assert result.returncode == 0
    assert "no runs" in result.stdout


@pytest.mark.parametrize("args", [("--limit", "0"), ("--status", "BOGUS"), ("--limit", "x")])
def test_runs_list_bad_options_exit_2(store_history, args):
    folder, _ = store_history
    result = store_cli(folder, "runs", "list", *args)
    assert result.returncode == 2
    assert result.stderr.strip()
    store_no_traceback(result)


def test_runs_show_table_names_tasks_states_and_the_traceback(store_history):
    folder, (_, b, _) = store_history
    result = store_cli(folder, "runs", "show", b)
    assert result.returncode == 0, result.stderr
    assert b in result.stdout and "beta" in result.stdout and "FAILED" in result.stdout
    assert re.search(r"^fine\s+SUCCEEDED\b", result.stdout, re.M)
    assert re.search(r"^boom_task\s+FAILED\s+1\b.*KeyError", result.stdout, re.M)
    assert "Traceback" in result.stdout and 'raise KeyError("boom")' in result.stdout


def test_runs_show_json_is_the_full_record(store_history):
    folder, (_, b, _) = store_history
    result = store_cli(folder, "runs", "show", b, "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record == RunStore(folder / ".pyoco").get(b)
    assert set(record) >= STORE_RUN_KEYS
    assert record["events"][-1]["event"] == "run.failed"


def test_runs_logs_shows_what_the_run_printed(store_history):
    folder, (a1, _, _) = store_history
    result = store_cli(folder, "runs", "logs", a1, "--task", "hello")
    assert result.returncode == 0, result.stderr
    assert re.search(r"hello stdout \| hello from alpha$", result.stdout, re.M)


@pytest.mark.parametrize("args", [("--task", "nobody"), ("--tail", "0")])
def test_runs_logs_with_an_unknown_task_or_bad_tail_exits_2(store_history, args):
    folder, (a1, _, _) = store_history
    result = store_cli(folder, "runs", "logs", a1, *args)
    assert result.returncode == 2
    assert args[1] in result.stderr
    store_no_traceback(result)


@pytest.mark.xfail(strict=True, reason="output into a closed pipe (pyoco runs list | head -1)"
                                       " ends in a BrokenPipeError traceback")
@pytest.mark.parametrize("args", [("runs", "list"), ("runs", "list", "--json")])
def test_runs_output_into_a_closed_pipe_is_not_a_traceback(store_history, args):
    folder, _ = store_history
    proc = subprocess.Popen([sys.executable, "-m", "pyoco"] + list(args), cwd=str(folder),
                            env=store_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8")
    proc.stdout.close()                 # the reader is gone before pyoco writes a thing
    err = proc.stderr.read()
    proc.wait(STORE_WAIT)
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
    result = store_cli(tmp_path, *args)
    assert result.returncode == 2
    assert run_id in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    store_no_traceback(result)
    assert "AFTER RAN" not in result.stdout
