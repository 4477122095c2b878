"""pyoco: a small task-DAG engine in one file.

Decorate functions with ``@task``, wire them into a ``Flow`` and run it::

    from pyoco import task, Flow, Engine

    @task
    def fetch(ctx):
        return {"id": 1, "value": "carrot"}

    @task
    def shout(ctx, data):
        return data["value"].upper()

    flow = Flow(name="hello")
    flow >> fetch >> shout
    shout.task.inputs = {"data": "$node.fetch.output"}

    run = Engine().run(flow)            # run.results["shout"] == "CARROT"

Independent tasks run in parallel on threads; retries, timeouts, fail
policies, a friendly trace and a command line (``python -m pyoco``) come with
it.

The promise: this file has no dependencies other than the Python Standard
Library (3.9 or newer). Copying it into a project is a full install.
``import pyoco`` is cheap: everything only one command needs is imported by
that command.
"""

__version__ = "0.1.0"

__all__ = [
    "task", "Task", "Flow", "Engine", "Run", "TaskRecord", "Context",
    "TaskState", "RunState", "Event", "EVENT_KINDS",
    "PyocoError", "FlowError", "RunFailed", "RunCancelled", "Skip", "ExecutorError",
    "main", "plugin_task", "load_plugins", "RunStore", "StoreError", "Server", "PluginWarning",
    "run", "RunStatus", "TraceBackend", "ConsoleTraceBackend",
]

import os
import sys
import time
from _thread import allocate_lock as _allocate_lock, get_ident as _get_ident   # built in
from itertools import count as _count

_MISSING = object()         # "no value": a parameter without default, and so on
_FUNCTION = type(lambda: None)

# Module state: every global that pyoco changes, each with what keeps it right.
_generation = 0             # bumped by every change to a task or flow; compiled plans compare it
_iso_second = (None, None)  # (whole second, its ISO text) last formatted: replaced whole, atomically
_abandoned = set()          # threads running an attempt given up at its timeout: under _abandon_lock
_abandon_lock = _allocate_lock()
_record_lock = _allocate_lock()     # held while a finished run's record is rewritten
_write_lock = _allocate_lock()      # held for each trace line and each whole line a task prints
_held_lines = []            # (stream, line) trace lines not yet written: under _write_lock
_flusher = None             # [thread, Event] writing _held_lines soon after they come
_live = None                # _LiveLines: progress lines on the terminal, if any: under _write_lock
_print_owners = {}          # thread id -> (log sink, task name) while that thread runs an attempt
# print() holds no reference to sys.stdout while it writes: a tee swapped out and
# freed under a thread still printing would crash the interpreter. So tees are
# reused, and the last few stay referenced in _retired_tees.
_tees = {}                  # "stdout"/"stderr" -> its _Tee: under _tee_lock
_retired_tees = []
_tee_lock = _allocate_lock()
_tee_users = 0              # runs and remote attempts that need the tees in place: under _tee_lock
_fork_hooked = False        # os.register_at_fork done (once, under _tee_lock)
_pending_webhooks = []      # _Delivery objects still delivering; drained at exit
_webhooks_drained_at_exit = False   # drain_webhooks registered with atexit
_registry = None            # the plugin registry, loaded on first use
_flows = None               # WeakSet of every Flow made, for node.dependencies; made by the first
_node_edges = 0             # edges ever made on nodes themselves (b.dependencies.add(a)); only grows
_STATES = {}                # state name -> its one _State object: filled at import, then only read
_FAILURE_CLASSES = {}       # task error class -> the RunFailed class raised for it; set once per key


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class PyocoError(Exception):
    """Root of every error pyoco raises on purpose."""


class FlowError(PyocoError, ValueError):
    """A flow is defined wrongly: a cycle, a bad reference, a missing input.

    ``cycle`` holds the names along a cycle (``['a', 'b', 'a']``) when that
    is the problem, else ``None``.
    """

    def __init__(self, message, cycle=None):
        super().__init__(message)
        self.cycle = cycle


class RunFailed(PyocoError):
    """A run ended FAILED. ``run`` is the run; ``__cause__`` the task's error.

    What ``Engine.run`` raises is also an instance of that error's class (a
    ``RunFailed`` made for it), so ``except ValueError`` catches a run whose
    task raised ValueError, as with the original pyoco.
    """

    def __init__(self, message, run):
        Exception.__init__(self, message)
        self.run = run

    def __reduce__(self):
        return (RunFailed, (str(self), self.run))


def _run_failed(message, run):
    """The RunFailed for ``run``, of a class that also derives from the class of
    the task error that failed it, when that class allows it."""
    cause = type(run.error)
    cls = _FAILURE_CLASSES.get(cause)
    if cls is None:
        cls = RunFailed
        if issubclass(cause, Exception) and not issubclass(cause, PyocoError):
            try:
                mixed = type("RunFailed", (RunFailed, cause),
                             {"__module__": __name__, "__qualname__": "RunFailed",
                              "__init__": RunFailed.__init__, "__str__": Exception.__str__,
                              "__repr__": Exception.__repr__, "__reduce__": RunFailed.__reduce__})
                if str(mixed("probe", None)) == "probe":
                    cls = mixed
            except Exception:       # a class that cannot be mixed in (layout, __new__, ...)
                pass
        _FAILURE_CLASSES[cause] = cls
    return cls(message, run)


class RunCancelled(PyocoError):
    """A run ended CANCELLED. ``run`` is the run."""

    def __init__(self, message, run):
        super().__init__(message)
        self.run = run


class Skip(Exception):
    """Raised in a task (or through ``ctx.skip``) to end it as SKIPPED."""

    def __init__(self, reason="skipped"):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------
# States and events
# ---------------------------------------------------------------------------

class _State(str):
    """A state name: a plain string (``== "SUCCEEDED"``, JSON as a string) that
    also has ``.value``, as the original's enums did. One object per name, so
    states may be compared with ``is``."""

    __slots__ = ()

    @property
    def value(self):
        return str.__str__(self)

    @property
    def name(self):
        return str.__str__(self)

    def __reduce__(self):
        return (_state, (str.__str__(self),))


def _state(name):
    return _STATES.setdefault(name, _State(name))


class _States(type):
    """TaskState and RunState read like the original's enums: ``TaskState("FAILED")``
    is ``TaskState.FAILED``, and iterating gives the states in order."""

    def __iter__(cls):
        return iter([v for v in vars(cls).values() if isinstance(v, _State)])

    def __len__(cls):
        return len(list(iter(cls)))

    def __call__(cls, value):
        for state in cls:
            if state == value:
                return state
        names = [str(state) for state in cls]
        raise ValueError("%r is not a %s%s (the states are: %s)" % (
            value, cls.__name__, _closest(value, names), ", ".join(names)))


class TaskState(metaclass=_States):
    """The states of a task; each is a string ("SUCCEEDED") with ``.value``."""
    PENDING = _state("PENDING")
    RUNNING = _state("RUNNING")
    SUCCEEDED = _state("SUCCEEDED")
    FAILED = _state("FAILED")
    SKIPPED = _state("SKIPPED")
    CANCELLED = _state("CANCELLED")


class RunState(metaclass=_States):
    """The states of a run; each is a string ("COMPLETED") with ``.value``."""
    PENDING = _state("PENDING")
    RUNNING = _state("RUNNING")
    COMPLETED = _state("COMPLETED")
    FAILED = _state("FAILED")
    CANCELLING = _state("CANCELLING")
    CANCELLED = _state("CANCELLED")


RunStatus = RunState        # the original's name for the run states


_FINISHED = (RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED)


class Event(tuple):
    """One transition of a run, as observers see it: ``(ts, kind, task, state, data)``.

    ``ts`` is a ``time.time()`` value, ``kind`` a key of ``EVENT_KINDS``,
    ``task`` the task's name (None for the run itself), ``state`` the state
    entered, ``data`` a dict of extra fields or None. A plain tuple underneath,
    so making one costs what a tuple costs; observers read events and never
    answer back into the run.
    """

    __slots__ = ()
    ts = property(lambda self: self[0])
    kind = property(lambda self: self[1])
    task = property(lambda self: self[2])
    state = property(lambda self: self[3])
    data = property(lambda self: self[4])

    def to_dict(self):
        """The event as it appears in a run record (time as an ISO string)."""
        ts, kind, task, state, data = self
        item = {"ts": _iso(ts), "event": kind, "task": task, "state": state}
        if data:
            item.update(data)
        return item

    def __repr__(self):
        return "Event(%s, %r, %r, %s%s)" % (_iso(self[0]), self[1], self[2], self[3],
                                             ", %r" % (self[4],) if self[4] else "")


# kind -> (log level, the word the trace prints). Every consumer of events (the
# trace, the logging bridge, the store's recorder, webhooks) reads this table.
EVENT_KINDS = {
    "run.started": ("INFO", "start"), "run.cancelling": ("WARNING", "cancel"),
    "run.completed": ("INFO", "done"), "run.failed": ("ERROR", "failed"),
    "run.cancelled": ("WARNING", "cancelled"),
    "task.started": ("INFO", "start"), "task.retrying": ("WARNING", "retry"),
    "task.succeeded": ("INFO", "done"), "task.failed": ("ERROR", "error"),
    "task.skipped": ("WARNING", "skip"), "task.cancelled": ("WARNING", "cancelled"),
    "webhook.delivered": ("INFO", "webhook"), "webhook.failed": ("WARNING", "webhook"),
}


_TASK_ENDS = ("task.succeeded", "task.failed", "task.skipped", "task.cancelled")


_RUN_ENDS = ("run.completed", "run.failed", "run.cancelled")


def _iso(ts):
    """A time.time() value as ISO 8601 UTC with milliseconds: 2026-11-29T05:10:11.123Z."""
    global _iso_second
    if ts is None:
        return None
    whole = int(ts)
    second, prefix = _iso_second
    if second != whole:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _iso_second = (whole, prefix)
    return "%s.%03dZ" % (prefix, int((ts - whole) * 1000))


def _describe(exc):
    try:
        text = str(exc)
    except Exception:           # an exception whose __str__ fails still gets reported
        text = "<str() of %s failed>" % type(exc).__name__
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


def _parse_iso(text):
    """An ISO 8601 UTC string as written by _iso, back to a Unix time; None stays None."""
    if not text:
        return None
    import calendar
    try:
        whole, _, frac = text.rstrip("Z").partition(".")
        seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
        return seconds + (int(frac) / 10 ** len(frac) if frac.isdigit() else 0.0)
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# Console lines, files and JSON
# ---------------------------------------------------------------------------

def _write_line(stream, line):
    """Write one whole line; lines from many threads never interleave."""
    if stream is None:
        stream = sys.stderr
    stream = getattr(stream, "_pyoco_original", stream)     # not into task logs
    if stream is None:
        return
    if _tees:
        _end_printed_lines()    # what this thread printed without newline ends first
    with _write_lock:
        if _held_lines:
            _write_held()
        if _live is not None and _live.covers(stream):
            _live.write(stream, line)       # above the progress lines, never on them
        else:
            _write_now(stream, line)


def _write_now(stream, text):
    try:
        stream.write(text)
        stream.flush()
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        stream.flush()
    except (OSError, ValueError):
        pass            # a closed or broken stream must not fail the run


def _hold_line(stream, line):
    """Write a trace line to a file or pipe within about 20 ms, together with
    the lines that come meanwhile: one write a batch instead of one a line.
    Anything else written through pyoco (task output, warnings, the next
    line written at once) writes the held lines first, so order is kept."""
    global _flusher
    if _tees:
        _end_printed_lines()
    with _write_lock:
        _held_lines.append((stream, line))
        if len(_held_lines) > 1:
            return
        if _flusher is None:
            import threading
            _flusher = [threading.Thread(target=_flush_held, name="pyoco-trace", daemon=True),
                        threading.Event()]
            _flusher[0].start()
        wake = _flusher[1]
    wake.set()


def _flush_held():
    """The flusher thread: writes held trace lines 20 ms after the first of a batch."""
    while True:
        flusher = _flusher
        flusher[1].wait()
        flusher[1].clear()
        time.sleep(0.02)
        with _write_lock:
            if _held_lines:
                _write_held()


def _write_held():
    """Write the held trace lines, joined per stream (the caller holds _write_lock)."""
    lines = list(_held_lines)
    del _held_lines[:]
    try:
        out = sys.__stdout__
        if out is not None:
            out.flush()         # task output printed before these lines comes first
    except (OSError, ValueError):
        pass
    start = 0
    for k in range(1, len(lines) + 1):
        if k == len(lines) or lines[k][0] is not lines[start][0]:
            _write_now(lines[start][0], "".join(text for _, text in lines[start:k]))
            start = k


def _flush_stdout():
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _warn(message):

    _write_line(None, "pyoco: warning: %s\n" % message)


def _temp_name(path):
    return "%s.%d.%s.tmp" % (path, os.getpid(), os.urandom(3).hex())


def _atomic_write(path, data):
    """Write bytes so that readers see the old file or the new one, never half."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(value):
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def _dumps(value, indent=None, ensure_ascii=False):
    """Strict JSON text (RFC 8259) of any value: every record, answer and
    webhook body is written here. NaN and infinities become "NaN",
    "Infinity" and "-Infinity"; what JSON cannot hold becomes its repr()."""
    import json
    try:
        return json.dumps(value, default=_json_default, ensure_ascii=ensure_ascii,
                          indent=indent, allow_nan=False)
    except (TypeError, ValueError):     # NaN, or dict keys JSON cannot have: a readable form
        return json.dumps(_jsonable(value), ensure_ascii=ensure_ascii, indent=indent,
                          allow_nan=False)


def _jsonable(value):
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, float):
        if value != value:
            return "NaN"
        return value if abs(value) != float("inf") else "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def _loads(text):
    """JSON text as data, refusing NaN and Infinity: RFC 8259 has neither."""
    import json

    def refuse(name):
        raise ValueError("%s is not JSON" % name)
    return json.loads(text, parse_constant=refuse)


def _one_line(text):
    """Text for a trace line: an error message's newlines must not break it."""
    text = str(text)
    if "\n" in text or "\r" in text:
        text = " ⏎ ".join(part for part in text.replace("\r\n", "\n").replace("\r", "\n")
                           .split("\n"))
    return text


# ---------------------------------------------------------------------------
# Output capture
# ---------------------------------------------------------------------------


class _Tee:
    """Stands in for sys.stdout/sys.stderr during runs: writes go to the real
    stream and, from a thread running a task, to that task's log.

    The real stream gets whole lines only, under the trace's lock: print()
    writes its text and its newline separately, and a trace line written in
    between would share the line. Each thread's unfinished line waits here
    until its newline, the end of the task's attempt, or the tee's removal.
    """

    def __init__(self, original, stream_name):
        self._pyoco_original = original
        self._pyoco_stream = stream_name
        self._pyoco_partial = {}        # thread id -> its line so far, without newline

    def write(self, text):
        me = _get_ident()
        owner = _print_owners.get(me)
        if owner is not None and text:
            owner[0].feed(owner[1], self._pyoco_stream, text)
        partial = self._pyoco_partial
        if "\n" not in text:
            if text:
                held = partial.get(me, "") + text
                if "\r" in held:       # a progress bar redrawn in place: its last state will do
                    held = held.rpartition("\r")[2] or held
                partial[me] = held
            return len(text)
        whole, _, rest = (partial.pop(me, "") + text).rpartition("\n")
        if rest:
            partial[me] = rest
        with _write_lock:
            if _held_lines:
                _write_held()
            if _live is not None and _live.covers(self._pyoco_original):
                _live.write(self._pyoco_original, whole + "\n")
            else:
                self._pyoco_original.write(whole + "\n")
        return len(text)

    def flush(self):
        with _write_lock:
            if _held_lines:
                _write_held()
            self._pyoco_original.flush()

    def _pyoco_end_lines(self, thread=None):
        """Write out the unfinished line of ``thread`` (None: of every thread),
        ended with a newline so that what comes next starts a line of its own."""
        if thread is None:
            rests = [self._pyoco_partial.pop(t, "") for t in list(self._pyoco_partial)]
        else:
            rests = [self._pyoco_partial.pop(thread, "")]
        rests = [rest for rest in rests if rest]
        if rests:
            with _write_lock:
                if _held_lines:
                    _write_held()
                text = "".join(rest + "\n" for rest in rests)
                if _live is not None and _live.covers(self._pyoco_original):
                    _live.write(self._pyoco_original, text)
                    return
                try:
                    self._pyoco_original.write(text)
                except (OSError, ValueError):
                    pass            # a closed stream: nothing to finish

    def __getattr__(self, name):
        return getattr(self._pyoco_original, name)


def _end_printed_lines():
    """A task's attempt is over: what its thread printed without newline goes out."""
    me = _get_ident()
    for tee in list(_tees.values()):
        if tee._pyoco_partial:
            tee._pyoco_end_lines(me)


def _after_fork():
    """In a forked child (a process pool's worker): a lock some other thread
    held at the fork would stay taken for good, so both start free."""
    global _write_lock, _tee_lock, _flusher, _live
    _write_lock, _tee_lock, _flusher, _live = _allocate_lock(), _allocate_lock(), None, None
    del _held_lines[:]                  # the parent writes its own
    for tee in list(_tees.values()):
        tee._pyoco_partial.clear()      # the parent's unfinished lines are the parent's


def _tee_install():
    global _tee_users, _fork_hooked
    with _tee_lock:
        if not _fork_hooked and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork)
            _fork_hooked = True
        _tee_users += 1
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if current is not None and not isinstance(current, _Tee):
                tee = _tees.get(name)
                if tee is None or tee._pyoco_original is not current:
                    tee = _tees[name] = _Tee(current, name)
                    _retired_tees.append(tee)
                    del _retired_tees[:-8]
                setattr(sys, name, tee)


def _tee_remove():
    global _tee_users
    with _tee_lock:
        _tee_users -= 1
        if _tee_users:
            return
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if isinstance(current, _Tee):       # leave alone what someone else put there
                setattr(sys, name, current._pyoco_original)
        for tee in list(_tees.values()):
            tee._pyoco_end_lines()


def _task_logger(task_name):
    """The logger behind ctx.log; INFO and up also land in the running task's log."""
    import logging
    parent = logging.getLogger("pyoco.task")
    if not getattr(parent, "_pyoco_ready", False):
        class TaskLogHandler(logging.Handler):
            def emit(self, record):
                owner = _print_owners.get(_get_ident())
                if owner is not None:
                    owner[0].feed(owner[1], "log", "%s %s\n" % (record.levelname,
                                                                 self.format(record)))
        parent.addHandler(TaskLogHandler(logging.INFO))
        if parent.level == logging.NOTSET:
            parent.setLevel(logging.INFO)
        parent._pyoco_ready = True
    return logging.getLogger("pyoco.task." + task_name)


# ---------------------------------------------------------------------------
# Model: tasks
# ---------------------------------------------------------------------------

def _touch():
    global _generation
    _generation += 1


class _WatchedDict(dict):
    """A dict that calls ``self._changing()`` before every change."""

    __slots__ = ()

    def _changing(self):
        pass

    def __setitem__(self, key, value):
        self._changing()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        self._changing()
        dict.__delitem__(self, key)

    def __ior__(self, other):
        self._changing()
        dict.update(self, other)
        return self

    def _mutator(name):
        method = getattr(dict, name)

        def mutate(self, *args, **kwargs):
            self._changing()
            return method(self, *args, **kwargs)
        mutate.__name__ = name
        return mutate

    update = _mutator("update")
    pop = _mutator("pop")
    popitem = _mutator("popitem")
    clear = _mutator("clear")
    setdefault = _mutator("setdefault")
    del _mutator


class _Inputs(_WatchedDict):
    """A task's ``inputs`` mapping; changing it makes compiled plans stale."""

    __slots__ = ()
    _changing = staticmethod(_touch)


_FAIL_POLICIES = ("stop", "isolate")


_OPTIONS = ("name", "inputs", "retries", "retry_delay", "timeout",
            "fail_policy", "cache", "pool", "max_parallel", "run_if", "when",
            "version", "cache_ttl", "cache_key", "outputs")
_CACHE_LEVELS = (False, "resume", True)     # Task.cache; its index is the plan's cache level
# The original pyoco's option names, accepted as the options they mean (SPEC section 15).
_ALIASES = {"timeout_sec": "timeout", "trigger_policy": "run_if"}
_TRIGGER_POLICIES = {"ALL": "all_succeeded", "ANY": "any_succeeded"}
_OUTPUT_ROOTS = ("scratch", "results", "params")
_RUN_IF = ("all_succeeded", "none_failed", "any_succeeded", "all_done", "any_failed")


def _closest(word, choices):
    """ "; did you mean 'x'?" for the choice nearest to ``word``, or "" when none is near."""
    import difflib
    near = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return "; did you mean %r?" % near[0] if near else ""


def _translate_alias(node, key, value):
    """The option an original pyoco name means: (name, value)."""
    if key == "trigger_policy":
        if value not in _TRIGGER_POLICIES:
            raise FlowError("task %r: trigger_policy must be 'ALL' or 'ANY', not %r%s (or use"
                            " run_if=...)" % (getattr(node, "name", None), value,
                                              _closest(value, _TRIGGER_POLICIES)))
        value = _TRIGGER_POLICIES[value]
    return _ALIASES[key], value


def _check_outputs(node, value):
    """``outputs``: dotted paths under scratch, results or params; as a tuple of paths."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError("task %r: outputs must be a list of paths such as ['scratch.key'],"
                        " not %r" % (getattr(node, "name", None), value))
    paths = []
    for path in value:
        parts = path.split(".") if isinstance(path, str) else ()
        if len(parts) < 2 or parts[0] not in _OUTPUT_ROOTS or not all(parts):
            raise FlowError("task %r: bad output path %r%s; write scratch.KEY, results.KEY or"
                            " params.KEY (more .key steps nest dicts)"
                            % (getattr(node, "name", None), path,
                               _closest(parts[0], _OUTPUT_ROOTS) if parts else ""))
        paths.append(tuple(parts))
    return tuple(paths)


def _unknown_options(kind, unknown, known):
    """The TypeError for unknown keywords: each named, with the closest valid one."""
    first = sorted(unknown)[0]
    return TypeError("unknown %s option%s %s%s (the options are: %s)" % (
        kind, "s" if len(unknown) > 1 else "", ", ".join(sorted(map(repr, unknown))),
        _closest(first, known), ", ".join(known)))


class Task:
    """A node of a flow.

    Subclass it and implement ``run(self, ctx, **inputs)``, or decorate a
    function with ``@task``. Options are attributes and can be changed after
    the task is in a flow:

    - ``name``: unique within a flow (default: class or function name)
    - ``inputs``: parameter name -> value or ``$`` expression
    - ``retries``: extra attempts after a failure (default 0)
    - ``retry_delay``: seconds before the first retry, doubling each time,
      at most ``Task.max_retry_delay`` (default 0)
    - ``timeout``: seconds an attempt may take, enforced at the deadline
    - ``fail_policy``: ``"stop"`` (nothing new starts) or ``"isolate"``
      (only tasks downstream of this one are skipped)
    - ``cache``: ``"resume"`` (default: only ``--resume`` reuses its output),
      ``True`` (any later run reuses it while its code and inputs are
      unchanged) or ``False`` (always runs, even when resumed)
    - ``version``: stands for the code in the cache fingerprint; bump it to
      invalidate (default: a hash of the function's code)
    - ``cache_ttl``: seconds; older cached outputs are not reused
    - ``cache_key``: ``cache_key(ctx, inputs) -> str`` replaces the inputs
      in the fingerprint (and implies ``cache=True``)
    - ``pool``: the name of a pool (see ``Flow(pools=...)``) the task takes a
      slot of while it runs
    - ``max_parallel``: at most this many of its map instances run at once
    - ``run_if``: which upstream outcomes let it start: ``"all_succeeded"``
      (default), ``"none_failed"``, ``"any_succeeded"``, ``"all_done"`` or
      ``"any_failed"``
    - ``when``: a ``$`` expression; the task runs only when it is truthy
    - ``outputs``: paths such as ``["scratch.model"]`` (also ``results.`` and
      ``params.``) where the return value is stored as well

    The original pyoco's names work too: ``Task(func=f, name=...)`` makes a
    node of a function, ``timeout_sec`` is ``timeout`` and ``trigger_policy``
    ``"ALL"``/``"ANY"`` is ``run_if`` ``"all_succeeded"``/``"any_succeeded"``;
    ``dependencies`` and ``dependents`` are the node's edges as sets.
    """

    name = None
    inputs = None
    retries = 0
    retry_delay = 0.0
    timeout = None
    fail_policy = "stop"
    cache = "resume"
    pool = None
    max_parallel = None
    run_if = "all_succeeded"
    when = None
    version = None
    cache_ttl = None
    cache_key = None
    outputs = ()
    max_retry_delay = 60.0

    def __new__(cls, *args, **options):
        if cls is Task and (options.get("func") is not None or (args and callable(args[0]))):
            # Task(func=f, name=...): the original's way to make a node of a function
            return object.__new__(FunctionTask)
        return object.__new__(cls)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def __init__(self, name=None, **options):
        if name is not None:
            self.name = name
        func = options.pop("func", None)
        if func is not None and func != getattr(self, "run", None):
            object.__setattr__(self, "run", func)       # the original's Task(func=...) subclasses
        unknown = set(options) - set(_OPTIONS) - set(_ALIASES)
        if unknown:
            raise _unknown_options("task", unknown, _OPTIONS + tuple(_ALIASES))
        self.inputs = options.pop("inputs", None) or dict(type(self).inputs or {})
        for key, value in options.items():
            setattr(self, key, value)

    def __setattr__(self, key, value):
        if key in _ALIASES:
            key, value = _translate_alias(self, key, value)
        if key == "inputs":
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise TypeError("task %r: inputs must be a dict, not %s"
                                % (getattr(self, "name", None), type(value).__name__))
            value = _Inputs(value)
        elif key == "fail_policy" and value not in _FAIL_POLICIES:
            raise ValueError("task %r: fail_policy must be 'stop' or 'isolate', not %r"
                             % (getattr(self, "name", None), value))
        elif key == "retries" and (not isinstance(value, int) or isinstance(value, bool)
                                   or value < 0):
            raise ValueError("task %r: retries must be a whole number >= 0, not %r"
                             % (getattr(self, "name", None), value))
        elif key == "retry_delay" and (not isinstance(value, (int, float))
                                       or isinstance(value, bool) or not value >= 0):
            raise ValueError("task %r: retry_delay must be seconds >= 0, not %r"
                             % (getattr(self, "name", None), value))
        elif key == "timeout" and value is not None and (
                not isinstance(value, (int, float)) or isinstance(value, bool)
                or not value > 0):
            raise ValueError("task %r: timeout must be seconds > 0 or None, not %r"
                             % (getattr(self, "name", None), value))
        elif key in ("run_if", "pool", "max_parallel", "when"):
            _check_flow_option(self, key, value)
        elif key in ("cache", "version", "cache_ttl", "cache_key"):
            _check_cache_option(self, key, value)
        elif key == "outputs":
            _check_outputs(self, value)
            value = list(value)
        _touch()
        object.__setattr__(self, key, value)

    # The original pyoco's names for options and edges (SPEC section 15).

    timeout_sec = property(lambda self: self.timeout, doc="The original's name of timeout.")

    @property
    def trigger_policy(self):
        """The original's name of run_if: "ALL", "ANY", or the run_if rule."""
        for policy, rule in _TRIGGER_POLICIES.items():
            if self.run_if == rule:
                return policy
        return self.run_if

    @property
    def dependencies(self):
        """The tasks this one runs after (in any flow), as a set; adding one adds an edge."""
        return _Edges(self, upstream=True)

    @dependencies.setter
    def dependencies(self, nodes):
        _Edges(self, upstream=True).replace(nodes)

    @property
    def dependents(self):
        """The tasks that run after this one (in any flow), as a set; adding one adds an edge."""
        return _Edges(self, upstream=False)

    @dependents.setter
    def dependents(self, nodes):
        _Edges(self, upstream=False).replace(nodes)

    def __rshift__(self, other):
        return _link([self], other)

    def __rrshift__(self, other):
        return _link(other, self)

    def __and__(self, other):
        return _Group([self]) & other

    def __or__(self, other):
        return _OrJoin([self]) | other

    def __getstate__(self):
        # Edges point at other nodes (and back): a node travels without them.
        return {key: value for key, value in self.__dict__.items()
                if key not in ("_ups", "_downs")}

    @property
    def task(self):
        """The node itself (decorated functions expose their node the same way)."""
        return self

    def run(self, ctx, **inputs):
        raise NotImplementedError("%s must implement run(self, ctx, **inputs)"
                                  % type(self).__name__)

    def _callable(self):
        return self.run

    def map(self, over, name=None):
        """A node that runs this task once per item of ``over`` (see MapTask)."""
        return MapTask(self, over, name)

    def __repr__(self):
        return "<%s %r>" % (type(self).__name__, self.name)

    def __reduce_ex__(self, protocol):
        # By class reference plus state, with the defining file as a fallback
        # for flow files that a new process cannot import by name.
        cls = type(self)
        module = sys.modules.get(cls.__module__)
        return (_rebuild_task, (cls.__module__, cls.__qualname__,
                                getattr(module, "__file__", None), self.__getstate__()))


class _Edges:
    """``node.dependencies`` / ``node.dependents``: a live set of nodes.

    It holds the edges made on the nodes themselves (``b.dependencies.add(a)``,
    ``a >> b``, which every flow holding both nodes follows) and those of the
    flows the node is in. Adding or discarding changes the nodes' own edges.
    """

    __slots__ = ("node", "upstream")

    def __init__(self, node, upstream):
        self.node, self.upstream = node, upstream

    def _own(self, node):
        key = "_ups" if self.upstream else "_downs"
        edges = node.__dict__.get(key)
        if edges is None:
            edges = {}
            object.__setattr__(node, key, edges)
        return edges

    def _all(self):
        found = dict.fromkeys(self.node.__dict__.get("_ups" if self.upstream else "_downs", ()))
        for flow in list(_flows or ()):
            graph = flow._upstream
            if self.upstream:
                found.update(dict.fromkeys(graph.get(self.node, ())))
            else:
                found.update((down, None) for down, ups in graph.items() if self.node in ups)
        return found

    def add(self, other):
        other = _as_node(other, "task %r dependencies" % (self.node.name,))
        if other is self.node:
            raise FlowError("task %r cannot run after itself" % (self.node.name,),
                            cycle=[self.node.name, self.node.name])
        global _node_edges
        up, down = (other, self.node) if self.upstream else (self.node, other)
        _Edges(down, True)._own(down)[up] = None
        _Edges(up, False)._own(up)[down] = None
        _node_edges += 1
        _touch()

    def update(self, others):
        for other in others:
            self.add(other)

    def replace(self, others):
        """``node.dependencies = {...}``: the node's own edges become these."""
        others = list(others)
        for old in list(self.node.__dict__.get("_ups" if self.upstream else "_downs", ())):
            self.discard(old)
        self.update(others)

    def discard(self, other):
        other = _as_node(other, "task %r dependencies" % (self.node.name,))
        up, down = (other, self.node) if self.upstream else (self.node, other)
        down.__dict__.get("_ups", {}).pop(up, None)
        up.__dict__.get("_downs", {}).pop(down, None)
        for flow in list(_flows or ()):
            flow._upstream.get(down, {}).pop(up, None)
        _touch()

    def remove(self, other):
        if _as_node(other) not in self:
            raise KeyError(other)
        self.discard(other)

    def __contains__(self, other):
        return getattr(other, "task", None) in self._all()

    def __iter__(self):
        return iter(list(self._all()))

    def __len__(self):
        return len(self._all())

    def __eq__(self, other):
        return set(self._all()) == set(other)

    __hash__ = None

    def __repr__(self):
        return "{%s}" % ", ".join(map(repr, self._all()))


class _Group(list):
    """``a & b``: tasks that run side by side, as ``[a, b]`` in a chain."""

    def __and__(self, other):
        return type(self)(self + _flat(other))

    def __or__(self, other):
        return _OrJoin(self + _flat(other))

    def __rshift__(self, other):
        return _link(self, other)

    def __rrshift__(self, other):
        return _link(other, self)


class _OrJoin(_Group):
    """``a | b``: what follows runs once any of them succeeded (run_if="any_succeeded")."""

    def __and__(self, other):
        return _OrJoin(self + _flat(other))

    __or__ = __and__


def _flat(items):
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _link(left, right):
    """``a >> b`` outside a flow: edges on the nodes themselves. Returns ``right``."""
    targets = [_as_node(t, "a >> b") for t in _flat(right)]
    for target in targets:
        if isinstance(left, _OrJoin):
            target.run_if = "any_succeeded"
        for source in _flat(left):
            target.dependencies.add(source)
    return right


def _check_flow_option(node, key, value):
    name = getattr(node, "name", None)
    if key == "run_if" and value not in _RUN_IF:
        raise FlowError("task %r: unknown run_if %r%s (the rules are: %s)"
                        % (name, value, _closest(value, _RUN_IF), ", ".join(_RUN_IF)))
    if key == "pool" and value is not None and (not isinstance(value, str) or not value):
        raise FlowError("task %r: pool must be a pool's name (a string), not %r" % (name, value))
    if key == "max_parallel" and value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError("task %r: max_parallel must be a whole number >= 1 or None, not %r"
                         % (name, value))
    if key == "when" and value is not None and not (isinstance(value, str)
                                                    and value.startswith("$")):
        raise FlowError("task %r: when must be a $ expression such as"
                        " '$node.check.output.changed', not %r" % (name, value))


def _check_cache_option(node, key, value):
    name = getattr(node, "name", None)
    if key == "cache" and not any(value is level or (type(value) is str and value == level)
                                  for level in _CACHE_LEVELS):
        raise ValueError("task %r: cache must be True, False or 'resume', not %r%s"
                         % (name, value, _closest(value, ["resume"])))
    if key == "version" and value is not None and not isinstance(value, (str, int)):
        raise ValueError("task %r: version must be a string or a number, not %r" % (name, value))
    if key == "cache_ttl" and value is not None and (
            not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
        raise ValueError("task %r: cache_ttl must be seconds > 0 or None, not %r"
                         % (name, value))
    if key == "cache_key" and value is not None and not callable(value):
        raise ValueError("task %r: cache_key must be a function (ctx, inputs) -> str, not %r"
                         % (name, value))


def _cache_level(source):
    """0 (cache=False), 1 ("resume") or 2 (True, or a cache_key with the default level)."""
    if source.cache is True or source.cache is False:
        return 2 if source.cache else 0
    return 2 if source.cache_key is not None else 1


class FunctionTask(Task):
    """The node made by ``@task``: calling it calls the plain function.

    Its attributes are the task options: assigning any other public name
    (a misspelling such as ``fn.task.timout = 5``) is an AttributeError.
    """

    _OWN = ("func", "max_retry_delay", "timeout_sec", "trigger_policy", "dependencies",
            "dependents", "__module__", "__name__", "__qualname__", "__doc__",
            "__wrapped__")

    def __setattr__(self, key, value):
        if key not in _OPTIONS and key not in self._OWN and not key.startswith("_"):
            raise AttributeError("task %r has no option %r%s (the options are: %s)"
                                 % (self.name, key, _closest(key, _OPTIONS),
                                    ", ".join(_OPTIONS)))
        Task.__setattr__(self, key, value)

    def __init__(self, func, **options):
        object.__setattr__(self, "func", func)
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            try:
                object.__setattr__(self, attr, getattr(func, attr))
            except AttributeError:
                pass
        object.__setattr__(self, "__wrapped__", func)
        if options.get("name") is None:
            options["name"] = getattr(func, "__name__", None) or repr(func)
        super().__init__(**options)

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    def run(self, ctx, **inputs):
        return self.func(ctx, **inputs)

    def _callable(self):
        return self.func

    def __repr__(self):
        return "<task %r>" % (self.name,)

    def __reduce_ex__(self, protocol):
        # A decorated function is pickled as "the task named X in module Y";
        # the plain function cannot be, since X now names this object.
        module = sys.modules.get(self.__module__)
        try:
            found = _find_object(self.__module__, self.__qualname__, None)
        except Exception:
            found = None
        if found is self:
            return (_find_object, (self.__module__, self.__qualname__,
                                   getattr(module, "__file__", None)))
        return object.__reduce_ex__(self, protocol)


class MapTask(Task):
    """The node made by ``some_task.map(over)``: one instance of the task per item.

    ``over`` is a ``$`` expression (``"$node.list_files.output"``) or a list.
    When the node's turn comes, each item becomes a task of its own, named
    ``name[0]``, ``name[1]``, ..., with the item as the first parameter after
    ``ctx``; all run in parallel with the base task's options. The node's
    output is the list of their outputs, in item order.
    """

    def __init__(self, base, over, name=None):
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "over", over)
        super().__init__(name=name or base.name)

    def _callable(self):
        return self.base._callable()

    def map(self, over, name=None):
        raise FlowError("task %r is already a map; a map of a map is not supported: have the"
                        " upstream task return one flat list of items (pairs, for two levels)"
                        " and map over that, or map a task that loops over its item"
                        % (self.name,))

    def __repr__(self):
        return "<map of %r over %r>" % (self.base.name, self.over)


def task(func=None, **options):

    """Make a function a task: ``@task`` or ``@task(name=..., retries=...)``.

    The result is still callable as the plain function (handy in unit tests)
    and has ``.task``, the node whose options (see ``Task``) can be set.
    """
    if func is None:
        return lambda f: FunctionTask(f, **options)
    if not callable(func):
        raise TypeError("@task decorates a function, not %r; use @task(name=...) for options"
                        % (func,))
    return FunctionTask(func, **options)


def _as_node(obj, where="flow"):
    node = getattr(obj, "task", None)
    if isinstance(node, Task):
        return node
    if isinstance(obj, type) and issubclass(obj, Task):
        raise TypeError("%s: got the class %s; put an instance in the flow: %s()"
                        % (where, obj.__name__, obj.__name__))
    raise TypeError("%s: expected a task (an @task function or a Task instance), got %r"
                    % (where, obj))


def _load_module(module_name, filename):
    """The module a pickled task came from, loaded from its file if need be
    (a flow file run by the CLI is not importable by name in a new process)."""
    module = sys.modules.get(module_name)
    if module_name == "__main__" and filename and module is not None and os.path.abspath(
            getattr(module, "__file__", None) or "") != os.path.abspath(filename):
        module_name = "__pyoco_main__"      # a worker's own __main__ (Ray's) is not the script
        module = sys.modules.get(module_name)
    if module is None:
        import importlib
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if not filename:
                raise
            import importlib.util
            spec = importlib.util.spec_from_file_location(module_name, filename)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    return module


def _find_object(module_name, qualname, filename):
    obj = _load_module(module_name, filename)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _rebuild_task(module_name, qualname, filename, state):
    cls = _find_object(module_name, qualname, filename)
    node = cls.__new__(cls)
    node.__dict__.update(state)
    return node


# ---------------------------------------------------------------------------
# Model: expressions
# ---------------------------------------------------------------------------

# Binding kinds: how the engine finds a parameter's value when a task starts.
_B_CONST, _B_NODE, _B_PARAM, _B_SCRATCH, _B_ENV, _B_FLOWPARAM = range(6)


_EXPRESSION_FORMS = "$node.NAME.output, $ctx.params.KEY, $ctx.scratch.KEY or $env.NAME"


def _parse_expression(text, names, where):
    """Parse a ``$`` input into (kind, key, path); raise FlowError when bad.

    ``names`` maps task names to their index in the flow.
    """
    if text.startswith("$$"):
        return (_B_CONST, text[1:], ())
    body = text[1:]
    if body.startswith("node."):
        rest = body[5:]
        marker = rest.find(".output")
        while marker != -1 and rest[marker + 7:marker + 8] not in ("", "."):
            marker = rest.find(".output", marker + 1)
        if marker <= 0:
            raise FlowError("%s: bad expression %r; a node reference reads $node.NAME.output"
                            " (optionally followed by .key steps)" % (where, text))
        name = rest[:marker]
        if name not in names:
            raise FlowError("%s: %r refers to task %r, which is not in the flow"
                            % (where, text, name))
        path = tuple(step for step in rest[marker + 8:].split(".") if step)
        return (_B_NODE, names[name], path)
    for prefix, kind in (("ctx.params.", _B_PARAM), ("ctx.scratch.", _B_SCRATCH),
                         ("env.", _B_ENV)):
        if body.startswith(prefix):
            key, *path = body[len(prefix):].split(".")
            if not key or (kind == _B_ENV and path):
                break
            return (kind, key, tuple(path))
    raise FlowError("%s: unknown expression %r; use %s (write $$ for a literal $)"
                    % (where, text, _EXPRESSION_FORMS))


def _step(value, steps, text):
    for step in steps:
        try:
            if isinstance(value, dict):
                value = value[step]
            elif isinstance(value, (list, tuple)) and step.lstrip("-").isdigit():
                value = value[int(step)]
            else:
                value = getattr(value, step)
        except (KeyError, IndexError, AttributeError, TypeError):
            raise LookupError("%s: no %r in %s value" % (text, step, type(value).__name__)) from None
    return value


def _is_coroutine_function(fn):
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return bool(code is not None and code.co_flags & 0x80)     # CO_COROUTINE


def _parameters(fn):

    """Return ([(name, kind, default)], accepts_var_keywords) for a callable.

    Reads the code object directly: ``inspect`` costs more to import than
    the rest of pyoco.
    """
    skip = 0
    if hasattr(fn, "__func__") and getattr(fn, "__self__", None) is not None:
        fn, skip = fn.__func__, 1
    code = getattr(fn, "__code__", None)
    if code is None:
        import inspect
        params, varkw = [], False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                varkw = True
            elif p.kind is not p.VAR_POSITIONAL:
                kind = {p.POSITIONAL_ONLY: "posonly", p.KEYWORD_ONLY: "kwonly"}.get(p.kind, "pos")
                default = _MISSING if p.default is p.empty else p.default
                params.append((p.name, kind, default))
        return params, varkw
    nargs, nkw = code.co_argcount, code.co_kwonlyargcount
    names = code.co_varnames[:nargs + nkw]
    defaults = fn.__defaults__ or ()
    kwdefaults = fn.__kwdefaults__ or {}
    posonly = getattr(code, "co_posonlyargcount", 0)
    params = []
    for position, name in enumerate(names):
        if position < nargs:
            kind = "posonly" if position < posonly else "pos"
            d = position - (nargs - len(defaults))
            default = defaults[d] if d >= 0 else _MISSING
        else:
            kind = "kwonly"
            default = kwdefaults.get(name, _MISSING)
        params.append((name, kind, default))
    return params[skip:], bool(code.co_flags & 0x08)


# ---------------------------------------------------------------------------
# Model: flows
# ---------------------------------------------------------------------------

_FLOW_OPTIONS = ("pools", "schedule", "schedule_tz", "schedule_overlap", "schedule_catchup")
_SCHEDULE_OPTIONS = {"schedule_overlap": ("skip", "allow"), "schedule_catchup": ("latest", "none")}


def _parse_pools(pools, where):
    """``{NAME: SIZE or {"size": SIZE, "rate": "N/s"}}`` as {NAME: (size, rate or None)},
    rate being (starts, period in seconds); FlowError says what is wrong."""
    out = {}
    for name, spec in (pools or {}).items():
        size, rate = spec, None
        if isinstance(spec, dict):
            unknown = set(spec) - {"size", "rate"}
            if unknown:
                raise FlowError("%s: pool %r has unknown key%s %s%s (a pool has size and rate)"
                                % (where, name, "s" if len(unknown) > 1 else "",
                                   ", ".join(sorted(map(repr, unknown))),
                                   _closest(sorted(unknown)[0], ("size", "rate"))))
            size, rate = spec.get("size"), spec.get("rate")
        if not isinstance(name, str) or not name:
            raise FlowError("%s: a pool's name must be a non-empty string, not %r" % (where, name))
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise FlowError("%s: pool %r needs a size, a whole number >= 1, not %r"
                            % (where, name, size))
        out[name] = (size, _parse_rate(rate, "%s: pool %r" % (where, name)))
    return out


def _parse_rate(rate, where):
    if rate is None:
        return None
    text = str(rate).strip()
    count, _, unit = text.partition("/")
    periods = {"s": 1.0, "m": 60.0, "h": 3600.0}
    if not count.strip().isdigit() or int(count) < 1 or unit.strip() not in periods:
        raise FlowError("%s: bad rate %r; write starts per period: '10/s', '30/m' or '100/h'"
                        % (where, rate))
    return int(count), periods[unit.strip()]


class Flow:
    """A named DAG of tasks.

    ``flow >> a >> [b, c] >> d`` chains and fans out/joins;
    ``flow.add(task, after=[...])`` adds a node with any set of upstreams.
    A task is one node however often it is mentioned; adding it again only
    adds the new edges. ``flow >> x`` always starts a new chain at ``x``.
    """

    def __setattr__(self, key, value):
        if not key.startswith(("_", "schedule")):
            _touch()            # a renamed flow, new pools: the next run compiles again
        object.__setattr__(self, key, value)

    def __init__(self, name="main", **options):
        unknown = set(options) - set(_FLOW_OPTIONS)
        if unknown:
            raise _unknown_options("Flow", unknown, ("name",) + _FLOW_OPTIONS)
        self.name = name
        self.pools = dict(options.get("pools") or {})   # NAME -> size or {"size", "rate"}
        _parse_pools(self.pools, "flow %r" % (name,))
        self._upstream = {}         # node -> {upstream node: None}, insertion ordered
        self._plan = None
        self._plan_generation = -1
        self._schedule = None       # a _Schedule once `schedule` is set (see Model: schedules)
        self._schedule_tz = None    # the zone's name as given, or None for the server's local time
        self._schedule_overlap = "skip"
        self._schedule_catchup = "latest"
        for key in ("schedule_tz", "schedule", "schedule_overlap", "schedule_catchup"):
            if options.get(key) is not None:
                setattr(self, key, options[key])
        global _flows
        if _flows is None:
            import weakref
            _flows = weakref.WeakSet()
        _flows.add(self)

    # -- scheduling (only `pyoco serve` acts on it; see Model: schedules)

    @property
    def schedule(self):
        """When ``pyoco serve`` starts this flow: cron, ``@daily``, ``every 15m``, or None."""
        return self._schedule.text if self._schedule is not None else None

    @schedule.setter
    def schedule(self, text):
        self._schedule = None if text is None else _Schedule(
            text, self._schedule_tz, "flow %r" % (self.name,))

    @property
    def schedule_tz(self):
        """The schedule's time zone ("Area/City"); None: the server's local time."""
        return self._schedule_tz

    @schedule_tz.setter
    def schedule_tz(self, name):
        where = "flow %r" % (self.name,)
        _time_zone(name, where)
        if self._schedule is not None:
            self._schedule = _Schedule(self._schedule.text, name, where)
        self._schedule_tz = name

    def _schedule_choice(key):
        def get(self):
            return getattr(self, "_" + key)

        def put(self, value):
            choices = _SCHEDULE_OPTIONS[key]
            if value not in choices:
                raise FlowError("flow %r: %s must be %s, not %r%s" % (
                    self.name, key, " or ".join(map(repr, choices)), value,
                    _closest(value, choices)))
            object.__setattr__(self, "_" + key, value)
        return property(get, put, doc="%s: %s (the first is the default)"
                        % (key, " or ".join(_SCHEDULE_OPTIONS[key])))

    schedule_overlap = _schedule_choice("schedule_overlap")
    schedule_catchup = _schedule_choice("schedule_catchup")
    del _schedule_choice

    # -- building

    def _add(self, node, upstream):
        ups = self._upstream.get(node)
        if ups is None:
            ups = self._upstream[node] = {}
        for up in upstream:
            if up is node:
                raise FlowError("flow %r: task %r cannot run after itself" % (self.name, node.name),
                                cycle=[node.name, node.name])
            if up not in self._upstream:
                self._upstream[up] = {}
            ups[up] = None
        _touch()

    def _nodes_of(self, items):
        if isinstance(items, (list, tuple, set, frozenset)):
            if isinstance(items, (set, frozenset)):
                items = sorted(items, key=lambda x: _as_node(x).name)
            return [_as_node(item, "flow %r" % self.name) for item in items]
        return [_as_node(items, "flow %r" % self.name)]

    def __rshift__(self, other):
        nodes = self._nodes_of(other)
        for node in nodes:
            self._add(node, ())
        return _Chain(self, nodes, isinstance(other, _OrJoin))

    def add(self, task, after=()):
        """Add ``task`` to run after every task in ``after`` (a task or a list).

        Upstream tasks not yet in the flow are added too. Returns a chain, so
        ``flow.add(c, after=[a, b]) >> d`` works.
        """
        node = _as_node(task, "flow %r" % self.name)
        upstream = self._nodes_of(after) if after else []
        self._add(node, upstream)
        return _Chain(self, [node])

    def add_task(self, task):
        """The original pyoco's name for ``add(task)``: the node's own edges
        (``node.dependencies``) are followed when the flow runs."""
        return self.add(task)

    def _graph(self):
        """node -> upstream nodes: the flow's edges and those made on its nodes
        (a node's own upstream tasks join the flow, as with ``add(after=...)``)."""
        graph = self._upstream
        if not _node_edges or not any("_ups" in node.__dict__ for node in graph):
            return graph
        merged, todo = {}, list(graph)
        while todo:
            node = todo.pop(0)
            if node in merged:
                continue
            ups = dict(graph.get(node, {}))
            ups.update(node.__dict__.get("_ups", {}))
            merged[node] = ups
            todo.extend(up for up in ups if up not in merged and up not in todo)
        return {node: merged[node] for node in list(graph) + [n for n in merged
                                                             if n not in graph]}

    # -- reading

    @property
    def tasks(self):
        """The flow's nodes, in the order they were added."""
        return list(self._upstream)

    def upstream(self, task):
        """The nodes ``task`` was explicitly added after."""
        return list(self._upstream[_as_node(task)])

    def __contains__(self, task):
        node = getattr(task, "task", None)
        return node in self._upstream

    def __len__(self):
        return len(self._upstream)

    def __repr__(self):
        return "<Flow %r: %d tasks>" % (self.name, len(self._upstream))

    def validate(self, params=None):
        """Check the flow without running it; raise FlowError when it is wrong.

        With ``params`` (a dict) also check that every parameter a task needs
        is supplied. Returns the names of run parameters the flow needs and
        nothing supplies when ``params`` is None.
        """
        plan = self._compile()
        return plan.bind(params or {}, strict=params is not None)[1]

    # -- compiling

    def _compile(self):
        """The flow as a compact, index-based plan; cached until anything changes."""
        if self._plan is not None and self._plan_generation == _generation:
            return self._plan
        import gc
        generation = _generation
        collecting = gc.isenabled()
        gc.disable()            # compiling makes many small lists that never form cycles
        try:
            self._plan = _Plan(self)
        finally:
            if collecting:
                gc.enable()
        self._plan_generation = generation
        return self._plan


class _Chain:
    """What ``flow >> x`` returns: remembers the last tasks to chain from."""

    __slots__ = ("flow", "tails", "any")

    def __init__(self, flow, tails, any=False):
        self.flow, self.tails = flow, tails
        self.any = any              # the tails are an OR-join (a | b): what follows needs one

    def __rshift__(self, other):
        nodes = self.flow._nodes_of(other)
        for node in nodes:
            self.flow._add(node, self.tails)
            if self.any:
                node.run_if = "any_succeeded"
        return _Chain(self.flow, nodes, isinstance(other, _OrJoin))

    def __repr__(self):
        return "<chain of flow %r at %s>" % (self.flow.name, ", ".join(n.name for n in self.tails))


# ---------------------------------------------------------------------------
# Model: schedules
# ---------------------------------------------------------------------------

# When `pyoco serve` starts a flow. A cron schedule is searched on the wall
# clock of its zone, a minute at a time but skipping whole months, days and
# hours that cannot match. An interval ("every 15m") is the multiples of its
# length since 1970-01-01T00:00Z, the same instants on every server.
# Daylight saving time: a wall time that does not exist (the clock jumps
# forward) fires once, at the first minute that does; a wall time that
# happens twice (the clock goes back) fires once, at its first occurrence.

_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
                ("month", 1, 12), ("day of week", 0, 7))
_CRON_NAMES = {3: ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                   "nov", "dec"),
               4: ("sun", "mon", "tue", "wed", "thu", "fri", "sat")}
_CRON_SHORTHANDS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
                    "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *"}
_INTERVAL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)     # the most each month has
_SEARCH_YEARS = 30          # a cron search gives up after this; the rarest days recur sooner


def _time_zone(name, where):
    """The tzinfo of schedule_tz ``name``, None for the local time; FlowError if unknown."""
    if name is None:
        return None
    problem = "is not a time zone name ('Area/City', as in 'Europe/Paris')"
    if isinstance(name, str) and name:
        import zoneinfo
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            try:
                known = zoneinfo.available_timezones()
            except OSError:
                known = set()
            if not known:
                problem += "; this Python has no time zone data: pip install tzdata"
            problem += _closest(name, sorted(known))
    raise FlowError("%s: schedule_tz %r %s" % (where, name, problem))


def _cron_field(text, index, where):
    """One cron field as the set of numbers it allows; FlowError names the field."""
    label, low, high = _CRON_FIELDS[index]
    names = _CRON_NAMES.get(index, ())
    offset = 1 if index == 3 else 0             # jan is 1, sun is 0

    def number(word):
        if word.lower() in names:
            return names.index(word.lower()) + offset
        if word.isascii() and word.isdigit() and low <= int(word) <= high:
            return int(word)
        raise FlowError("%s: %s field %r: %r is not %s from %d to %d%s%s" % (
            where, label, text, word, "a number" if not names else "a name or a number",
            low, high, " (%s..%s)" % (names[0], names[-1]) if names else "",
            _closest(word.lower(), names) if names else ""))

    allowed = set()
    for item in text.split(","):
        body, slash, step = item.partition("/")
        if slash and not (step.isascii() and step.isdigit() and int(step) >= 1):
            raise FlowError("%s: %s field %r: the step %r must be a whole number >= 1"
                            % (where, label, text, step))
        if body == "*":
            start, end = low, high
        else:
            first, dash, last = body.partition("-")
            start = number(first)
            end = number(last) if dash else (high if slash else start)
            if start > end:
                raise FlowError("%s: %s field %r: the range %r runs backwards"
                                % (where, label, text, body))
        allowed.update(range(start, end + 1, int(step) if slash else 1))
    return frozenset(allowed)


class _Schedule:
    """A parsed ``Flow.schedule``: ``next_after(ts)`` is its first time after
    ``ts`` and ``latest_until(ts)`` its last time at or before it (Unix
    times; None when there is none within _SEARCH_YEARS).

    Raises FlowError, naming the field and the bad value, when ``text`` or
    the time zone ``tz_name`` is not one.
    """

    __slots__ = ("text", "tz", "every", "minutes", "hours", "days", "months", "weekdays",
                 "either_day")

    def __init__(self, text, tz_name, where):
        if not isinstance(text, str):
            raise FlowError("%s: schedule must be a string such as '0 3 * * *', '@daily' or"
                            " 'every 15m', not %r" % (where, text))
        self.text = text
        self.tz = _time_zone(tz_name, where)
        self.every = None           # seconds, for an interval
        where = "%s: schedule %r" % (where, text)
        spec = text.strip()
        if spec.startswith("@"):
            if spec not in _CRON_SHORTHANDS:
                raise FlowError("%s: unknown shorthand; use one of %s%s" % (
                    where, ", ".join(_CRON_SHORTHANDS), _closest(spec, _CRON_SHORTHANDS)))
            spec = _CRON_SHORTHANDS[spec]
        elif spec.split(" ", 1)[0] == "every":
            words = spec.split()
            amount, unit = (words[1][:-1], words[1][-1:]) if len(words) == 2 else ("", "")
            if not (amount.isascii() and amount.isdigit() and int(amount) >= 1
                    and unit in _INTERVAL_UNITS):
                raise FlowError("%s: an interval is 'every N' with a unit s, m, h or d, as in"
                                " 'every 15m'" % where)
            self.every = int(amount) * _INTERVAL_UNITS[unit]
            return
        fields = spec.split()
        if len(fields) != 5:
            raise FlowError("%s: a cron expression has 5 fields (minute, hour, day of month,"
                            " month, day of week), not %d; or use @daily or 'every 15m'"
                            % (where, len(fields)))
        self.minutes, self.hours, self.days, self.months, weekdays = (
            _cron_field(field, k, where) for k, field in enumerate(fields))
        self.weekdays = frozenset(day % 7 for day in weekdays)     # 7 is Sunday too
        # As in cron: when both day fields are restricted, a day matching either
        # one fires; a day field starting with * counts as unrestricted.
        self.either_day = not fields[2].startswith("*") and not fields[4].startswith("*")
        if not self.either_day and not any(day <= _MONTH_DAYS[month - 1]
                                           for month in self.months for day in self.days):
            raise FlowError("%s: day of month %r never comes in month %r"
                            % (where, fields[2], fields[3]))

    def next_after(self, ts):
        if self.every is not None:
            return (ts // self.every + 1) * self.every
        from datetime import datetime, timedelta
        wall = datetime.fromtimestamp(ts, self.tz).replace(tzinfo=None, second=0, microsecond=0)
        wall += timedelta(minutes=1)
        last_year = wall.year + _SEARCH_YEARS
        while wall.year <= last_year:
            if wall.month not in self.months:
                wall = (wall.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            elif not self._day_fires(wall):
                wall = wall.replace(hour=0, minute=0) + timedelta(days=1)
            elif wall.hour not in self.hours:
                wall = wall.replace(minute=0) + timedelta(hours=1)
            elif wall.minute not in self.minutes:
                wall += timedelta(minutes=1)
            else:
                at = self._instant(wall)
                if at > ts:         # not a repeated wall time that already fired
                    return at
                wall += timedelta(minutes=1)
        return None

    def latest_until(self, ts):
        if self.every is not None:
            return ts // self.every * self.every
        for window in (3600, 86400, 32 * 86400, 367 * 86400, _SEARCH_YEARS * 366 * 86400):
            at = self.next_after(ts - window)
            if at is not None and at <= ts:
                later = self.next_after(at)
                while later is not None and later <= ts:
                    at, later = later, self.next_after(later)
                return at
        return None

    def upcoming(self, count, after):
        """The next ``count`` times after ``after``."""
        times = []
        while len(times) < count:
            after = self.next_after(after)
            if after is None:
                break
            times.append(after)
        return times

    def _day_fires(self, wall):
        in_days = wall.day in self.days
        in_weekdays = (wall.weekday() + 1) % 7 in self.weekdays      # cron's Sunday is 0
        return in_days or in_weekdays if self.either_day else in_days and in_weekdays

    def _instant(self, wall):
        """The Unix time of a wall time: its first occurrence, or, when the
        clock skipped it, the first minute after it that exists."""
        from datetime import datetime, timedelta
        for _ in range(24 * 60):
            at = wall.replace(tzinfo=self.tz, fold=0).timestamp()
            if datetime.fromtimestamp(at, self.tz).replace(tzinfo=None) == wall:
                return at
            wall += timedelta(minutes=1)
        return at


# ---------------------------------------------------------------------------
# Compile
# ---------------------------------------------------------------------------

class _Plan:
    """A flow compiled for running: parallel lists indexed by task number.

    Fields (all lists have one entry per task):
      nodes    the Task objects           names   their names
      index    name -> task number        npred   how many upstream tasks
      free     successors whose only upstream task is this one
      joins    successors with several upstream tasks (counted with itertools.count)
      funcs    the callable to invoke     ctx     whether it takes ctx first
      binds    per parameter: (kind, key, path, text, pname, is_kwonly)
      flowparams  task numbers whose bindings depend on the run's params
    """

    __slots__ = ("flow_name", "nodes", "names", "index", "npred", "preds", "free", "joins",
                 "roots", "funcs", "ctx", "binds", "varkw", "flowparams", "retries",
                 "timeouts", "isolate", "param_refs", "json_names", "is_async", "maps",
                 "rules", "whens", "handlers", "pool_of", "max_parallel", "pools", "group",
                 "stop_rules", "cache_level", "cached", "outputs")


    def __init__(self, flow):
        self.flow_name = flow.name
        graph = flow._graph()
        nodes = self.nodes = list(graph)
        names = self.names = [node.name for node in nodes]
        index = self.index = dict(zip(names, range(len(names))))
        if len(index) != len(nodes) or not all(type(n) is str and n for n in names):
            self._name_problem(flow.name)
        node_index = dict(zip(nodes, range(len(nodes))))
        preds = self.preds = [[node_index[up] for up in graph[node]] for node in nodes]

        sources = [node.base if isinstance(node, MapTask) else node for node in nodes]
        self.funcs = [source._callable() for source in sources]
        self.retries = [source.retries for source in sources]
        self.timeouts = [source.timeout for source in sources]
        self.isolate = [source.fail_policy == "isolate" for source in sources]
        self.rules = [None if source.run_if == "all_succeeded" else source.run_if
                      for source in sources]          # None: the default rule
        for rule in set(self.rules) - {None}:       # a Task subclass may set it on the class
            if rule not in _RUN_IF:
                bad = next(s for s in sources if s.run_if == rule)
                _check_flow_option(bad, "run_if", rule)
        self.handlers = any(rule in ("all_done", "any_failed") for rule in self.rules)
        self.stop_rules = list(self.rules)   # a map instance may run after a stop as its map
        _parse_pools(flow.pools, "flow %r" % flow.name)
        self.pool_of = [source.pool for source in sources]
        self.max_parallel = [source.max_parallel for source in sources]
        self.pools = flow.pools
        self.group = [None] * len(nodes)     # a map instance: its map's max_parallel key
        self.cache_level = [_cache_level(source) for source in sources]  # 0 False, 1, 2 True
        self.cached = 2 in self.cache_level  # any task reused across runs by its fingerprint
        self.outputs = {i: _check_outputs(source, source.outputs)      # task number -> paths
                        for i, source in enumerate(sources) if source.outputs}
        self.whens = {}             # task number -> the binding of its when= expression
        self.ctx, self.binds, self.varkw, self.is_async = [], [], [], []
        self.maps = {}              # map node -> (its "over" binding, item parameter, kw-only?)
        self.param_refs = []
        self.flowparams = []
        for i, node in enumerate(nodes):
            self._compile_node(i, node, sources[i], self.funcs[i])

        # Nodes are usually added after their upstream tasks: then the order they
        # were added in is a topological order and there can be no cycle.
        if not all(p < i for i, ups in enumerate(preds) for p in ups):
            _check_acyclic(flow.name, names, preds)
        n = len(nodes)
        self.npred = [len(p) for p in preds]
        self.free = [[] for _ in range(n)]
        self.joins = [[] for _ in range(n)]
        for i, ups in enumerate(preds):
            targets = self.free if len(ups) == 1 else self.joins
            for up in ups:
                targets[up].append(i)
        self.roots = [i for i in range(n) if not preds[i]]
        self.param_refs += [(i, b) for i, bs in enumerate(self.binds) for b in bs
                            if b[0] == _B_PARAM]
        self.json_names = None      # the names as JSON strings, made by the run store

    def _name_problem(self, flow_name):
        index = {}
        for i, (node, name) in enumerate(zip(self.nodes, self.names)):
            if not isinstance(name, str) or not name:
                raise FlowError("flow %r: task %r needs a non-empty string name"
                                % (flow_name, node))
            other = index.setdefault(name, i)
            if other != i:
                raise FlowError("flow %r: two different tasks are named %r (%r and %r);"
                                " give one a name=..." % (flow_name, name, self.nodes[other],
                                                          node))

    def copy(self):
        """A copy whose lists a run may extend (map nodes add their instances)."""
        other = _Plan.__new__(_Plan)
        for slot in _Plan.__slots__:
            value = getattr(self, slot)
            setattr(other, slot, list(value) if isinstance(value, list) else
                    dict(value) if isinstance(value, dict) else value)
        other.free = [list(x) for x in self.free]
        other.joins = [list(x) for x in self.joins]
        other.json_names = None
        return other


    def _compile_node(self, i, node, source, fn):
        code = getattr(fn, "__code__", None)
        if source.when is not None:
            binding = self._input_binding(source.when, "task %r when" % (node.name,))
            self.whens[i] = binding + ("when", False)
            if binding[0] == _B_NODE and binding[1] not in self.preds[i]:
                self.preds[i].append(binding[1])
        if code is not None and source is node and not source.inputs and type(fn) is _FUNCTION \
                and code.co_argcount <= 1 and not code.co_kwonlyargcount \
                and not code.co_flags & 0x0C:           # no *args, no **kwargs
            # The common task: (ctx) or () and nothing to wire; no signature to read.
            takes_ctx, binds, varkw = code.co_argcount == 1, (), False
            if takes_ctx and code.co_varnames[0] != "ctx":
                takes_ctx, binds = False, self._bindings(i, node, source, fn)[1]
            is_async = bool(code.co_flags & 0x80)       # CO_COROUTINE
        else:
            if not callable(fn):
                raise FlowError("task %r: %r is not callable" % (node.name, fn))
            takes_ctx, binds, varkw = self._bindings(i, node, source, fn)
            is_async = _is_coroutine_function(fn)
        self.is_async.append(is_async)
        self.ctx.append(takes_ctx)
        self.binds.append(binds)
        self.varkw.append(varkw)

    def _bindings(self, i, node, source, fn):
        """How task i's parameters get their values: (takes ctx, bindings, **kwargs?)."""
        where = "task %r" % node.name
        params, varkw = _parameters(fn)
        takes_ctx = bool(params) and params[0][0] == "ctx"
        if takes_ctx:
            params = params[1:]
        inputs = dict(source.inputs or {})
        if isinstance(node, MapTask):
            params = self._map_binding(i, node, params, inputs, where)
        upstream_names = {self.names[p]: p for p in self.preds[i]}
        binds = []
        for pname, kind, default in params:
            if pname in inputs:
                binding = self._input_binding(inputs.pop(pname), "%s input %r" % (where, pname))
            elif pname in upstream_names:
                binding = (_B_NODE, upstream_names[pname], (), "$node.%s.output" % pname)
            else:
                binding = (_B_FLOWPARAM, pname, default, None)
                if not self.flowparams or self.flowparams[-1] != i:
                    self.flowparams.append(i)
            if binding[0] == _B_NODE and binding[1] == i:
                raise FlowError("%s: input %r refers to the task itself" % (where, pname),
                                cycle=[node.name, node.name])
            binds.append(binding + (pname, kind == "kwonly"))
        for pname, value in inputs.items():
            if not varkw:
                accepted = ", ".join(p[0] for p in params) or "none"
                raise FlowError("%s has input %r but %s takes no parameter %r (parameters: %s)"
                                % (where, pname, getattr(fn, "__name__", "its function"),
                                   pname, accepted))
            binds.append(self._input_binding(value, "%s input %r" % (where, pname))
                         + (pname, True))
        preds = self.preds[i]
        for b in binds:
            if b[0] == _B_NODE and b[1] not in preds:
                preds.append(b[1])
        return takes_ctx, tuple(binds), varkw

    def _map_binding(self, i, node, params, inputs, where):
        """A map node's ``over`` and item parameter; returns the other parameters."""
        if not params:
            raise FlowError("%s: .map() needs a function that takes the item as its first"
                            " parameter after ctx" % where)
        (item, kind, _), params = params[0], params[1:]
        over = node.over
        if isinstance(over, str) and over.startswith("$"):
            over = self._input_binding(over, "%s .map() over" % where)
        elif isinstance(over, (list, tuple)):
            over = (_B_CONST, list(over), (), None)
        else:
            raise FlowError("%s: .map() takes a $ expression or a list, not %r"
                            % (where, node.over))
        if over[0] == _B_NODE and over[1] not in self.preds[i]:
            self.preds[i].append(over[1])
        self.maps[i] = (over + ("over", False), item, kind == "kwonly")
        if over[0] == _B_PARAM:
            self.param_refs.append((i, over + ("over", False)))
        inputs.pop(item, None)
        return params

    def _input_binding(self, value, where):
        if isinstance(value, str) and value.startswith("$"):
            kind, key, path = _parse_expression(value, self.index, where)
            return (kind, key, path, value)
        return (_B_CONST, value, (), None)

    def bind(self, params, strict=True):
        """The bindings for one run: flow parameters resolved against ``params``.

        Returns (binds, missing) where missing lists "task/parameter" pairs
        nothing supplies; with ``strict`` a missing one raises FlowError.
        """
        binds = self.binds
        missing = []
        if self.flowparams:
            binds = list(binds)
        for i in self.flowparams:
            resolved = []
            for b in binds[i]:
                if b[0] == _B_FLOWPARAM:
                    pname, default = b[1], b[2]
                    if pname in params:
                        b = (_B_CONST, params[pname], (), "$ctx.params." + pname) + b[4:]
                    elif default is not _MISSING:
                        b = (_B_CONST, default, (), None) + b[4:]
                    else:
                        missing.append((self.names[i], pname))
                resolved.append(b)
            binds[i] = tuple(resolved)
        for i, b in self.param_refs:
            if b[1] not in params:
                if not strict:
                    missing.append((self.names[i], b[1]))
                    continue
                raise FlowError("task %r input %r reads %r, but the run has no parameter %r"
                                " (pass it: -p %s=... or params={%r: ...})"
                                % (self.names[i], b[4], b[3], b[1], b[1], b[1]))
        if missing and strict:
            name, pname = missing[0]
            raise FlowError(
                "task %r needs parameter %r and nothing supplies it: no inputs entry, no upstream"
                " task named %r, no run parameter %r and no default. Wire it with"
                " %s.task.inputs = {%r: '$node.NAME.output'} or pass -p %s=..."
                % (name, pname, pname, pname, name, pname, pname))
        return binds, missing


def _check_picklable(plan):
    """For executor="process": every task must pickle, or the run never starts."""
    import pickle
    for node in plan.nodes:
        try:
            pickle.dumps(node)
        except Exception as exc:
            raise FlowError(
                "task %r cannot run in a process pool: it cannot be pickled (%s). Define"
                " tasks at module level (not inside functions or as lambdas), or use"
                ' executor="thread"' % (node.name, _describe(exc))) from None


def _check_acyclic(flow_name, names, preds):

    """Raise FlowError naming the cycle, if the graph has one (graphlib finds it)."""
    from graphlib import TopologicalSorter, CycleError
    try:
        TopologicalSorter({i: ups for i, ups in enumerate(preds)}).prepare()
    except CycleError as exc:
        cycle = [names[i] for i in exc.args[1]]
        raise FlowError("flow %r has a cycle: %s" % (flow_name, " -> ".join(cycle)),
                        cycle=cycle) from None


def _task_rules(plan, i):
    """What decides whether task i starts, beyond its upstream tasks, in words."""
    words = []
    if plan.rules[i] is not None:
        words.append("run_if=%s" % plan.rules[i])
    if i in plan.whens:
        words.append("when %s" % plan.whens[i][3])
    if plan.pool_of[i] is not None:
        words.append("pool=%s" % plan.pool_of[i])
    if plan.max_parallel[i] is not None:
        words.append("max_parallel=%d" % plan.max_parallel[i])
    return words


# ---------------------------------------------------------------------------
# Run state
# ---------------------------------------------------------------------------

def _refuse_if_abandoned(what):
    if _abandoned and _get_ident() in _abandoned:
        raise RuntimeError("%s refused: this attempt was given up at its timeout, and"
                           " what it does no longer counts" % what)


def _new_run_id():
    """Like 20261129-051011-f423f1a2: UTC time, then microseconds (5 hex digits) and
    3 random ones, so ids sort by start time even within a second."""
    now = time.time()
    return "%s-%05x%s" % (time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)),
                          int(now % 1 * 1e6), os.urandom(2).hex()[:3])


class Context:
    """What a task receives as ``ctx`` when its first parameter is named ctx."""

    __slots__ = ("_run", "_index", "task_name", "attempt", "_log")

    def __init__(self, run=None, index=0, attempt=1, params=None):
        if run is None:         # Context(params={...}): a context of its own, to unit-test a task
            run = Run(Flow("detached")._compile(), None, dict(params or {}), _new_run_id())
        self._run = run
        self._index = index
        names = run._plan.names
        self.task_name = names[index] if index < len(names) else None
        self.attempt = attempt
        self._log = None

    run_id = property(lambda self: self._run.run_id, doc="The run's id.")
    params = property(lambda self: self._run.params, doc="The run's parameters (a dict).")
    results = property(lambda self: self._run.results, doc="Outputs of tasks done so far.")
    scratch = property(lambda self: self._run.scratch,
                       doc="A dict the run's tasks share, for handles to big things.")
    artifacts = property(lambda self: self._run.artifacts,
                         doc="Artifacts saved so far in this run: name -> stored path (str).")
    cancelled = property(lambda self: self._run.cancel_event,
                         doc="A threading.Event set when the run is being cancelled.")
    # The original pyoco's names (SPEC section 15).
    is_cancelled = property(lambda self: self._run.cancel_event.is_set(),
                            doc="True once the run is being cancelled.")
    env = property(lambda self: os.environ, doc="The environment ($env.NAME reads it).")

    def resolve(self, value):
        """What an ``inputs`` value reads here: a ``$`` expression's value (KeyError when
        what it names is not there yet), anything else as it is."""
        if not isinstance(value, str) or not value.startswith("$"):
            return value
        run = self._run
        kind, key, path = _parse_expression(value, _EveryName(), "ctx.resolve")
        if kind == _B_CONST:
            return key
        where = {_B_NODE: ("results", run.results), _B_PARAM: ("params", run.params),
                 _B_SCRATCH: ("scratch", run.scratch), _B_ENV: ("environment", os.environ)}
        label, source = where[kind]
        if key not in source:
            raise KeyError("%s: no %r in %s" % (value, key, label))
        return _step(source[key], path, value) if path else source[key]

    def get_result(self, name):
        """The output of task ``name``, done earlier in this run; KeyError if none yet."""
        return _result_of(self._run.results, name)

    @property
    def log(self):
        """A logging.Logger for this task; its INFO and higher lines go to the task's log."""
        if self._log is None:
            self._log = _task_logger(self.task_name)
        return self._log

    def skip(self, reason="skipped"):
        """End this task as SKIPPED; tasks downstream of it are skipped too."""
        raise Skip(reason)

    def save_artifact(self, name, data):
        """Store ``data`` as artifact ``name`` of this run and return its path (a str).

        ``str`` is written as UTF-8 text, ``bytes`` as they are, a
        ``pathlib.Path`` (or ``os.PathLike``) is copied, a dict or list is
        saved as JSON and any other object as ``str(obj)``. ``name`` may contain
        ``/`` for sub-folders but must stay inside the run's artifact folder.
        Artifacts live in the run store, or in a temporary folder per run
        (``run.artifacts_dir``) when the run is not recorded.
        """
        _refuse_if_abandoned("save_artifact(%r)" % (name,))
        run = self._run
        path = _save_artifact_file(_artifact_root(run), name, data)
        run._add_artifact(self._index, name, path)
        return path

    def __repr__(self):
        return "<Context run_id=%s task=%r attempt=%d>" % (self.run_id, self.task_name,
                                                          self.attempt)


def _result_of(results, name):
    try:
        return results[name]
    except KeyError:
        raise KeyError("no result of task %r yet (results so far: %s)"
                       % (name, ", ".join(map(repr, results)) or "none")) from None


class _EveryName(dict):
    """Task names for ctx.resolve: any name may be asked for; the results say if it is there."""

    def __contains__(self, name):
        return True

    def __getitem__(self, name):
        return name


def _artifact_root(run):
    """The run's artifact folder: in its store folder, or a temporary one made now."""
    if run.artifacts_dir is None:
        import tempfile
        run.artifacts_dir = tempfile.mkdtemp(prefix="pyoco-%s-" % run.run_id)
    return run.artifacts_dir


class _PathOf:
    """A str path as os.PathLike, so _save_artifact_file copies the file."""

    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return self.path


def _save_artifact_file(folder, name, data):
    """Write one artifact under ``folder`` atomically; return its path.

    ``str`` as UTF-8 text, bytes as they are, a path is copied, a dict or
    list as JSON (UTF-8, indented) and anything else as ``str(data)``.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError("artifact name must be a non-empty string, not %r" % (name,))
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or (
            len(name) > 1 and name[1] == ":"):
        raise ValueError("artifact name %r would leave the run's artifact folder; use a"
                         " relative name such as 'report.csv' or 'plots/a.png'" % name)
    if isinstance(data, str):
        payload = data.encode("utf-8")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        payload = bytes(data)
    elif isinstance(data, os.PathLike):
        payload = None
    elif isinstance(data, (dict, list)):
        payload = (_dumps(data, indent=2) + "\n").encode("utf-8")
    else:
        payload = str(data).encode("utf-8")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, *[p for p in parts if p not in ("", ".")]))
    if not path.startswith(root + os.sep):
        raise ValueError("artifact name %r would leave the run's artifact folder" % name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if payload is None:
        import shutil
        tmp = _temp_name(path)
        shutil.copyfile(os.fspath(data), tmp)
        os.replace(tmp, path)
    else:
        _atomic_write(path, payload)
    return path


class _Scratch(_WatchedDict):
    """``ctx.scratch``: a dict shared by a run's tasks that an attempt given up
    at its timeout can no longer change."""

    __slots__ = ()

    def _changing(self):
        _refuse_if_abandoned("ctx.scratch change")


class TaskRecord:
    """A snapshot of one task of a run (built on demand from the run's lists)."""

    __slots__ = ("name", "state", "attempts", "started", "ended", "error", "exception",
                 "traceback", "reason", "artifacts", "output", "reused_from")

    def __init__(self, run, i):
        self.name = run._plan.names[i]
        self.state = run._state[i]
        self.attempts = run._attempts[i]
        self.started = run._started[i]
        self.ended = run._ended[i]
        self.exception = run._errors.get(i)
        self.error = _describe(self.exception) if self.exception is not None else None
        self.traceback = run._tracebacks.get(i)
        self.reason = run._reasons.get(i)
        self.artifacts = dict(run._task_artifacts.get(i) or {})
        self.output = run.results.get(self.name)
        self.reused_from = run._reused_from.get(i)

    @property
    def duration(self):
        """Seconds from the first attempt's start to the end, or None."""
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    @property
    def duration_ms(self):
        d = self.duration
        return None if d is None else round(d * 1000, 3)

    def to_dict(self):
        return {"state": self.state, "attempts": self.attempts,
                "started_at": _iso(self.started), "ended_at": _iso(self.ended),
                "duration_ms": self.duration_ms, "error": self.error,
                "traceback": self.traceback, "reason": self.reason,
                "artifacts": self.artifacts, "reused_from": self.reused_from}

    def __repr__(self):
        return "<TaskRecord %r %s>" % (self.name, self.state)


class _TaskTable:
    """``run.tasks``: a read-only mapping of task name -> TaskRecord."""

    __slots__ = ("_run",)

    def __init__(self, run):
        self._run = run

    def __getitem__(self, name):
        i = self._run._plan.index.get(name)
        if i is None:
            raise KeyError(name)
        return TaskRecord(self._run, i)

    def __contains__(self, name):
        return name in self._run._plan.index

    def __iter__(self):
        return iter(self._run._plan.names)

    def __len__(self):
        return len(self._run._plan.names)

    def keys(self):
        return list(self._run._plan.names)

    def values(self):
        return [TaskRecord(self._run, i) for i in range(len(self._run._plan.names))]

    def items(self):
        return [(r.name, r) for r in self.values()]

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __repr__(self):
        return repr(dict(self.items()))


class Run:
    """One run of a flow: its id, status, results, per-task records and events.

    Per-task state lives in parallel lists indexed by task number, so a run of
    100,000 tasks keeps few objects for the garbage collector to scan;
    ``run.tasks[name]`` builds a ``TaskRecord`` when asked.
    """

    def __init__(self, plan, flow, params, run_id):
        import threading
        n = len(plan.nodes)
        self._plan = plan
        self.flow = flow
        self.flow_name = plan.flow_name
        self.run_id = run_id
        self.params = params
        self.status = RunState.PENDING
        self.results = {}
        self.scratch = _Scratch()
        self.artifacts = {}
        self.artifacts_dir = None           # in the run's store folder, or a temp folder on demand
        self.started_at = None
        self.ended_at = None
        self.error = None                   # the first task exception that failed the run
        self.reason = None
        self.resumed_from = None
        self.scheduled_for = None           # the schedule's time (epoch seconds) that started it
        self.executor = "thread"            # what its tasks ran on (SPEC section 14)
        self.cancel_event = threading.Event()
        self._state = [TaskState.PENDING] * n
        self._attempts = [0] * n
        self._started = [None] * n
        self._ended = [None] * n
        self._outputs = [None] * n
        self._errors = {}
        self._tracebacks = {}
        self._reasons = {}
        self._task_artifacts = {}
        self._reused_from = {}               # task number -> the run its output came from
        self._cache_entries = {}             # task number -> its fingerprint, for the store
        self._events = []                    # Event records, oldest first
        self.artifact_changes = 0            # bumped by every artifact saved, for the store

    def _add_artifact(self, i, name, path):
        self.artifacts[name] = path
        self._task_artifacts.setdefault(i, {})[name] = path
        self.artifact_changes += 1

    def _extend(self, k):
        """Room for k more tasks (a map node's instances)."""
        for column, empty in ((self._state, TaskState.PENDING), (self._attempts, 0),
                              (self._started, None), (self._ended, None),
                              (self._outputs, None)):
            column.extend([empty] * k)

    tasks = property(_TaskTable, doc="Mapping of task name -> TaskRecord.")

    @property
    def duration(self):
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    @property
    def duration_ms(self):
        d = self.duration
        return None if d is None else round(d * 1000, 3)

    @property
    def events(self):
        """Every transition, oldest first, as dicts (times as ISO strings)."""
        return [Event.to_dict(ev) for ev in list(self._events)]

    def failure(self):
        """Why the run failed, in one line ("task 'x' raised ValueError: ..."), or None."""
        if self.status != RunState.FAILED:
            return None
        for i, exc in list(self._errors.items()):
            if exc is self.error:
                return "task %r raised %s" % (self._plan.names[i], _one_line(_describe(exc)))
        return _one_line(self.reason or "unknown reason")

    def to_dict(self, events=True):
        """The run record as plain JSON-ready data (see SPEC section 4)."""
        record = {
            "run_id": self.run_id, "flow": self.flow_name, "status": self.status,
            "params": self.params, "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at), "duration_ms": self.duration_ms,
            "reason": self.reason, "resumed_from": self.resumed_from,
            "scheduled_for": _iso(self.scheduled_for), "executor": self.executor,
            "tasks": {name: TaskRecord(self, i).to_dict()
                      for i, name in enumerate(self._plan.names)},
        }
        if events:
            record["events"] = self.events
        return record

    def __repr__(self):
        return "<Run %s flow=%r %s>" % (self.run_id, self.flow_name, self.status)


# ---------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------

# What one attempt of a task came to (see _attempt).
_OK, _SKIPPED, _ERROR, _FATAL = "ok", "skip", "error", "fatal"


def _attempt(fn, args, kwargs):
    """Call a task's function once and say how it went: (kind, value).

    The one place that tells outcomes apart, wherever the call runs: _OK with
    the output, _SKIPPED with the reason (ctx.skip), _ERROR with an Exception
    (retried), _FATAL with a BaseException such as SystemExit (never retried).
    """
    try:
        return _OK, fn(*args, **kwargs)
    except Skip as skip:
        return _SKIPPED, skip.reason
    except Exception as exc:
        return _ERROR, exc
    except BaseException as exc:
        return _FATAL, exc


def _arguments(run, binds):
    """The (args, kwargs) a task is called with, from its bindings."""
    args, kwargs = [], {}
    if not binds:
        return args, kwargs
    outputs = run._outputs
    for kind, key, path, text, pname, kwonly in binds:
        if kind == _B_CONST:
            value = key
        elif kind == _B_NODE:
            if run._state[key] != TaskState.SUCCEEDED:
                value = None            # an upstream that did not succeed gave nothing
            else:
                value = outputs[key]
                if path:
                    value = _step(value, path, text)
        elif kind == _B_PARAM:
            value = _step(run.params[key], path, text) if path else run.params[key]
        elif kind == _B_SCRATCH:
            try:
                value = run.scratch[key]
            except KeyError:
                raise LookupError("%s: ctx.scratch has no key %r yet" % (text, key)) from None
            if path:
                value = _step(value, path, text)
        else:
            try:
                value = os.environ[key]
            except KeyError:
                raise LookupError("%s: environment variable %r is not set"
                                  % (text, key)) from None
        if kwonly:
            kwargs[pname] = value
        else:
            args.append(value)
    return args, kwargs


def _code_hash(fn):
    """A hash of a function's code object: its bytecode, constants (nested code
    objects included), names and signature, never its line numbers, so a
    comment or a blank line is not a change and an edited constant is."""
    import hashlib
    h = hashlib.sha256()
    code = getattr(fn, "__code__", None)
    if code is None:                # not a Python function: its qualified name stands for it
        h.update(repr((getattr(fn, "__module__", None), getattr(fn, "__qualname__", None),
                       type(fn).__qualname__)).encode())
        return h.hexdigest()[:32]

    def feed(code):
        h.update(code.co_code)
        h.update(repr((code.co_name, code.co_names, code.co_varnames, code.co_freevars,
                       code.co_cellvars, code.co_argcount, code.co_posonlyargcount,
                       code.co_kwonlyargcount, code.co_flags)).encode())
        for const in code.co_consts:
            if hasattr(const, "co_code"):
                h.update(b"<code>")
                feed(const)
            elif isinstance(const, frozenset):      # its order depends on the hash seed
                h.update(repr(sorted(map(repr, const))).encode())
            else:
                h.update(repr(const).encode("utf-8", "backslashreplace"))
            h.update(b"\0")
    feed(code)
    return h.hexdigest()[:32]


def _value_hash(value):
    """A value's fingerprint: of its canonical JSON when it survives a JSON round
    trip, else of its pickle; None when it can be neither."""
    import hashlib
    import json
    kind = type(value)
    if kind is int or kind is str or value is None or kind is bool:     # JSON as they are
        return "j" + hashlib.sha256(json.dumps(value, ensure_ascii=False).encode(
            "utf-8")).hexdigest()[:32]
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False,
                          ensure_ascii=False)
        if json.loads(text) == value:
            return "j" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        import pickle
        data = pickle.dumps(value, protocol=4)
    except Exception:
        return None
    return "p" + hashlib.sha256(data).hexdigest()[:32]


def _named_arguments(binds, args, kwargs):
    """Parameter name -> value, from _arguments' (args, kwargs)."""
    named = dict(zip([b[4] for b in binds if not b[5]], args))
    named.update(kwargs)
    return named


def _input_hashes(run, i, source, named):
    """The values part of task i's fingerprint: parameter name -> hash (None
    when a value has none), or {"cache_key": hash} with a cache_key."""
    if source.cache_key is None:
        return {pname: _value_hash(value) for pname, value in named.items()}
    key = source.cache_key(Context(run, i, 1), dict(named))
    if not isinstance(key, str):
        raise TypeError("task %r: cache_key must return a str, not %s"
                        % (run._plan.names[i], type(key).__name__))
    return {"cache_key": _value_hash(key)}


def _task_code(source, fn):
    """The code part of a fingerprint: the task's version when set, else its code's hash."""
    if source.version is not None:
        return "version:%s" % (source.version,)
    return _code_hash(getattr(fn, "__func__", fn))


class _Later:
    """engine.plan: a value known only once upstream task ``name`` has run."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


def _cache_verdict(entries, code, hashes):
    """Why a cache=True task would run or be reused: (action, reason, entry).

    ``entries``: its earlier runs' entries, newest first (already within its
    cache_ttl); ``hashes``: parameter name -> hash, None (no fingerprint) or a
    _Later. The first reason of SPEC section 11's list that applies wins.
    """
    if not entries:
        return "run", "no earlier run", None
    same_code = [e for e in entries if e["code"] == code]
    if not same_code:
        return "run", "code changed since run %s" % entries[0]["run"], None
    known = {p: h for p, h in hashes.items() if isinstance(h, str)}
    matching = [e for e in same_code if set(e["inputs"]) == set(hashes)
                and all(e["inputs"][p] == h for p, h in known.items())]
    if not matching:
        newest = same_code[0]
        changed = next((p for p in hashes if p in known and newest["inputs"].get(p) != known[p]),
                       None) or next((p for p in sorted(set(hashes) ^ set(newest["inputs"]))),
                                     None) or next(iter(hashes), "?")
        return "run", "input %r changed since run %s" % (changed, newest["run"]), None
    for p, h in hashes.items():
        if h is None:
            return "run", "not cacheable: input %r has no fingerprint" % p, None
    for p, h in hashes.items():
        if isinstance(h, _Later):
            return "depends", "upstream %r runs: decided when it returns" % h.name, None
    entry = matching[0]
    return "reuse", "same code and inputs as run %s" % entry["origin"], entry


_WAIT = "wait"      # admit(): the task waits for a pool slot or a start rate


class _Pools:
    """The pool slots and start rates of one run (SPEC section 12).

    A task takes one slot of each of its keys (its pool, and for a map
    instance its map's ``max_parallel``) when it starts, and gives them back
    when it ends. A task that cannot start waits here, PENDING and holding no
    worker, until a slot is given back or its pool's rate allows a start.
    """

    def __init__(self, limits):
        from collections import deque
        self.deque = deque
        self.limits = dict(limits)      # key -> (size, (starts, period) or None)
        self.running = dict.fromkeys(self.limits, 0)
        self.starts = {key: deque() for key in self.limits}   # start times within the period
        self.waiting = {key: deque() for key in self.limits}  # task numbers, first come first
        self.due = []               # (time a rate allows, task number) for tasks waiting on one
        self.holding = {}           # task number -> the keys it holds a slot of
        self.parked = 0             # tasks waiting, in either list
        self.lock = _allocate_lock()

    def add(self, key, size):
        with self.lock:
            self.limits[key] = (size, None)
            self.running[key], self.starts[key] = 0, self.deque()
            self.waiting[key] = self.deque()

    def acquire(self, i, keys):
        """Take a slot of every key for task i; False (and i waits) when one is taken."""
        with self.lock:
            now = time.monotonic()
            for key in keys:
                size, rate = self.limits[key]
                if self.running[key] >= size:
                    self.waiting[key].append(i)
                    self.parked += 1
                    return False
                allowed = self.rate_allows(key, rate, now)
                if allowed > now:
                    self.due.append((allowed, i))
                    self.parked += 1
                    return False
            for key in keys:
                self.running[key] += 1
                if self.limits[key][1] is not None:
                    self.starts[key].append(now)
            self.holding[i] = keys
        return True

    def rate_allows(self, key, rate, now):
        """When the next start of ``key`` may be: now, or later when its rate is used up."""
        if rate is None:
            return now
        count, period = rate
        starts = self.starts[key]
        while starts and starts[0] <= now - period:
            starts.popleft()
        return now if len(starts) < count else starts[-count] + period

    def retry_delay(self, i, delay):
        """A retry of task i starts no earlier than ``delay`` from now and its rate allow."""
        with self.lock:
            now = time.monotonic()
            at = now + delay
            for key in self.holding.get(i, ()):
                rate = self.limits[key][1]
                if rate is not None:
                    at = max(at, self.rate_allows(key, rate, at))
            for key in self.holding.get(i, ()):
                if self.limits[key][1] is not None:
                    self.starts[key].append(at)
        return at - now

    def release(self, i):
        """Task i ended: give its slots back; returns the waiting tasks to try again."""
        with self.lock:
            keys = self.holding.pop(i, None)
            if not keys:
                return []
            woken = []
            for key in keys:
                self.running[key] -= 1
                if self.waiting[key]:
                    woken.append(self.waiting[key].popleft())
            self.parked -= len(woken)
        return woken

    def wake(self, everyone=False):
        """Waiting tasks whose rate now allows a start (all of them with ``everyone``)."""
        with self.lock:
            now = time.monotonic()
            woken = [i for at, i in self.due if everyone or at <= now]
            self.due = [(at, i) for at, i in self.due if not (everyone or at <= now)]
            if everyone:
                for queue in self.waiting.values():
                    woken.extend(queue)
                    queue.clear()
            self.parked -= len(woken)
        return woken

    def next_due(self):
        with self.lock:
            return min((at for at, _ in self.due), default=None)


def _rule_unmet(plan, states, i, rule):
    """Why task i's run_if is not met by its upstream tasks' final states, or None."""
    preds = plan.preds[i]
    ups = [states[p] for p in preds]
    if rule == "all_done" or (
            rule == "none_failed" and all(s in (TaskState.SUCCEEDED, TaskState.SKIPPED)
                                          for s in ups)) or (
            rule == "any_succeeded" and TaskState.SUCCEEDED in ups) or (
            rule == "any_failed" and TaskState.FAILED in ups):
        return None
    names = plan.names
    return "run_if=%r not met: %s" % (rule, ", ".join(
        "%r %s" % (names[p], states[p].lower()) for p in preds) or "no upstream tasks")


def _store_outputs(run, paths, value):
    """Put a task's output at each of its ``outputs`` paths (``scratch.a.b``)."""
    for path in paths:
        target = {"scratch": run.scratch, "results": run.results, "params": run.params}[path[0]]
        for depth, key in enumerate(path[1:-1], 1):
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise TypeError("output path %r: %r holds a %s, not a dict"
                                % (".".join(path), ".".join(path[:depth + 1]),
                                   type(target).__name__))
        target[path[-1]] = value


class _RunLedger:
    """The one writer of a run's state: every change to a task or to the run is
    made here and announced as an Event to the run's observers, in order."""

    def __init__(self, run, binds, observers):
        import threading
        self.run = run
        self.plan = run._plan
        self.binds = binds          # per task: how its parameters get their values
        self.observers = observers
        self.lock = threading.RLock()   # guards the plan's columns and the flags of a run
        self.closed = False         # the run's outcome is settled; late results are ignored
        if self.plan.maps:          # map nodes add tasks while the run goes: extend copies
            self.plan = run._plan = self.plan.copy()
            self.binds = list(binds)

    def emit(self, ts, kind, i, state, data=None):
        ev = (ts, kind, self.plan.names[i] if i >= 0 else None, state, data)
        self.run._events.append(ev)         # kept as plain tuples: what a record is made of
        if not self.observers:
            return
        ev = tuple.__new__(Event, ev)
        for observer in self.observers:
            try:
                observer(self.run, ev)
            except Exception as exc:
                self.observers = [o for o in self.observers if o is not observer]
                _warn("observer %r failed and was removed: %s" % (observer, _describe(exc)))

    def start(self):
        run = self.run
        run.started_at = time.time()
        run.status = RunState.RUNNING
        self.emit(run.started_at, "run.started", -1, RunState.RUNNING,
                  {"resumed_from": run.resumed_from} if run.resumed_from else None)

    def begin(self, i):
        t0 = time.time()
        self.run._started[i] = t0
        self.run._state[i] = TaskState.RUNNING
        self.emit(t0, "task.started", i, TaskState.RUNNING)

    def succeed(self, i, out, data=None):
        if self.closed:
            return False
        run = self.run
        if self.plan.outputs and i in self.plan.outputs:
            try:
                _store_outputs(run, self.plan.outputs[i], out)
            except TypeError as exc:
                self.fail(i, exc)
                return False
        t1 = time.time()
        run._ended[i] = t1
        run._state[i] = TaskState.SUCCEEDED
        run.results[self.plan.names[i]] = out
        run._outputs[i] = out
        self.emit(t1, "task.succeeded", i, TaskState.SUCCEEDED, data)
        return True

    def reuse(self, i, out, artifacts, origin, reason):
        """Take task i's output over from an earlier run (``origin``, where it
        last actually ran) instead of running it."""
        run = self.run
        for name, path in artifacts.items():    # the new run gets copies of its files
            try:
                copied = _save_artifact_file(_artifact_root(run), name, _PathOf(path))
            except OSError as exc:
                _warn("run %s: artifact %r of reused task %r is gone (%s)"
                      % (run.run_id, name, self.plan.names[i], exc))
                continue
            run._add_artifact(i, name, copied)
        run._started[i] = time.time()
        run._reasons[i] = reason
        run._reused_from[i] = origin
        return self.succeed(i, out, {"reused_from": origin})

    def fail(self, i, exc, tb=None):
        import traceback
        run = self.run
        if self.closed:
            return
        run._ended[i] = time.time()
        run._state[i] = TaskState.FAILED
        run._errors[i] = exc
        frames = exc.__traceback__
        while frames is not None and frames.tb_next is not None and \
                frames.tb_frame.f_code.co_filename == __file__:
            frames = frames.tb_next         # start the traceback at the task's own code
        run._tracebacks[i] = tb or "".join(traceback.format_exception(type(exc), exc, frames))
        if run.error is None:
            run.error = exc
        self.emit(run._ended[i], "task.failed", i, TaskState.FAILED, {"error": _describe(exc)})
        if not self.plan.isolate[i]:
            self.stop(TaskState.SKIPPED, "run stopped after %r failed" % self.plan.names[i])

    def expand(self, m, items):
        """Add map node m's instances, one per item, to the run; their numbers."""
        run, plan = self.run, self.plan
        over, item_name, kwonly = plan.maps[m]
        template = self.binds[m]
        k = len(items)
        names = ["%s[%d]" % (plan.names[m], j) for j in range(k)]
        binds = [((_B_CONST, item, (), None, item_name, kwonly),) + template for item in items]
        after_m, nothing = [m], []      # shared: these lists are only ever read
        with self.lock:                 # two map nodes may expand at once: keep columns aligned
            first = len(plan.names)
            instances = list(range(first, first + k))
            for column in (plan.nodes, plan.funcs, plan.ctx, plan.varkw, plan.is_async,
                           plan.retries, plan.timeouts, plan.isolate, plan.pool_of,
                           plan.cache_level):
                column.extend([column[m]] * k)
            plan.rules.extend([None] * k)
            plan.stop_rules.extend([plan.stop_rules[m]] * k)
            plan.max_parallel.extend([None] * k)
            plan.group.extend([("map", m) if plan.max_parallel[m] else None] * k)
            plan.npred.extend([1] * k)
            plan.preds.extend([after_m] * k)
            plan.free.extend([nothing] * k)
            plan.joins.extend([after_m] * k)
            self.binds.extend(binds)
            run._extend(k)
            # Names last: a reader (the store, the API) sizes the run by its names.
            plan.names.extend(names)
            plan.index.update(zip(names, instances))
        return instances

    def mark(self, i, state, reason):
        """End task i without running it (SKIPPED or CANCELLED), or after Skip."""
        run = self.run
        ts = time.time()
        run._ended[i] = ts if run._started[i] is not None else None
        run._state[i] = state
        run._reasons[i] = reason
        self.emit(ts, "task.skipped" if state == TaskState.SKIPPED else "task.cancelled",
                  i, state, {"reason": reason})

    def items_of(self, over):
        items = _arguments(self.run, (over,))[0][0]
        if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
            raise TypeError("%s gave a %s; .map() needs a list of items"
                            % (over[3] or "the map's input", type(items).__name__))
        return list(items)

    def collect(self, m):
        """A map node whose instances are all done: its output is theirs, in item
        order; when instances failed, the node failed too."""
        run = self.run
        instances = self.expanded.pop(m)
        failed = [k for k in instances if run._state[k] == TaskState.FAILED]
        if failed:
            self.fail_map(m, instances, failed)
            return False
        if any(run._state[k] != TaskState.SUCCEEDED for k in instances):
            skipped = next(k for k in instances if run._state[k] != TaskState.SUCCEEDED)
            self.mark(m, TaskState.SKIPPED, "instance %r %s" % (
                self.plan.names[skipped], run._state[skipped].lower()))
            return False
        return self.succeed(m, [run._outputs[k] for k in instances])

    def fail_map(self, m, instances, failed):
        first = self.run._errors.get(failed[0])
        error = RuntimeError("%d of %d instances failed (first: %s: %s)" % (
            len(failed), len(instances), self.plan.names[failed[0]],
            _describe(first) if first is not None else "failed"))
        if first is not None:
            error.__cause__ = first
        self.fail(m, error, self.run._tracebacks.get(failed[0]))


class _Scheduler(_RunLedger):
    """The decisions of one run, shared by every way of executing it.

    A driver (``_ThreadDriver`` or ``_FutureDriver``) asks ``admit(i)`` once
    all of task i's upstream tasks are done, runs the attempts it is told to
    run, hands each attempt's outcome to ``ended``, and takes the tasks that
    became ready from ``released``. Whether a task may start, whether it is
    retried and how the run ends are decided here and nowhere else.
    """

    def __init__(self, run, binds, observers, reused, sink, pools=None, cache=None,
                 fixed=None, forced=()):
        import threading
        super().__init__(run, binds, observers)
        plan = self.plan
        self.cache = cache          # _CacheIndex, when cache=True tasks may reuse earlier runs
        self.fixed = fixed or {}    # task number -> ("skip", reason) or ("value", override)
        self.forced = forced        # task numbers that run whatever is cached (--from)
        self.codes = {}             # (version, code object) -> the code part of fingerprints
        self.pools = None           # _Pools, when any task takes pool slots
        if any(plan.pool_of) or any(plan.max_parallel[m] for m in plan.maps):
            self.pools = _Pools(pools or {})
        self.reused = reused        # task name -> (output, artifacts) taken over from a resumed run
        self.sink = sink            # where printed lines go (the run store's recorder), or None
        self.done = threading.Event()   # set once the outcome is settled
        self.halt = threading.Event()   # set when the run starts stopping: ends retry waits
        self.pending = list(self.plan.npred)     # upstream tasks each task waits for
        self.arrived = [_count(1) if n > 1 else None for n in self.pending]
        self.doomed = {}            # task number -> why it must be skipped (upstream failed)
        self.stopping = False       # nothing new starts (a failure with "stop", or a cancel)
        self.stop_state = None
        self.stop_reason = None
        self.expanded = {}          # map node -> its instances, until they are collected
        self.signals = []           # names of SIGINT/SIGTERM received, noted by _SignalGuard
        self.signals_seen = 0
        self.requests = 0           # stop requests acted on: the second one is the hard stop
        self.cancel_file = None     # the store's cancel request file for this run, if recorded
        self.on_abandon = None      # what a driver must do at a hard stop (kill processes)
        self.plain = not (plan.maps or plan.whens or reused or self.pools is not None
                          or any(plan.rules) or cache is not None or self.fixed)
        # plain: no rule, condition, pool, map, reuse, cache, override or --only

    # -- whether a task may start

    def admit(self, i):
        """Decide what happens to task i now that its upstream tasks are done.

        Returns None when it should run; _WAIT when it waits for a pool slot
        or a rate (it comes back from released() or _Pools.wake()); otherwise
        it was settled here and the result is True (it succeeded: reused, or
        a map collected), False (it ended without succeeding), or a list of
        map instances to schedule.
        """
        if self.plain and not self.stopping and not self.doomed:
            return None             # nothing in this run can hold a task back
        if self.closed:
            return False
        plan = self.plan
        if i in self.expanded:      # a map's instances are done: settling it starts nothing
            return self.collect(i)
        if self.fixed and i in self.fixed:
            how, value = self.fixed[i]
            if how == "value":          # overridden: not called, the given output is its own
                self.run._reasons[i] = "overridden"
                self.run._started[i] = time.time()
                return self.succeed(i, value, {"reason": "overridden"})
            self.mark(i, TaskState.SKIPPED, value)
            return False
        rule = plan.stop_rules[i]
        if self.stopping and not (rule == "all_done" or (
                rule == "any_failed" and self.stop_state == TaskState.SKIPPED)):
            self.mark(i, self.stop_state, self.stop_reason)
            return False
        rule = plan.rules[i]
        why = self.doomed.get(i) if rule is None else _rule_unmet(
            plan, self.run._state, i, rule)
        if why is not None:
            self.mark(i, TaskState.SKIPPED, why)
            return False
        if plan.whens and i in plan.whens:
            when = plan.whens[i]
            try:
                value = _arguments(self.run, (when,))[0][0]
            except Exception as exc:
                self.begin(i)
                self.fail(i, exc)
                return False
            if not value:
                self.mark(i, TaskState.SKIPPED, "when %s was false" % when[3])
                return False
        if self.reused and plan.names[i] in self.reused:
            out, artifacts, origin = self.reused[plan.names[i]]
            return self.reuse(i, out, artifacts, origin, "output reused from run %s" % origin)
        if self.cache is not None and plan.cache_level[i] == 2 and i not in plan.maps:
            settled = self.cache_step(i)
            if settled is not None:
                return settled
        if i in plan.maps:
            return self.map_step(i)
        if self.pools is not None:
            keys = [key for key in (plan.pool_of[i], plan.group[i]) if key is not None]
            if keys and not self.pools.acquire(i, keys):
                return _WAIT
        return None

    def cache_step(self, i):
        """A cache=True task: reuse an earlier run's output when its fingerprint
        (its name, code and the values it is called with now) matches one
        (True), else note the fingerprint for this run's store and run it (None)."""
        run, plan = self.run, self.plan
        name = plan.names[i]
        node = plan.nodes[i]
        source = getattr(node, "base", node)
        try:
            args, kwargs = _arguments(run, self.binds[i])
            hashes = _input_hashes(run, i, source, _named_arguments(self.binds[i], args, kwargs))
        except Exception as exc:
            self.begin(i)
            self.fail(i, exc)
            return False
        fn = plan.funcs[i]
        key = (source.version, getattr(getattr(fn, "__func__", fn), "__code__", fn))
        code = self.codes.get(key)
        if code is None:
            code = self.codes[key] = _task_code(source, fn)
        whole = plan.preds[i][0] if isinstance(node, MapTask) and i not in plan.maps else i
        if whole not in self.forced:        # a map instance runs when its map is forced
            action, reason, entry, out = self.cache.decide(name, code, hashes, source.cache_ttl)
            if action == "reuse":
                run._cache_entries[i] = dict(entry)
                return self.reuse(i, out, entry["artifacts"], entry["origin"], reason)
        blank = next((p for p, h in hashes.items() if h is None), None)
        if blank is not None:       # recorded all the same: later plans can say why
            run._reasons[i] = "not cacheable: input %r has no fingerprint" % blank
        run._cache_entries[i] = {"code": code, "inputs": hashes, "origin": run.run_id,
                                 "at": run.started_at}
        return None

    def released(self, i, ok):
        """The successors of finished task i that are ready now.

        A task that did not succeed dooms its successors: they will be
        skipped once all their upstream tasks are done. Nothing is released
        once the run is stopping.
        """
        plan = self.plan
        woken = self.pools.release(i) if self.pools is not None else ()
        if self.stopping and not plan.handlers:
            return woken            # nothing more can start: the rest is settled at the end
        if not ok:
            doomed = self.doomed
            why = doomed.get(i) or "upstream %r %s" % (
                plan.names[i], "failed" if self.run._state[i] == TaskState.FAILED else "skipped")
            for s in plan.free[i]:
                doomed[s] = why
            for s in plan.joins[i]:
                doomed.setdefault(s, why)
        ready = plan.free[i]
        joins = plan.joins[i]
        if joins:
            # next() on an itertools.count is atomic: joins need no lock, so a
            # task with 100,000 upstream tasks is not a point of contention.
            ready = list(ready)
            arrived, needed = self.arrived, self.pending
            for s in joins:
                if next(arrived[s]) == needed[s]:
                    ready.append(s)
        if woken:
            ready = list(ready) + woken
        return ready

    # -- attempts and their outcomes

    def ended(self, i, attempt, kind, value, tb=None):
        """Take one attempt's outcome. Returns True (succeeded), False (ended
        otherwise) or, when another attempt follows, the delay before it."""
        if kind == _OK:
            return self.succeed(i, value)
        if kind == _SKIPPED:
            self.mark(i, TaskState.SKIPPED, value)
            return False
        if kind == _ERROR and attempt <= self.plan.retries[i] and not self.stopping:
            node = self.plan.nodes[i]
            node = getattr(node, "base", node)      # a map instance retries like its task
            delay = min(node.retry_delay * 2 ** (attempt - 1), node.max_retry_delay)
            if self.pools is not None:
                delay = self.pools.retry_delay(i, delay)
            self.emit(time.time(), "task.retrying", i, TaskState.RUNNING,
                      {"attempt": attempt + 1, "of": self.plan.retries[i] + 1,
                       "delay_s": delay, "error": _describe(value)})
            return float(delay)
        self.fail(i, value, tb)
        return False

    def retry_dropped(self, i, exc):
        """A retry that was waiting when the run began to stop: it ends here."""
        if self.stop_state == TaskState.CANCELLED:
            self.mark(i, TaskState.CANCELLED, "%s while waiting to retry" % self.stop_reason)
        else:
            self.fail(i, exc)
        return False

    # -- maps

    def map_step(self, m):
        """A map node's two turns: first expand into instances (returned, to
        run), then, once they are all done, collect their outputs."""
        run, plan = self.run, self.plan
        self.begin(m)
        over, item_name, kwonly = plan.maps[m]
        try:
            items = self.items_of(over)
        except Exception as exc:
            self.fail(m, exc)
            return False
        run._attempts[m] = 1
        if not items:
            return self.succeed(m, [])
        if plan.max_parallel[m]:
            self.pools.add(("map", m), plan.max_parallel[m])
        with self.lock:
            instances = self.expand(m, items)
            self.pending.extend([0] * len(items))
            self.arrived.extend([None] * len(items))
            self.pending[m] = len(items)
            self.arrived[m] = _count(1)
            self.expanded[m] = instances
        return instances

    # -- stopping

    def stop(self, state, reason):
        with self.lock:
            if self.stopping:
                return
            self.stop_state, self.stop_reason = state, reason
            self.stopping = True
        self.halt.set()

    def cancel(self, reason="cancelled"):
        """The graceful stop: nothing new starts, running tasks may finish.

        Returns False when the run has already ended (or is stopping anyway).
        """
        run = self.run
        with self.lock:
            if self.closed or run.status != RunState.RUNNING:
                return False
            first = not self.stopping
            if first:
                self.stop_state, self.stop_reason = TaskState.CANCELLED, reason
                self.stopping = True
                run.status = RunState.CANCELLING
        self.halt.set()
        run.cancel_event.set()
        if first:
            self.emit(time.time(), "run.cancelling", -1, RunState.CANCELLING, {"reason": reason})
        return True

    def abandon(self, reason):
        """The hard stop: settle the run as CANCELLED now, without waiting for tasks."""
        with self.lock:
            if self.closed:
                return
            self.stopping = True
            self.stop_state, self.stop_reason = TaskState.CANCELLED, reason
        self.halt.set()
        self.run.cancel_event.set()
        if self.run.status == RunState.RUNNING:
            self.run.status = RunState.CANCELLING
            self.emit(time.time(), "run.cancelling", -1, RunState.CANCELLING, {"reason": reason})
        self.finish(interrupted=True)
        if self.on_abandon is not None:
            self.on_abandon()

    def check_requests(self):
        """Act on stop requests (called by the waiting thread): signals noted by
        _SignalGuard, and a cancel asked for through the run store. The first
        cancels gracefully; a signal after that settles the run as CANCELLED at
        once and raises KeyboardInterrupt."""
        if self.cancel_file is not None and os.path.exists(self.cancel_file):
            self.cancel_file = None
            self.requests += 1
            if self.requests == 1:
                self.cancel("cancel requested by `pyoco runs cancel`")
        while self.signals_seen < len(self.signals):
            name = self.signals[self.signals_seen]
            self.signals_seen += 1
            self.requests += 1
            if self.requests == 1:
                self.cancel("%s received" % name)
            else:
                self.abandon("second signal (%s): stopped at once" % name)
                raise KeyboardInterrupt

    def crash(self, exc):
        """pyoco itself failed while running the run: end it FAILED, saying so."""
        import traceback
        _warn("internal error, the run ends FAILED:\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)))
        self.run.error = self.run.error or exc
        self.run.reason = "pyoco internal error: %s" % _describe(exc)
        self.stop(TaskState.SKIPPED, self.run.reason)
        self.finish(interrupted=True)

    def finish(self, interrupted=False):
        """Settle the run's outcome (once) and wake the caller."""
        run = self.run
        with self.lock:
            if self.closed:
                return False
            self.closed = True
        if self.stopping:
            self.settle_unfinished(interrupted)
        states = run._state
        if self.stop_state == TaskState.CANCELLED:
            run.status = RunState.CANCELLED
            run.reason = self.stop_reason
        elif TaskState.FAILED in states or run.reason is not None:
            run.status = RunState.FAILED
        else:
            run.status = RunState.COMPLETED
        run.ended_at = time.time()
        self.emit(run.ended_at, "run." + run.status.lower(), -1, run.status,
                  {"reason": run.reason} if run.reason else None)
        self.done.set()
        return True

    def settle_unfinished(self, interrupted):
        """A stopped run's tasks that never ended: maps whose instances all ended
        are collected; the rest are SKIPPED or CANCELLED with the stop's reason."""
        run = self.run
        self.closed = False             # collecting a map is an ordinary outcome
        for m, instances in list(self.expanded.items()):
            states = [run._state[k] for k in instances]
            if TaskState.FAILED in states or all(s == TaskState.SUCCEEDED for s in states):
                self.collect(m)
        self.closed = True
        unsettled = (TaskState.PENDING, TaskState.RUNNING) if interrupted else (
            TaskState.PENDING,)
        for i, state in enumerate(run._state):
            if state in unsettled or (i in self.expanded and state == TaskState.RUNNING):
                self.mark(i, self.stop_state, "interrupted: " + self.stop_reason
                          if state == TaskState.RUNNING else self.stop_reason)


def _timeout_error(name, timeout):
    """What a task past its deadline fails with, on every executor ("exceeded
    timeout" is the original pyoco's wording, which code may still match)."""
    return TimeoutError("task %r timed out after %gs (exceeded timeout)" % (name, timeout))


# ---------------------------------------------------------------------------
# Calling a task: threads, process pools and other executors
# ---------------------------------------------------------------------------

_STOP = None        # put on the ready queue to let a worker thread go
_NO_KWARGS = {}     # the keyword arguments of a task that has none: shared, never changed
_STAGING = ".attempts"      # where attempts in other processes write artifacts first


class _ThreadDriver:
    """Executes a run on threads.

    No coordinator sits between tasks: a worker that finishes a task counts
    down its successors' upstream counters itself, runs a sole ready
    successor at once, and queues the rest on a SimpleQueue from which
    other workers (started only when more than one task is ready) take them.
    The calling thread just waits, so it stays free to handle signals.
    """

    def __init__(self, core, workers):
        import queue
        self.core = core
        self.workers = workers
        self.ready = queue.SimpleQueue()
        self.inflight = 0           # tasks queued or running; 0 means the run is over
        self.threads = 0
        self.pool = None

    def execute(self):
        from concurrent.futures import ThreadPoolExecutor
        core = self.core
        roots = core.plan.roots
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pyoco")
        self.inflight = len(roots)
        for i in roots:
            self.ready.put(i)
        self.start_workers(len(roots))
        try:
            while not core.done.wait(self.next_wake()):
                core.check_requests()
                if core.pools is not None and core.pools.parked:
                    self.wake_waiting()
        finally:
            for _ in range(self.threads):
                self.ready.put(_STOP)
            self.pool.shutdown(wait=False)

    def next_wake(self):
        """How long the waiting thread may sleep: 50 ms, less when a rate allows a start."""
        due = self.core.pools.next_due() if self.core.pools is not None else None
        return 0.05 if due is None else max(0.001, min(0.05, due - time.monotonic()))

    def wake_waiting(self):
        core = self.core
        with core.lock:             # counted in flight before they stop counting as waiting
            woken = core.pools.wake(everyone=core.stopping)
            self.inflight += len(woken)
        for s in woken:
            self.ready.put(s)
        self.start_workers(len(woken))

    def start_workers(self, wanted):
        with self.core.lock:
            wanted = min(wanted, self.workers - self.threads)
            if wanted <= 0:
                return
            self.threads += wanted
        for _ in range(wanted):
            self.pool.submit(self.worker)

    def worker(self):
        ready = self.ready
        while True:
            i = ready.get()
            if i is _STOP:
                return
            try:
                self.work(i)
            except BaseException as exc:    # a bug here must end the run, not hang it
                self.core.crash(exc)
                return

    def work(self, i):
        """Run task i, then as many of its successors as can run inline."""
        core = self.core
        while True:
            ok = core.admit(i)
            if ok is None:
                ok = self.run_task(i)
            ready = ok if isinstance(ok, list) else () if ok is _WAIT else core.released(i, ok)
            nxt = more = None
            if ready:
                nxt = ready[0]
                if len(ready) > 1:
                    more = ready[1:]
            if more:
                with core.lock:
                    self.inflight += len(more)
                for s in more:
                    self.ready.put(s)
                self.start_workers(len(more))
            if nxt is None:
                with core.lock:
                    self.inflight -= 1
                    over = self.inflight == 0 and (core.pools is None or not core.pools.parked)
                if over:
                    core.finish()
                return
            i = nxt

    def run_task(self, i):
        """Task i's attempts, one after another in this thread."""
        core = self.core
        run, plan = core.run, core.plan
        fn, timeout, is_async = plan.funcs[i], plan.timeouts[i], plan.is_async[i]
        binds, takes_ctx = core.binds[i], plan.ctx[i]
        direct = timeout is None and core.sink is None and not is_async
        core.begin(i)
        attempt = 0
        while True:
            attempt += 1
            run._attempts[i] = attempt
            try:
                args, kwargs = _arguments(run, binds) if binds else ([], _NO_KWARGS)
            except Exception as exc:
                kind, value = _ERROR, exc
            else:
                if takes_ctx:
                    args.insert(0, Context(run, i, attempt))
                if direct:
                    kind, value = _attempt(fn, args, kwargs)
                else:
                    kind, value = _call(fn, args, kwargs, timeout, plan.names[i], core.sink,
                                        is_async)
            verdict = core.ended(i, attempt, kind, value)
            if verdict is True or verdict is False:
                return verdict
            if verdict and core.halt.wait(verdict) or core.stopping:
                return core.retry_dropped(i, value)


class _FutureDriver:
    """Executes a run on a process pool or any concurrent.futures.Executor.

    The calling thread coordinates: it submits ready tasks, takes
    completions from a queue fed by future callbacks, starts retries when
    their delay is over and fails tasks at their deadline. Outcomes go to
    the same _Scheduler as on threads.
    """

    def __init__(self, core, workers, where):
        import queue
        self.core = core
        self.workers = workers
        self.pool = where.pool          # an _OpenExecutor's: see _open_executor
        self.cancel = where.cancel      # how a call given up at its deadline is stopped
        self.queue = queue.SimpleQueue()    # (task number, future) as futures finish
        self.ready = None
        self.running = {}       # task number -> (attempt, future, deadline or None)
        self.waiting = []       # heap of (due, seq, task number, next attempt, last error)
        self.seq = 0
        core.on_abandon = where.kill_all

    def execute(self):
        from collections import deque
        core = self.core
        self.ready = deque(core.plan.roots)
        try:
            while self.ready or self.running or self.waiting or self.parked():
                if self.parked():
                    self.ready.extend(core.pools.wake(everyone=core.stopping))
                self.start_due_retries()
                self.start_ready()
                if self.running or self.waiting or self.parked():
                    self.wait_for_one()
        except Exception as exc:            # a bug here must end the run, not leave it RUNNING
            core.crash(exc)
        finally:
            if core.run.artifacts_dir is not None:
                import shutil
                shutil.rmtree(os.path.join(core.run.artifacts_dir, _STAGING), ignore_errors=True)
        core.finish()

    def parked(self):
        return self.core.pools is not None and self.core.pools.parked

    def start_due_retries(self):
        import heapq
        core, waiting = self.core, self.waiting
        while waiting and (waiting[0][0] <= time.monotonic() or core.stopping):
            _, _, i, attempt, exc = heapq.heappop(waiting)
            if core.stopping:
                self.ready.extend(core.released(i, core.retry_dropped(i, exc)))
            else:
                self.submit(i, attempt)

    def start_ready(self):
        core, ready = self.core, self.ready
        while ready and len(self.running) < self.workers:  # admit only what can start
            i = ready.popleft()
            ok = core.admit(i)
            if ok is None:
                core.begin(i)
                self.submit(i, 1)
            elif ok is not _WAIT:
                ready.extend(ok if isinstance(ok, list) else core.released(i, ok))

    def submit(self, i, attempt):
        core = self.core
        run, plan = core.run, core.plan
        run._attempts[i] = attempt
        try:
            args, kwargs = _arguments(core.run, core.binds[i])
            state = self.remote_context(i, attempt) if plan.ctx[i] else None
            future = self.pool.submit(_remote_attempt, plan.nodes[i], args, kwargs, state)
        except Exception as exc:
            self.outcome(i, attempt, _ERROR, exc)
            return
        timeout = plan.timeouts[i]
        self.running[i] = (attempt, future, time.monotonic() + timeout if timeout else None)
        future.add_done_callback(lambda f, i=i: self.queue.put((i, f)))

    def remote_context(self, i, attempt):
        """What a task in another process gets as ctx: plain, picklable data."""
        run, plan = self.core.run, self.core.plan
        return {"run_id": run.run_id, "params": run.params, "task_name": plan.names[i],
                "attempt": attempt, "artifacts": dict(run.artifacts),
                "artifacts_dir": run.artifacts_dir,
                # Artifacts are written aside, per attempt, and moved in when the
                # attempt's outcome is taken: one given up at its timeout changes nothing.
                "staging": None if run.artifacts_dir is None else os.path.join(
                    run.artifacts_dir, _STAGING, "%d-%d-%s" % (i, attempt, os.urandom(3).hex())),
                "results": {plan.names[p]: run._outputs[p] for p in plan.preds[i]}}

    def outcome(self, i, attempt, kind, value, tb=None):
        import heapq
        verdict = self.core.ended(i, attempt, kind, value, tb)
        if verdict is True or verdict is False:
            self.ready.extend(self.core.released(i, verdict))
        else:
            self.seq += 1
            heapq.heappush(self.waiting, (time.monotonic() + verdict, self.seq, i, attempt + 1,
                                          value))

    def wait_for_one(self):
        from queue import Empty
        core = self.core
        dues = [r[2] for r in self.running.values() if r[2] is not None]
        if self.waiting:
            dues.append(self.waiting[0][0])
        if self.parked() and core.pools.next_due() is not None:
            dues.append(core.pools.next_due())
        try:                # wake at least every 50 ms to act on signals
            item = self.queue.get(timeout=min([0.05] + [max(0.0, due - time.monotonic())
                                                        for due in dues]))
        except Empty:
            item = None
        core.check_requests()
        if item is not None:
            i, future = item
            entry = self.running.get(i)
            if entry is not None and entry[1] is future:
                del self.running[i]
                self.absorb(i, entry[0], future)
        now = time.monotonic()
        for i, (attempt, future, deadline) in list(self.running.items()):
            if deadline is not None and deadline <= now:
                del self.running[i]
                self.cancel(future)
                self.outcome(i, attempt, _ERROR, _timeout_error(
                    core.plan.names[i], core.plan.timeouts[i]))

    def absorb(self, i, attempt, future):
        """Take a finished future's outcome into the run."""
        from concurrent.futures.process import BrokenProcessPool
        core = self.core
        try:
            kind, value, artifacts, lines, tb = future.result()
        except BrokenProcessPool:
            value = RuntimeError("the worker process running task %r died" % core.plan.names[i])
            self.outcome(i, attempt, _ERROR, value)
            return
        except BaseException as exc:        # the executor itself failed the call
            self.outcome(i, attempt, _ERROR, exc)
            return
        run = core.run
        staged = None if run.artifacts_dir is None else os.path.join(
            os.path.realpath(run.artifacts_dir), _STAGING, "")
        for name, path in artifacts.items():
            if staged is not None and path.startswith(staged):
                path = _save_artifact_file(run.artifacts_dir, name, _PathOf(path))
            run._add_artifact(i, name, path)
        if core.sink is not None:
            name = core.plan.names[i]
            for ts, stream, text in lines:
                core.sink.log_line(name, stream, text, ts)
        self.outcome(i, attempt, kind, value, tb)


class _ProcessSlots:
    """Up to ``size`` single-process pools, for executor="process".

    One process per pool means a task that must be stopped at its deadline,
    or that crashes its process, takes only its own process down: the other
    tasks keep running and the slot is replaced.
    """

    def __init__(self, size):
        import threading
        self.size = size
        self.lock = threading.Lock()
        self.idle = []                  # [pool, pid]
        self.busy = {}                  # future -> [pool, pid]
        self.slots = []

    def submit(self, fn, *args):
        with self.lock:
            slot = self.idle.pop() if self.idle else None
        if slot is None:
            from concurrent.futures import ProcessPoolExecutor
            pool = ProcessPoolExecutor(1, initializer=_process_worker_init)
            slot = [pool, pool.submit(os.getpid).result()]
            self.slots.append(slot)
        future = slot[0].submit(fn, *args)
        with self.lock:
            self.busy[future] = slot
        future.add_done_callback(self.release)
        return future

    def release(self, future):
        with self.lock:
            slot = self.busy.pop(future, None)
            if slot is None:
                return
            # A broken pool is left out of idle and shut down with the others at the
            # end: this callback runs in the pool's own thread, which holds the lock
            # shutdown() needs (calling it here deadlocks on Python 3.12).
            if future.cancelled() or future.exception() is None or not _is_broken(future):
                self.idle.append(slot)


    def kill(self, future):
        """Stop the process running ``future`` (a task past its deadline)."""
        with self.lock:
            slot = self.busy.pop(future, None)
        if slot is not None:
            _kill_process(slot[1])
            slot[0].shutdown(wait=False)

    def kill_all(self):
        with self.lock:
            slots, self.busy, self.idle = list(self.busy.values()), {}, []
        for slot in slots:
            _kill_process(slot[1])

    def shutdown(self, wait=True):
        for pool, _ in self.slots:
            pool.shutdown(wait=wait)


def _is_broken(future):

    from concurrent.futures.process import BrokenProcessPool
    return isinstance(future.exception(), BrokenProcessPool)


def _kill_process(pid):
    import signal
    try:
        os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    except OSError:
        pass


def _process_worker_init():
    # Ctrl+C goes to the whole process group: the parent decides what stops.
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _RemoteContext:
    """``ctx`` for a task running in another process: plain data, no shared state.

    ``scratch`` is a fresh dict, ``results`` holds the direct upstream
    outputs, ``cancelled`` is never set; artifacts are written directly to
    the run's folder and reported back.
    """

    def __init__(self, state):
        import threading
        self.run_id = state["run_id"]
        self.params = state["params"]
        self.task_name = state["task_name"]
        self.attempt = state["attempt"]
        self.results = state["results"]
        self.artifacts = state["artifacts"]
        self.scratch = {}
        self.cancelled = threading.Event()
        self.saved = {}
        self._dir = state["artifacts_dir"]
        self._staging = state.get("staging")

    @property
    def log(self):
        return _task_logger(self.task_name)

    # The original pyoco's names, as on Context.
    is_cancelled = property(lambda self: self.cancelled.is_set())
    env = property(lambda self: os.environ)

    def get_result(self, name):
        return _result_of(self.results, name)

    def skip(self, reason="skipped"):
        raise Skip(reason)

    def save_artifact(self, name, data):
        if self._staging is not None:   # moved to the run's folder when the attempt ends
            staged = _save_artifact_file(self._staging, name, data)
            self.saved[name] = staged
            path = os.path.join(os.path.realpath(self._dir),
                                os.path.relpath(staged, os.path.realpath(self._staging)))
            self.artifacts[name] = path
            return path
        if self._dir is None:           # an unrecorded run: a folder of the worker's own
            import tempfile
            self._dir = tempfile.mkdtemp(prefix="pyoco-%s-" % self.run_id)
        path = _save_artifact_file(self._dir, name, data)
        self.artifacts[name] = self.saved[name] = path
        return path


def _call(fn, args, kwargs, timeout, name, sink, is_async=False):
    """One attempt with its printed output routed to ``sink`` (the task's log)
    and, with a timeout, on a daemon thread that is given up at the deadline.
    Returns (kind, value) as _attempt does.

    An abandoned thread runs on (Python cannot kill a thread) but nothing
    waits for it, and as a daemon it does not keep the process alive; from
    then on its prints, scratch writes and artifacts are refused (see
    _abandoned). A coroutine function runs on an event loop in this thread
    instead, where the timeout really cancels it.
    """
    if timeout is None or is_async:
        owner = _get_ident()
        if sink is not None:
            _print_owners[owner] = (sink, name)
        try:
            kind, value = _attempt(fn, args, kwargs)
            if is_async and kind == _OK:
                kind, value = _attempt(_run_coroutine, (value, timeout, name), {})
            return kind, value
        finally:
            _print_owners.pop(owner, None)
            _end_printed_lines()
    import threading
    box = []                # the outcome, once the attempt ends
    finished = threading.Event()

    def target():
        owner = _get_ident()
        if sink is not None:
            _print_owners[owner] = (sink, name)
        try:
            box.append(_attempt(fn, args, kwargs))
        finally:
            _print_owners.pop(owner, None)
            _end_printed_lines()
            with _abandon_lock:
                _abandoned.discard(owner)
                finished.set()

    thread = threading.Thread(target=target, name="pyoco-" + name, daemon=True)
    thread.start()
    if not finished.wait(timeout):
        with _abandon_lock:
            if not finished.is_set():
                _abandoned.add(thread.ident)
                _print_owners.pop(thread.ident, None)   # what it prints now is nobody's
                return _ERROR, _timeout_error(name, timeout)
    return box[0]


def _remote_attempt(node, args, kwargs, state):
    """One attempt of a task in a worker (a process pool, or any executor).

    Returns (kind, value, saved artifacts, printed lines, traceback text),
    kind as _attempt says; an exception comes back as a value, replaced by a
    RuntimeError with its text when it cannot be pickled.
    """
    lines = _LineCollector()
    ctx = _RemoteContext(state) if state is not None else None
    if ctx is not None:
        args = [ctx] + list(args)
    me = _get_ident()
    _tee_install()
    _print_owners[me] = (lines, node.name)
    try:
        kind, value = _attempt(_invoke, (node._callable(), args, kwargs, None, node.name), {})
    finally:
        _print_owners.pop(me, None)
        _end_printed_lines()
        _tee_remove()
    tb = None
    if kind in (_ERROR, _FATAL):
        import pickle
        import traceback
        tb = "".join(traceback.format_exception(type(value), value, value.__traceback__))
        try:
            pickle.loads(pickle.dumps(value))
        except Exception:
            value = RuntimeError(_describe(value))
    return kind, value, {} if ctx is None else ctx.saved, lines.close(), tb


class _LineCollector:
    """Collects the lines one remote task call prints: (time, stream, text)."""

    def __init__(self):
        self.lines, self.partial = [], {}

    def feed(self, _, stream, text):
        *whole, self.partial[stream] = (self.partial.get(stream, "") + text).split("\n")
        now = time.time()
        self.lines.extend((now, stream, line) for line in whole)

    def close(self):
        for stream, rest in self.partial.items():
            if rest:
                self.lines.append((time.time(), stream, rest))
        self.partial = {}
        return self.lines


def _invoke(fn, args, kwargs, timeout, name):
    """Call a task function; a coroutine it returns runs on an event loop of its own."""
    out = fn(*args, **kwargs)
    if type(out).__name__ == "coroutine" and hasattr(out, "send"):
        return _run_coroutine(out, timeout, name)
    return out


def _run_coroutine(coro, timeout, name):
    """Run an async task's coroutine to completion in this thread.

    With a timeout the coroutine is cancelled at the deadline (its
    ``finally`` blocks run), and the task fails with TimeoutError.
    """
    import asyncio

    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    try:
        return asyncio.run(bounded() if timeout is not None else coro)
    except asyncio.TimeoutError:
        raise _timeout_error(name, timeout) from None


# ---------------------------------------------------------------------------
# Executors: from a SPEC string to what runs a run's calls (SPEC section 14)
# ---------------------------------------------------------------------------

_EXECUTOR_FORMS = ("thread", "process", "dask", "dask://HOST:PORT", "ray", "ray://HOST:PORT",
                   "MODULE:NAME")
# A scheduler that cannot be reached is a usage error within 15 s (SPEC section 14):
_REACH_TIMEOUT = 4.0        # seconds for something to accept a connection at the address,
_CONNECT_TIMEOUT = 10.0     # then for the client to connect; PYOCO_CONNECT_TIMEOUT changes it


class ExecutorError(PyocoError):
    """An executor that cannot be opened: its package is not installed, its
    scheduler cannot be reached, or MODULE:NAME names no executor."""


def _check_executor(spec):
    """Return ``spec`` when Engine(executor=...) takes it; else raise ValueError
    naming the closest valid form. Opens nothing: that is _open_executor."""
    if not isinstance(spec, str):
        if callable(getattr(spec, "submit", None)) and not isinstance(spec, type):
            return spec
        raise ValueError("executor must be a SPEC string (%s) or a concurrent.futures.Executor,"
                         " not %r" % (", ".join(_EXECUTOR_FORMS), spec))
    if spec in ("thread", "process", "dask", "ray"):
        return spec
    scheme, sep, address = spec.partition("://")
    if sep and scheme in ("dask", "ray"):
        host, colon, port = address.rpartition(":")
        if colon and host and port.isdigit() and 0 < int(port) < 65536:
            return spec
        raise ValueError("executor %r: write %s://HOST:PORT, as in %s://127.0.0.1:%d"
                         % (spec, scheme, scheme, 8786 if scheme == "dask" else 10001))
    module, colon, name = spec.partition(":")
    if not sep and colon and name.isidentifier() and all(
            part.isidentifier() for part in module.split(".")):
        return spec
    near = _closest(scheme if sep else spec, ("thread", "process", "dask", "ray"))
    raise ValueError("unknown executor %r%s (the choices are: %s)"
                     % (spec, near, ", ".join(_EXECUTOR_FORMS)))


class _OpenExecutor:
    """An executor opened for runs.

    ``pool.submit`` runs the calls (None: pyoco's own threads);
    ``cancel(future)`` stops a call given up at its deadline; ``kill_all()``
    stops every running call at a hard stop; ``close(wait)`` releases what
    was started for it, never an executor the caller passed in.
    """

    __slots__ = ("name", "pool", "cancel", "kill_all", "close")

    def __init__(self, name, pool=None, cancel=None, kill_all=None, close=None):
        self.name = name            # the record's "executor"
        self.pool = pool
        self.cancel = cancel or _cancel_future
        self.kill_all = kill_all
        self.close = close or _close_nothing


def _cancel_future(future):
    future.cancel()     # stops a call that has not started; a running one runs on, unheard


def _close_nothing(wait):
    pass


def _open_executor(spec, workers):
    """Open what runs the calls on ``spec`` (checked by _check_executor) for
    up to ``workers`` calls at once. Raises ExecutorError when it cannot.

    Everything that starts a cluster, connects to one or imports an
    executor's package happens here, so Engine.run and the CLI do the same.
    """
    if not isinstance(spec, str):
        return _OpenExecutor(type(spec).__name__, spec)
    if spec == "thread":
        return _OpenExecutor(spec)
    if spec == "process":
        slots = _ProcessSlots(workers)
        return _OpenExecutor(spec, slots, slots.kill, slots.kill_all, slots.shutdown)
    kind = spec.partition(":")[0]
    if kind in ("dask", "ray"):
        if spec != kind:        # reach the address first: a clear error, and fast
            _reach(spec, spec.partition("://")[2], "Dask scheduler" if kind == "dask"
                   else "Ray cluster")
        opener = _open_dask if kind == "dask" else _open_ray
        if spec == "ray":   # a local Ray talks over loopback, not the machine's address
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        module = _import_for(spec, "distributed" if kind == "dask" else "ray")
        if spec != kind:
            return opener(spec, workers, module)
        with _CtrlCIgnored():
            return opener(spec, workers, module)
    return _open_named(spec)


def _import_for(spec, package):
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ExecutorError("executor %r needs the %s package, which this Python (%s) cannot"
                            " import (%s): pip install %s"
                            % (spec, package, sys.executable, exc, package)) from None


def _reach(spec, address, what):
    """Fail within _REACH_TIMEOUT, naming the address, when nothing listens there."""
    import socket
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), _REACH_TIMEOUT).close()
    except OSError as exc:
        raise ExecutorError("executor %r: cannot reach the %s at %s: %s"
                            % (spec, what, address, exc.strerror or exc)) from None


def _connect_timeout(spec):
    """Seconds a client may take to connect once the address accepted:
    PYOCO_CONNECT_TIMEOUT (for a slow cluster), else _CONNECT_TIMEOUT."""
    text = os.environ.get("PYOCO_CONNECT_TIMEOUT", "").strip()
    if not text:
        return _CONNECT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ExecutorError("executor %r: PYOCO_CONNECT_TIMEOUT must be seconds > 0, not %r"
                            % (spec, text))
    return seconds


def _connect(spec, what, connect):
    """``connect()`` on a daemon thread, given up after _CONNECT_TIMEOUT: a
    scheduler that accepts the connection but never answers must not hang the
    run (the clients' own timeouts cover only the first step)."""
    import threading
    box = []

    def target():
        try:
            box.append((True, connect()))
        except BaseException as exc:
            box.append((False, exc))
    thread = threading.Thread(target=target, name="pyoco-connect", daemon=True)
    thread.start()
    timeout = _connect_timeout(spec)
    thread.join(timeout)
    address = spec.partition("://")[2]
    if not box:
        raise ExecutorError("executor %r: the %s at %s did not answer within %gs"
                            % (spec, what, address, timeout))
    ok, value = box[0]
    if not ok:
        raise ExecutorError("executor %r: cannot connect to the %s at %s: %s"
                            % (spec, what, address, _describe(value))) from None
    return value


class _CtrlCIgnored:
    """While a local cluster starts, SIGINT is ignored, and so its processes
    inherit ignoring it: Ctrl+C in a terminal reaches the whole process group,
    and the run (not each worker) decides what stops. Only in the main thread."""

    def __enter__(self):
        import signal
        import threading
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        import signal
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _open_failed(spec, what, exc):
    """Why ``spec`` could not be opened, in one line."""
    address = spec.partition("://")[2]
    if address:
        return "executor %r: cannot reach the %s at %s: %s" % (spec, what, address,
                                                               _describe(exc))
    return "executor %r: could not start a local %s cluster: %s (see docs/scale-out.md)" % (
        spec, what.split()[0], _describe(exc))


def _open_dask(spec, workers, distributed):
    """``dask``: a LocalCluster of worker processes for the run, on 127.0.0.1
    without a dashboard; ``dask://HOST:PORT``: a client of that scheduler."""
    import logging
    cluster = None
    try:
        if spec == "dask":
            n = max(1, min(workers, os.cpu_count() or 1))
            cluster = distributed.LocalCluster(
                n_workers=n, threads_per_worker=-(-workers // n), processes=True,
                host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR)
            client = distributed.Client(cluster, timeout=_CONNECT_TIMEOUT)
        else:
            client = _connect(spec, "Dask scheduler", lambda: distributed.Client(
                "tcp://" + spec.partition("://")[2], timeout=_connect_timeout(spec)))
    except ExecutorError:
        raise
    except Exception as exc:
        if cluster is not None:
            cluster.close()
        raise ExecutorError(_open_failed(spec, "Dask scheduler", exc)) from None

    def close(wait):
        if cluster is not None:     # its workers may still run calls given up at a deadline:
            for nanny in list(cluster.workers.values()):    # stop them now, not in 4 s
                if getattr(nanny, "pid", None):
                    _kill_process(nanny.pid)
        client.close()
        if cluster is not None:
            cluster.close()
    # pure=False: a retry with the same arguments must run again, not reuse a result
    return _OpenExecutor(spec, client.get_executor(pure=False), close=close)


def _open_ray(spec, workers, ray):
    """``ray``: a Ray instance of this machine's, on loopback, started for the
    run and shut down after; ``ray://HOST:PORT``: a Ray client of that cluster.
    When the program already called ray.init, that connection is used and left open."""
    import logging
    started = not ray.is_initialized()
    if started:
        try:
            if spec == "ray":
                ray.init(address="local", num_cpus=workers, include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False,
                         logging_level=logging.ERROR)
            else:
                _connect(spec, "Ray cluster", lambda: ray.init(
                    spec, log_to_driver=False, logging_level=logging.ERROR))
        except ExecutorError:
            raise
        except Exception as exc:
            raise ExecutorError(_open_failed(spec, "Ray cluster", exc)) from None
    pool = _ray_executor(ray)

    def close(wait):
        if started:
            ray.shutdown()
    return _OpenExecutor(spec, pool, pool.cancel_call, pool.cancel_all, close)


def _ray_executor(ray):
    """A concurrent.futures.Executor whose calls are Ray tasks. Ray has none of
    its own, but ``ObjectRef.future()`` is a concurrent.futures.Future."""
    import threading
    from concurrent.futures import Executor

    class RayExecutor(Executor):
        def __init__(self):
            self.remotes = {}       # function -> the Ray remote function that calls it
            self.refs = {}          # future -> its ObjectRef, while the call runs
            self.lock = threading.Lock()

        def submit(self, fn, *args, **kwargs):
            remote = self.remotes.get(fn)
            if remote is None:      # pyoco's retries, not Ray's
                remote = self.remotes[fn] = ray.remote(max_retries=0)(fn)
            ref = remote.remote(*args, **kwargs)
            future = ref.future()
            with self.lock:
                self.refs[future] = ref
            future.add_done_callback(self.forget)
            return future

        def forget(self, future):
            with self.lock:
                self.refs.pop(future, None)

        def cancel_call(self, future):
            """Ray's own cancel; force kills the worker process running the call."""
            with self.lock:
                ref = self.refs.pop(future, None)
            if ref is not None:
                ray.cancel(ref, force=True)

        def cancel_all(self):
            with self.lock:
                refs, self.refs = list(self.refs.values()), {}
            for ref in refs:
                ray.cancel(ref, force=True)

    return RayExecutor()


def _open_named(spec):
    """``MODULE:NAME``: an Executor, or a function (or class) that returns one,
    from MODULE imported from the working directory. An executor made here is
    shut down after the run; one that MODULE holds is left as it is."""
    import importlib
    module_name, _, name = spec.partition(":")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExecutorError("executor %r: cannot import %r from %s: %s"
                            % (spec, module_name, here, exc)) from None
    except Exception as exc:
        raise ExecutorError("executor %r: importing %r raised %s"
                            % (spec, module_name, _describe(exc))) from None
    found = getattr(module, name, _MISSING)
    if found is _MISSING:
        raise ExecutorError("executor %r: module %r has no %r%s" % (
            spec, module_name, name,
            _closest(name, [n for n in vars(module) if not n.startswith("_")])))
    if not isinstance(found, type) and callable(getattr(found, "submit", None)):
        return _OpenExecutor(spec, found)
    if not callable(found):
        raise ExecutorError("executor %r: %r is neither a concurrent.futures.Executor nor a"
                            " function returning one" % (spec, found))
    try:
        made = found()
    except Exception as exc:
        raise ExecutorError("executor %r: calling %s() raised %s"
                            % (spec, name, _describe(exc))) from None
    if not callable(getattr(made, "submit", None)):
        raise ExecutorError("executor %r: %s() returned %r, not a concurrent.futures.Executor"
                            % (spec, name, made))

    def close(wait):
        try:                # the run does not wait for calls given up at their deadline
            made.shutdown(wait=False, cancel_futures=True)
        except TypeError:   # an Executor without cancel_futures
            made.shutdown(wait=False)
    return _OpenExecutor(spec, made, close=close)


# ---------------------------------------------------------------------------
# Signals: Ctrl+C and SIGTERM
# ---------------------------------------------------------------------------

class _SignalGuard:
    """While a run is active in the main thread: the first SIGINT or SIGTERM
    cancels it gracefully, a second one settles it as CANCELLED at once and
    raises KeyboardInterrupt. Elsewhere (other threads) it does nothing."""

    def __init__(self, runner):
        import threading
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        import signal
        self.signal = signal
        self.runner = runner
        self.hits = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[signum] = signal.signal(signum, self.handle)
            except (ValueError, OSError):
                pass

    def handle(self, signum, frame):
        # Only note it: the waiting main thread acts on it (_Runner.check_signals).
        # A handler that took locks could deadlock against the code it interrupted.
        self.runner.signals.append(self.signal.Signals(signum).name)

    def restore(self):
        for signum, handler in self.previous.items():
            try:
                self.signal.signal(signum, handler)
            except (ValueError, OSError, TypeError):
                pass
        self.previous = {}


# ---------------------------------------------------------------------------
# Observers: the trace
# ---------------------------------------------------------------------------

def _cute_default():
    return os.environ.get("PYOCO_CUTE", "1").strip().lower() not in ("0", "false", "no", "off")


def _ms(seconds):
    ms = seconds * 1000
    return "%.2f ms" % ms if ms < 1000 else "%.2f s" % seconds


def _plain_value(value):
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable() and " " not in text and '"' not in text \
            and "=" not in text and "\\" not in text and text:
        return text                     # the common case: a name, a number, an id
    text = text.encode("ascii", "backslashreplace").decode("ascii")

    if not text or any(c in text for c in ' "=\n\r\t'):
        text = '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"').replace(
            "\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return text


class _TraceFormat:
    """Turns a run's events into trace lines, cute or plain (see SPEC section 3).

    It remembers what the lines need from earlier events (when a task
    started, how many failed), so it reads nothing but the events and the
    run's id and flow name.
    """

    __slots__ = ("cute", "started", "failed", "run_started")

    def __init__(self, cute):
        self.cute = cute
        self.started = {}           # task name -> when its task.started event came
        self.failed = 0
        self.run_started = None

    def line(self, run, ev):
        """The trace line (without newline) for one event, or None for none."""
        ts, kind, name, state, data = ev
        data = data or {}
        took = None
        if name is None:
            if kind == "run.started":
                self.run_started = ts
            elif self.run_started is not None and kind in _RUN_ENDS:
                took = ts - self.run_started
        elif kind == "task.started":
            self.started[name] = ts
        elif kind in _TASK_ENDS:
            began = self.started.pop(name, None)
            if kind == "task.failed":
                self.failed += 1
            if began is not None:
                took = ts - began
        if self.cute:
            return self.cute_line(run, kind, name, data, took)
        return self.plain_line(run, ts, kind, name, state, data, took)

    def cute_line(self, run, kind, name, data, took):
        if name is None:
            flow = run.flow_name
            if kind == "run.started":
                return "🐇 pyoco > start flow=%s run_id=%s" % (flow, run.run_id)
            if kind == "run.completed":
                return "🥕 done flow=%s" % flow
            if kind == "run.failed":
                n = self.failed
                return "💔 failed flow=%s (%d task%s failed)" % (flow, n, "" if n == 1 else "s")
            if kind == "run.cancelling":
                return "🛑 cancel flow=%s" % flow
            if kind == "run.cancelled":
                return "🛑 cancelled flow=%s" % flow
            return None
        if kind == "task.started":
            return "🏃 start node=%s" % name
        if kind == "task.succeeded":
            if data.get("reused_from"):
                return "♻️ reuse node=%s (run %s)" % (name, data["reused_from"])
            if data.get("reason"):      # overridden: not called
                return "✅ done node=%s (%s)" % (name, data["reason"])
            return "✅ done node=%s (%s)" % (name, _ms(took or 0.0))
        if kind == "task.retrying":
            return "🔁 retry node=%s attempt=%d/%d in %gs" % (name, data["attempt"], data["of"],
                                                            data["delay_s"])
        if kind == "task.failed":
            return "💥 error node=%s %s" % (name, _one_line(data.get("error")))
        if kind == "task.skipped":
            return "⏭️ skip node=%s (%s)" % (name, _one_line(data.get("reason")))
        if kind == "task.cancelled":
            return "🚫 cancelled node=%s (%s)" % (name, _one_line(data.get("reason")))
        return None

    def plain_line(self, run, ts, kind, name, state, data, took):
        level, word = EVENT_KINDS.get(kind, ("INFO", kind))
        if name is None:
            fields = [("flow", run.flow_name)]
            if kind != "run.started":
                fields.append(("status", state))
                if took is not None:
                    fields.append(("duration_ms", "%.2f" % (took * 1000)))
        else:
            fields = [("node", name)]
            if kind == "task.succeeded":
                if data.get("reused_from"):
                    word = "reuse"
                    fields.append(("from_run", data["reused_from"]))
                else:
                    fields.append(("duration_ms", "%.2f" % ((took or 0.0) * 1000)))
            elif kind == "task.retrying":
                fields.append(("attempt", "%d/%d" % (data["attempt"], data["of"])))
                fields.append(("delay_s", "%g" % data["delay_s"]))
        for key in ("error", "reason"):
            if data.get(key) is not None:
                fields.append((key, data[key]))
        fields.append(("run_id", run.run_id))
        return "%s %s %s %s" % (_iso(ts), level, word,
                                " ".join("%s=%s" % (k, _plain_value(v)) for k, v in fields))


class _TraceWriter:
    """Observer that prints the trace, cute or plain, one line per event.

    To a terminal each line is written at once; to a file or a pipe lines are
    written in batches (see _hold_line), and all of them before the run's
    last line.
    """

    __slots__ = ("stream", "format", "hold")

    def __init__(self, target, cute):
        self.stream = None if target is True else target
        self.format = _TraceFormat(cute)
        stream = sys.stderr if target is True else target
        stream = getattr(stream, "_pyoco_original", stream)
        try:
            held = stream is not None and stream.fileno() >= 0 and not stream.isatty()
        except (AttributeError, OSError, ValueError):
            held = False            # no file behind it (StringIO): nothing to save
        self.hold = stream if held else None

    def __call__(self, run, ev):
        line = self.format.line(run, ev)
        if line is None:
            return
        if self.hold is not None and ev[1] not in _RUN_ENDS:
            _hold_line(self.hold, line + "\n")
            return
        if self.stream is None:
            _flush_stdout()         # keep task prints and trace lines in order on one pipe
        _write_line(self.stream, line + "\n")


# -- Progress on a terminal (SPEC section 3): each running map is one line
# redrawn in place below the trace, with a status line while a task is slow.

_SLOW = 2.0         # seconds: a task running longer shows the run's status line


def _progress_terminal(trace, cute, progress, executor):
    """The terminal to draw progress lines on, or None when every event is a
    line: plain mode, a trace that does not go to stderr, stderr that is not
    a terminal (or a dumb one), progress=False, PYOCO_PROGRESS=0 when
    progress is None (auto), or tasks that do not run in this process's
    threads: what a worker process prints goes to the terminal by itself
    and would land on a progress line."""
    if progress is False or not cute or not (trace is True or trace is sys.stderr):
        return None
    if executor != "thread":
        from concurrent.futures import ThreadPoolExecutor
        if not isinstance(executor, ThreadPoolExecutor):
            return None
    if progress is None and os.environ.get("PYOCO_PROGRESS", "1").strip().lower() in (
            "0", "false", "no", "off"):
        return None
    if os.environ.get("TERM") == "dumb":
        return None                 # no cursor control: ESC[K would show as text
    stream = getattr(sys.stderr, "_pyoco_original", sys.stderr)
    try:
        if stream is None or not stream.isatty():
            return None
        "🗺️⏳…·".encode(stream.encoding or "ascii")
    except (AttributeError, OSError, ValueError, LookupError):  # UnicodeEncodeError too
        return None                 # escapes instead of emoji would break the widths
    return stream


def _widths(text):
    """The terminal cells each character of ``text`` takes: two for wide
    characters and emoji (a character followed by U+FE0F is one), none for
    combining marks and format characters, one for the rest."""
    from unicodedata import category, east_asian_width
    widths = []
    for c in text:
        if c == "\ufe0f":
            if widths and widths[-1] == 1:
                widths[-1] = 2
            widths.append(0)
        elif east_asian_width(c) in ("W", "F"):
            widths.append(2)
        else:
            widths.append(0 if category(c) in ("Mn", "Me", "Cf") else 1)
    return widths


def _cells(text):
    return len(text) if text.isascii() else sum(_widths(text))


def _cut(text, room):
    """The longest start of ``text`` that fits in ``room`` cells."""
    if _cells(text) <= room:
        return text
    used = 0
    for k, width in enumerate(_widths(text)):
        used += width
        if used > room:
            return text[:k]
    return text


def _shorten(text, room):
    """``text`` in at most ``room`` cells, its middle replaced by "…" if it must be."""
    if _cells(text) <= room:
        return text
    if room < 3:
        return _cut(text, room)
    widths = _widths(text)
    head = _cut(text, room // 2)         # and the rest of room - 1 for the tail
    tail_room, start = room - 1 - _cells(head), len(text)
    while start > len(head) and widths[start - 1] <= tail_room:
        tail_room -= widths[start - 1]
        start -= 1
    return head + "…" + text[start:]


def _printable(name):
    """A task name for a redrawn line: a newline or escape in it would break the screen."""
    return name if name.isprintable() else "".join(c if c.isprintable() else "?" for c in name)


def _fit(head, name, parts, room):
    """``head + name`` and the parts joined with " · ", in at most ``room``
    cells: the name is shortened first (to no fewer than 12 cells), then
    parts are left off from the end, then the line is cut."""
    name = _printable(name)
    while True:
        tail = " " + " · ".join(parts) if parts else ""
        left = room - _cells(head) - _cells(tail)
        if _cells(name) <= left or left >= 12:
            return head + _shorten(name, left) + tail
        if len(parts) <= 1:
            return _cut(head + _shorten(name, 12) + tail, room)
        parts = parts[:-1]


def _span(seconds, gap=" ", up=False):
    """A duration for a redrawn line in whole units, rounded (``up``: to the
    next unit): 14 s, 2m05s, 1h02m; ``gap`` goes between number and s."""
    s = -int(-seconds // 1) if up else int(seconds + 0.5)
    if s < 60:
        return "%d%ss" % (s, gap)
    if s < 3600:
        return "%dm%02ds" % divmod(s, 60)
    return "%dh%02dm" % divmod(s // 60, 60)


def _instance_count(plan, name):
    """How many instances map node ``name`` expanded into: ``name[0]`` to
    ``name[k-1]`` are in the plan and ``name[k]`` is not (found in log2(k) looks)."""
    index = plan.index
    if "%s[0]" % name not in index:
        return 0
    low, high = 1, 1            # name[low - 1] is there; the answer is in [low, high]
    while "%s[%d]" % (name, high) in index:
        low, high = high + 1, high * 2
    while low < high:
        middle = (low + high) // 2
        if "%s[%d]" % (name, middle) in index:
            low = middle + 1
        else:
            high = middle
    return low


class _MapProgress:
    """The counts behind one map's progress line, from its instances' events.

    The counters are bumped without a lock by the threads that report the
    instances (a lock here would make them queue on every instance): they
    are for the live line, and the final line counts the run's states.
    """

    __slots__ = ("name", "total", "first", "began", "ran", "succeeded", "failed", "skipped",
                 "cancelled", "end", "took", "closed")

    def __init__(self, name, total, first, began):
        self.name = name
        self.total = total          # instances
        self.first = first          # the first instance's task number
        self.began = began          # when the map node started
        self.ran = 0                # instances that started and ended: the rate is theirs
        self.succeeded = self.failed = self.skipped = self.cancelled = 0
        self.end = None             # the map node's own last event kind, once it came
        self.took = None            # the map node's duration, once it ended
        self.closed = False         # its final line is printed

    def ended(self):
        return self.succeeded + self.failed + self.skipped + self.cancelled

    def line(self, now, running, room):
        """🗺️ work 120/200 done · 8 running · 1 failed · 35/s · ETA 2s"""
        parts = ["%d/%d done" % (self.succeeded, self.total), "%d running" % running,
                 "%d failed" % self.failed]
        parts += ["%d %s" % (n, what) for n, what in ((self.skipped, "skipped"),
                                                       (self.cancelled, "cancelled")) if n]
        spent = now - self.began
        if self.ran and spent > 0:
            rate = self.ran / spent
            parts.append(("%.0f/s" if rate >= 10 else "%.1f/s") % rate)
            parts.append("ETA " + _span(max(0, self.total - self.ended()) / rate, "", up=True))
        return _fit("🗺️ ", self.name, parts, room)

    def settled(self, run):
        """Count the instances' states in the run; False while some have not ended."""
        states = run._state[self.first:self.first + self.total]
        self.succeeded, self.failed, self.skipped, self.cancelled = (
            states.count(state) for state in (TaskState.SUCCEEDED, TaskState.FAILED,
                                              TaskState.SKIPPED, TaskState.CANCELLED))
        return self.ended() == self.total

    def final_line(self):
        """✅ done node=work 200/200 (5.71 s), or the map's own end with what did not succeed."""
        kind = self.end or ("task.failed" if self.failed else "task.cancelled")
        word = {"task.succeeded": "✅ done", "task.failed": "💥 error",
                "task.skipped": "⏭️ skip", "task.cancelled": "🚫 cancelled"}[kind]
        counts = "".join(" · %d %s" % (n, what) for n, what in (
            (self.failed, "failed"), (self.skipped, "skipped"), (self.cancelled, "cancelled"))
            if n)
        took = self.took if self.took is not None else time.time() - self.began
        return "%s node=%s %d/%d%s (%s)" % (word, self.name, self.succeeded, self.total, counts,
                                             _ms(took))


class _ProgressTrace:
    """Observer that prints the cute trace on a terminal, with progress lines.

    Every event is the line _TraceWriter prints, except for map instances:
    their starts and successes are only counted, on their map's progress
    line, and so are the skips and cancels of instances that never started
    (a stopped run's). Their retries and errors, and the skips and cancels
    of instances that had started, are lines. A map that ends prints one
    final line instead of its progress line and its own done or error line.

    Events only change dicts and counters, without a lock; the live lines'
    timer reads them (live_lines) to redraw. self.lock is taken only when a
    map's progress begins or ends.
    """

    def __init__(self, stream):
        self.stream = stream
        self.format = _TraceFormat(cute=True)
        self.lock = _allocate_lock()
        self.run = None
        self.live = False           # drawing progress lines: from run.started to the run's end
        self.maps = {}              # map node name -> _MapProgress, from its first instance on
        self.map_starts = {}        # map node name -> when it started, until its first instance
        self.running = {}           # task name -> when it started, for all but map nodes
        self.ended = 0              # tasks that ended, instances included

    def __call__(self, run, ev):
        kind, name = ev[1], ev[2]
        if self.live:
            if name is None:
                if kind in _RUN_ENDS:
                    return self.finish(run, ev)
            else:
                progress = self.map_of(run, name) if name[-1:] == "]" else None
                if progress is not None:
                    return self.instance(run, ev, progress)
                if self.task(run, ev):
                    return
        elif kind == "run.started" and self.run is None:
            self.run = run
            self.live = _live_join(self, self.stream)
        self.print(self.format.line(run, ev))

    def print(self, line):
        if line:
            _flush_stdout()         # keep task prints and trace lines in order
            _write_line(self.stream, line + "\n")

    def map_of(self, run, name):
        """The _MapProgress of the map that task ``name`` is an instance of, or None."""
        base = name.rpartition("[")[0]
        progress = self.maps.get(base)
        if progress is None and base in self.map_starts:
            with self.lock:         # its first instance: the map's instances are all known now
                progress = self.maps.get(base)
                if progress is None and base in self.map_starts:
                    plan = run._plan
                    progress = self.maps[base] = _MapProgress(
                        base, _instance_count(plan, base), plan.index["%s[0]" % base],
                        self.map_starts.pop(base))
            _live_changed()
        return progress

    def task(self, run, ev):
        """Count an event of a task that is no map instance; True when it is
        a map's end, whose line is the map's final line."""
        ts, kind, name = ev[0], ev[1], ev[2]
        if kind == "task.started":
            i = run._plan.index.get(name)
            if i is not None and i in run._plan.maps:
                self.map_starts[name] = ts
            else:
                self.running[name] = ts
            return False
        if kind not in _TASK_ENDS:
            return False
        self.ended += 1
        self.running.pop(name, None)
        self.map_starts.pop(name, None)
        progress = self.maps.get(name)
        if progress is None:
            return False
        self.format.line(run, ev)       # counted as its line would be (failures, durations)
        progress.end, progress.took = kind, ev[0] - progress.began
        if progress.settled(run):       # else at the run's end: a hard stop ends maps first
            self.print(self.close(progress))
        return True

    def instance(self, run, ev, progress):
        ts, kind, name = ev[0], ev[1], ev[2]
        if kind == "task.started":
            self.running[name] = ts
            return
        line = None
        if kind in _TASK_ENDS:
            self.ended += 1
            began = self.running.pop(name, None)
            if kind == "task.succeeded":
                progress.succeeded += 1
            elif kind == "task.failed":
                progress.failed += 1
            elif kind == "task.skipped":
                progress.skipped += 1
            else:
                progress.cancelled += 1
            if began is not None:
                progress.ran += 1
                if kind != "task.succeeded":
                    line = self.format.line(run, ev)
            elif kind == "task.failed":
                line = self.format.line(run, ev)
        elif kind == "task.retrying":
            line = self.format.line(run, ev)
        self.print(line)

    def close(self, progress):
        """The map's final line (its counts taken by settled), once; its
        progress line goes."""
        with self.lock:
            if progress.closed:
                return None
            progress.closed = True
        _live_changed()
        return progress.final_line()

    def finish(self, run, ev):
        """The run's last event: the final lines of maps still open, the run's
        line, and the progress lines are gone."""
        lines = []
        for progress in list(self.maps.values()):
            if not progress.closed:
                progress.settled(run)
                lines.append(self.close(progress))
        lines.append(self.format.line(run, ev))
        self.live = False
        _flush_stdout()
        _live_leave(self, "".join(line + "\n" for line in lines if line))

    def over(self):
        return self.run is not None and self.run.status in _FINISHED

    def live_lines(self, now, room, label):
        """(the progress line of each running map, the status line or None):
        ⏳ 12/40 tasks done · running: fetch (14 s), load (3 s), naming the
        tasks running longer than _SLOW, longest first."""
        running = self.running.copy()           # one step for the GIL: no lock needed
        maps = []
        for progress in list(self.maps.values()):
            if not progress.closed:
                prefix = progress.name + "["
                maps.append(progress.line(now, sum(1 for name in running
                                                   if name.startswith(prefix)), room))
        slow = sorted(((now - began, name) for name, began in running.items()
                       if now - began > _SLOW), reverse=True)
        if not slow:
            return maps, None
        prefix = "⏳ %s%d/%d tasks done · running: " % (
            _printable(self.run.flow_name) + ": " if label else "", self.ended,
            len(self.run._plan.names))
        return maps, _status_line(prefix, [(name, _span(took)) for took, name in slow], room)


def _status_line(prefix, running, room):
    """``prefix`` and "fetch (14 s), load (3 s)" for ``running`` (pairs of
    name and time), in at most ``room`` cells: a long name is shortened, and
    the tasks that do not fit are counted ("+3 more")."""
    text = prefix
    for k, (name, took) in enumerate(running):
        name, rest = _printable(name), len(running) - k - 1
        more = ", +%d more" % rest if rest else ""
        item = "%s%s (%s)" % (", " if k else "", name, took)
        if _cells(text + item + more) <= room:
            text += item
            continue
        left = room - _cells(text + " (%s)" % took + more)
        if k == 0 and left >= 8:
            text += "%s (%s)" % (_shorten(name, left), took)
            continue
        text += "%s+%d more" % (", " if k else "", rest + 1)
        break
    return _cut(text, room)


class _LiveLines:
    """The lines at the bottom of a terminal while runs show progress: each
    running map's line, then each run's status line (see _ProgressTrace).

    One exists at a time, the module's _live, guarded by _write_lock. All
    else pyoco writes to the terminal (trace lines, task output through the
    tees, warnings) goes through write(): the lines are erased, the text is
    written and the lines are drawn again below it, so nothing ever shares a
    row with them. Their text is rendered again by a timer thread at most
    ten times a second (redraw), never per event: events only count.
    """

    def __init__(self, stream):
        import threading
        self.stream = stream
        out = getattr(sys.stdout, "_pyoco_original", sys.stdout)
        try:
            tty = out is not None and out is not stream and out.isatty()
        except (AttributeError, OSError, ValueError):
            tty = False
        self.neighbour = out if tty else None   # stdout, when it is a terminal too
        self.sources = []           # the _ProgressTrace of each run drawing here
        self.lines = []             # the lines on the screen now, top to bottom
        self.stale = False          # a source or a map came or went: render before drawing
        self.stop = threading.Event()

    def covers(self, stream):
        return stream is self.stream or stream is self.neighbour

    def width(self):
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, OSError, ValueError):
            try:
                return int(os.environ.get("COLUMNS", "")) or 80
            except ValueError:
                return 80

    def render(self):
        self.stale = False
        room, now = self.width() - 1, time.time()   # the last column free: no wrap, ever
        maps, status = [], []
        for source in self.sources:
            lines, line = source.live_lines(now, room, len(self.sources) > 1)
            maps += lines
            if line is not None:
                status.append(line)
        return maps + status

    def erase(self):
        """From the end of the last live line: erase them all, up to the first's column 0."""
        n, self.lines = len(self.lines), []
        return "\r\x1b[K" + "\x1b[A\x1b[K" * (n - 1) if n else ""

    def draw(self, lines):
        self.lines = lines
        return "\n".join(lines)

    def write(self, stream, text):
        """Write whole lines above the live lines (the caller holds _write_lock)."""
        lines = self.render() if self.stale else self.lines
        erase = self.erase()
        if stream is self.stream:
            _write_now(stream, erase + text + self.draw(lines))
            return
        if erase:
            _write_now(self.stream, erase)
        _write_now(stream, text)
        if lines:
            _write_now(self.stream, self.draw(lines))

    def redraw(self):
        """The timer's turn (the caller holds _write_lock)."""
        for source in [s for s in self.sources if s.over()]:
            self.sources.remove(source)     # its end never came (a dropped observer)
        lines = self.render()
        if lines != self.lines:
            _write_now(self.stream, self.erase() + self.draw(lines))


def _live_join(source, stream):
    """Draw ``source``'s lines on ``stream`` from now on; False when live
    lines are drawn on another stream already (then it prints lines only)."""
    global _live
    with _write_lock:
        if _live is None:
            import threading
            _live = _LiveLines(stream)
            threading.Thread(target=_redraw_live, args=(_live,), name="pyoco-progress",
                             daemon=True).start()
        elif _live.stream is not stream:
            return False
        _live.sources.append(source)
        _live.stale = True
    return True


def _live_changed():
    """A map's line came or went: render before the next line is written."""
    live = _live
    if live is not None:
        live.stale = True


def _live_leave(source, text):
    """``source``'s run ended: its lines go and ``text`` is written in their place."""
    global _live
    if _tees:
        _end_printed_lines()
    with _write_lock:
        if _held_lines:
            _write_held()
        live = _live
        if live is not None and source in live.sources:
            live.sources.remove(source)
            live.stale = True
        if live is not None and live.covers(source.stream):
            live.write(source.stream, text)
        else:
            _write_now(source.stream, text)
        if live is not None and not live.sources:
            _live = None
            live.stop.set()


def _redraw_live(live):
    """The live lines' timer: render and draw at most ten times a second, until they end."""
    global _live
    while not live.stop.wait(0.1):
        with _write_lock:
            if _live is not live:
                return
            live.redraw()
            if not live.sources:
                if live.lines:
                    _write_now(live.stream, live.erase())
                _live = None
                return


def _logging_observer():
    """An observer feeding the ``pyoco`` logger, if the application set logging up."""
    logging = sys.modules.get("logging")
    if logging is None:
        return None         # nobody imported logging, so nobody listens
    logger = logging.getLogger("pyoco")
    if not logger.hasHandlers() or not logger.isEnabledFor(logging.ERROR):
        return None
    levels = {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
    lines = _TraceFormat(cute=False)

    def observe(run, ev):
        level = levels[EVENT_KINDS.get(ev[1], ("INFO",))[0]]
        line = lines.line(run, ev)
        if line is not None and logger.isEnabledFor(level):
            logger.log(level, line.split(" ", 2)[2],
                       extra={"pyoco_run_id": run.run_id, "pyoco_event": ev[1]})
    return observe


class TraceBackend:
    """The original pyoco's trace interface: ``Engine(trace_backend=obj)`` calls
    these methods instead of printing pyoco's own trace. Each is a no-op here,
    so a subclass implements only what it wants. They run on the engine's
    threads, like observers: keep them quick, and let them only read."""

    def on_flow_start(self, flow_name, run_id=None):
        pass

    def on_flow_end(self, flow_name):
        pass

    def on_node_start(self, node_name):
        pass

    def on_node_end(self, node_name, duration_ms):
        pass

    def on_node_error(self, node_name, error):
        pass

    def on_node_transition(self, source, target):
        pass


class ConsoleTraceBackend(TraceBackend):
    """The original's console backend: ``style`` "cute" (the default unless
    PYOCO_CUTE=0) prints pyoco's cute lines, "plain" the original's plain ones
    (``INFO pyoco start node=A``). It prints to stdout, as the original did."""

    def __init__(self, style=None):
        if style is None:
            style = "cute" if _cute_default() else "plain"
        if style not in ("cute", "plain"):
            raise ValueError("style must be 'cute' or 'plain', not %r%s"
                             % (style, _closest(style, ("cute", "plain"))))
        self.style = style

    def _say(self, cute, plain):
        print(cute if self.style == "cute" else plain)

    def on_flow_start(self, flow_name, run_id=None):
        rid = " run_id=%s" % run_id if run_id else ""
        self._say("🐇 pyoco > start flow=%s%s" % (flow_name, rid),
                  "INFO pyoco start flow=%s%s" % (flow_name, rid))

    def on_flow_end(self, flow_name):
        self._say("🥕 done flow=%s" % flow_name, "INFO pyoco end flow=%s" % flow_name)

    def on_node_start(self, node_name):
        self._say("🏃 start node=%s" % node_name, "INFO pyoco start node=%s" % node_name)

    def on_node_end(self, node_name, duration_ms):
        self._say("✅ done node=%s (%.2f ms)" % (node_name, duration_ms),
                  "INFO pyoco end node=%s dur_ms=%.2f" % (node_name, duration_ms))

    def on_node_error(self, node_name, error):
        self._say("💥 error node=%s %s" % (node_name, error),
                  "ERROR pyoco error node=%s %s" % (node_name, error))

    def on_node_transition(self, source, target):
        self._say("🐇 %s -> %s" % (source, target), "INFO pyoco %s -> %s" % (source, target))


def _backend_observer(backend):
    """An observer that tells a TraceBackend what happens, in its terms: the
    run's start and end, and each task's start, success and failure."""
    started = {}            # task name -> when its task.started event came

    def observe(run, ev):
        ts, kind, name, state, data = ev
        if kind == "run.started":
            backend.on_flow_start(run.flow_name, run_id=run.run_id)
        elif kind in _RUN_ENDS:
            backend.on_flow_end(run.flow_name)
        elif kind == "task.started":
            started[name] = ts
            backend.on_node_start(name)
        elif kind == "task.succeeded":
            backend.on_node_end(name, (ts - started.pop(name, ts)) * 1000)
        elif kind == "task.failed":
            started.pop(name, None)
            error = run.tasks[name].exception
            backend.on_node_error(name, error if error is not None
                                  else (data or {}).get("error"))
    return observe


# ---------------------------------------------------------------------------
# Observers: the run store
# ---------------------------------------------------------------------------

#
# A plain folder, safe for several processes at once:
#
#   <store>/runs/<run_id>/run.json        the run record (replaced atomically)
#                        /process.json    pid and host; its mtime is the heartbeat
#                        /logs/<task>.jsonl   printed lines and ctx.log lines
#                        /artifacts/...   what ctx.save_artifact stored
#                        /outputs.jsonl   task outputs, for --resume and the cache
#                        /cache.jsonl     fingerprints of its cache=True tasks that succeeded
#                        /cancel          written by `pyoco runs cancel`
#
# The engine never waits on the disk per task: the recorder marks the record
# dirty on each event, and a keeper thread writes it (and the heartbeat) about
# once a second, then once more when the run ends.

class StoreError(PyocoError):
    """A run store problem: an unknown run id, a run that cannot be resumed."""


_HEARTBEAT_S = 1.0      # how often a running process refreshes its heartbeat and record
_DEAD_AFTER_S = 30.0    # a heartbeat older than this means the process is gone


_FILE_NAME_BYTES = 200      # room for ".jsonl" and a temporary suffix within 255 bytes


def _safe_file_name(name):
    """A task name as a file name: unusual characters %-escaped, nothing can
    escape, and at most _FILE_NAME_BYTES bytes. A longer one is cut and ends
    in ``~`` and a hash of the whole name (``~`` is escaped anywhere else), so
    two long names never share a file."""
    out = []
    for c in name:
        if c.isalnum() or c in "-_[]":
            out.append(c)
        else:
            out.append("".join("%%%02X" % b for b in c.encode("utf-8")))
    text = "".join(out) or "%00"
    if len(text.encode("utf-8")) <= _FILE_NAME_BYTES:
        return text
    import hashlib
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    kept, size = [], 0
    for piece in out:               # whole characters and escapes only
        size += len(piece.encode("utf-8"))
        if size > _FILE_NAME_BYTES - 17:
            break
        kept.append(piece)
    return "".join(kept) + "~" + digest


def _valid_run_id(run_id):
    return (isinstance(run_id, str) and 0 < len(run_id) <= 100 and run_id[0] != "."
            and run_id.isascii()
            and run_id.replace("-", "a").replace("_", "a").replace(".", "a").isalnum())


def _hostname():
    try:
        return os.uname().nodename
    except AttributeError:
        import platform
        return platform.node()


def _pid_alive(pid):
    if os.name == "nt":                 # os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:                                # a killed child not yet reaped is a zombie
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunStore:
    """A folder of run records, logs, artifacts and outputs (see the layout above).

    Several processes may record into one store at once. Reading never
    trusts a RUNNING record blindly: a run whose process died is reported
    FAILED with a reason.
    """

    def __init__(self, root):
        self.root = os.path.abspath(os.fspath(root))
        self.runs_dir = os.path.join(self.root, "runs")
        self.skipped = {}           # path -> (mtime_ns, size) of a record file warned about

    def __repr__(self):
        return "RunStore(%r)" % self.root

    def folder(self, run_id):
        """The folder of a run; raises StoreError for an id that is not one."""
        if not _valid_run_id(run_id):
            raise StoreError("%r is not a run id (ids look like 20261129-051011-1a2b3c4d)"
                             % (run_id,))
        return os.path.join(self.runs_dir, run_id)

    # -- writing

    def new_run_folder(self, run_id):
        """Create a folder for a new run: returns (run id, folder), the id
        replaced by a fresh one when it is taken, or (run id, None) with a
        warning when the store cannot be written."""
        try:
            os.makedirs(self.runs_dir, exist_ok=True)
            for _ in range(5):
                try:
                    os.mkdir(self.folder(run_id))
                    return run_id, self.folder(run_id)
                except FileExistsError:
                    run_id = _new_run_id()
            raise OSError("could not find a free run id")
        except (OSError, StoreError) as exc:
            _warn("cannot record run %s in %s (%s); the run goes on unrecorded"
                  % (run_id, self.root, exc))
            return run_id, None

    def prune(self, keep=None):
        """Delete the oldest finished runs beyond ``keep`` (default
        PYOCO_MAX_RUN_HISTORY; unset or 0 keeps everything)."""
        if keep is None:
            try:
                keep = int(os.environ.get("PYOCO_MAX_RUN_HISTORY") or 0)
            except ValueError:
                _warn("PYOCO_MAX_RUN_HISTORY must be a whole number, not %r"
                      % os.environ["PYOCO_MAX_RUN_HISTORY"])
                return
        if keep <= 0:
            return
        import shutil

        def last_saved(run_id):         # a finished run's record was last saved as it ended
            try:
                return os.stat(os.path.join(self.runs_dir, run_id, "run.json")).st_mtime_ns
            except OSError:
                return 0
        ids = sorted(self.ids(), key=lambda run_id: (last_saved(run_id), run_id))
        for run_id in ids[:-keep] if len(ids) > keep else []:
            record = self.get(run_id, events=False)

            if record is None or record["status"] in (RunState.RUNNING, RunState.CANCELLING,
                                                      RunState.PENDING):
                continue
            shutil.rmtree(self.folder(run_id), ignore_errors=True)

    # -- reading

    def ids(self):
        """Run ids in the store, oldest first."""
        try:
            names = os.listdir(self.runs_dir)
        except OSError:
            return []
        return sorted(n for n in names if _valid_run_id(n)
                      and os.path.exists(os.path.join(self.runs_dir, n, "run.json")))

    def get(self, run_id, events=True):
        """The run record (a dict), or None when there is no such run. A
        run.json that is not a pyoco record is skipped with a warning, so
        every reader (runs, /runs, /metrics) can trust the record's shape."""
        import json
        folder = self.folder(run_id)
        path = os.path.join(folder, "run.json")
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            return None
        except OSError as exc:
            _warn("%s: unreadable run record (%s); skipped" % (path, exc))
            return None
        except ValueError as exc:
            self._skip(path, "is not JSON (%s)" % exc)
            return None
        problem = _record_problem(record)
        if problem is not None:
            self._skip(path, "is not a pyoco run record (%s)" % problem)
            return None
        if record.get("status") in (RunState.RUNNING, RunState.CANCELLING, RunState.PENDING):
            _settle_if_dead(record, folder)
        for key in ("scheduled_for", "executor"):    # records saved before these keys
            record.setdefault(key, None)
        for task in record["tasks"].values():
            task.setdefault("reused_from", None)
        if not events:
            record.pop("events", None)
        return record

    def _skip(self, path, why):
        """Warn that a record file is skipped: once for each version of it, so
        a server that reads it on every request says it once."""
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if self.skipped.get(path, False) != stamp:
            self.skipped[path] = stamp
            _warn("%s %s; skipped" % (path, why))

    def list(self, status=None, flow=None, limit=None):
        """Records without events, newest first, optionally filtered."""
        out = []
        for run_id in reversed(self.ids()):
            record = self.get(run_id, events=False)
            if record is None:
                continue
            if status is not None and record.get("status") != status:
                continue
            if flow is not None and record.get("flow") != flow:
                continue
            out.append(record)
        out.sort(key=lambda r: (r.get("started_at") or "", r.get("run_id")), reverse=True)
        return out[:limit] if limit else out

    def logs(self, run_id, task=None, tail=100):
        """The last ``tail`` log lines of a run (or of one task), oldest first."""
        import json
        folder = os.path.join(self.folder(run_id), "logs")
        try:
            files = sorted(os.listdir(folder))
        except OSError:
            files = []
        if task is not None:
            wanted = _safe_file_name(task) + ".jsonl"
            files = [f for f in files if f == wanted]
        lines = []
        for name in files:
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    for raw in f:
                        try:
                            line = json.loads(raw)
                        except ValueError:
                            continue        # a line cut by a crash or by the size cap
                        if isinstance(line, dict):
                            lines.append(line)
            except OSError:
                continue
        lines.sort(key=lambda line: line.get("ts") or "")
        return lines[-tail:] if tail else lines

    def request_cancel(self, run_id):
        """Ask the process running ``run_id`` to cancel it; returns the record as
        it was. Raises StoreError for an unknown run."""
        record = self.get(run_id, events=False)
        if record is None:
            raise StoreError("no run %r in %s" % (run_id, self.root))
        if record["status"] in (RunState.RUNNING, RunState.CANCELLING):
            _atomic_write(os.path.join(self.folder(run_id), "cancel"),
                          _dumps({"requested_at": _iso(time.time()),
                                  "pid": os.getpid()}).encode())
        return record

    def load_outputs(self, run_id):
        """Task name -> output saved by a run (only what could be saved)."""
        import json
        outputs = {}
        try:
            with open(os.path.join(self.folder(run_id), "outputs.jsonl"), "rb") as f:
                for raw in f:
                    try:
                        entry = json.loads(raw)
                        if "pickle" in entry:
                            import base64
                            import pickle
                            outputs[entry["task"]] = pickle.loads(base64.b64decode(entry["pickle"]))
                        else:
                            outputs[entry["task"]] = entry["json"]
                    except Exception:
                        continue    # a cut line, or an output that no longer unpickles
        except OSError:
            pass
        return outputs

    def resumable(self, run_id, any_status=False):
        """The record of a run that can be resumed (``any_status``: or taken
        outputs from, for --from); StoreError says why not."""
        record = self.get(run_id, events=False)
        if record is None:
            raise StoreError("cannot resume: no run %r in %s (see: pyoco runs list)"
                             % (run_id, self.root))
        if not any_status and record["status"] not in (RunState.FAILED, RunState.CANCELLED):
            raise StoreError("cannot resume run %s: it is %s; only FAILED or CANCELLED runs"
                             " can be resumed" % (run_id, record["status"]))
        return record

    def reusable_outputs(self, record, plan, forced=()):
        """For resuming the run of ``record`` (see resumable): task name ->
        (output, artifacts, origin run) of the tasks that succeeded there and
        need not run again (see _reusable)."""
        run_id = record["run_id"]
        if record.get("flow") != plan.flow_name:
            raise StoreError("cannot resume run %s: it ran flow %r, not %r"
                             % (run_id, record.get("flow"), plan.flow_name))
        outputs = self.load_outputs(run_id)
        tasks = record.get("tasks") or {}
        found = {name: (outputs[name], task.get("artifacts") or {},
                        task.get("reused_from") or run_id)
                 for name, task in tasks.items() if isinstance(task, dict)
                 and task.get("state") == TaskState.SUCCEEDED and name in outputs}
        return _reusable(plan, found, forced)

    def newest_outputs(self, plan, forced=()):
        """For ``--from`` without ``--resume``: like reusable_outputs, each task's
        output taken from the newest run of the flow in which it SUCCEEDED."""
        found, wanted = {}, set(plan.names)
        for record in self.list(flow=plan.flow_name):
            tasks = record.get("tasks") or {}
            names = [name for name in wanted if isinstance(tasks.get(name), dict)
                     and tasks[name].get("state") == TaskState.SUCCEEDED]
            if not names:
                continue
            outputs = self.load_outputs(record["run_id"])
            for name in names:
                if name in outputs:
                    found[name] = (outputs[name], tasks[name].get("artifacts") or {},
                                   tasks[name].get("reused_from") or record["run_id"])
                    wanted.discard(name)
            if not wanted:
                break
        return _reusable(plan, found, forced)


def _reusable(plan, found, forced):
    """Of ``found`` (task name -> (output, artifacts, origin)), what a run may
    take over: every task found that may be cached (cache is not False), is
    not in ``forced`` and has nothing upstream that runs; and, for a map node
    that runs again with the same upstream outputs, its instances found."""
    rerun = set(forced)
    for i, name in enumerate(plan.names):
        if not (name in found and plan.cache_level[i]):
            rerun.add(i)
    first_rerun = set(rerun)
    stack = list(rerun)
    while stack:
        i = stack.pop()
        for s in plan.free[i] + plan.joins[i]:
            if s not in rerun:
                rerun.add(s)
                stack.append(s)
    reused = {name: found[name] for i, name in enumerate(plan.names) if i not in rerun}
    for m in plan.maps:
        if m in first_rerun and m not in forced and plan.cache_level[m] \
                and not any(p in rerun for p in plan.preds[m]):
            prefix = plan.names[m] + "["
            for name in found:
                if name.startswith(prefix) and name.endswith("]"):
                    reused[name] = found[name]
    return reused


class _CacheIndex:
    """The cache=True entries of a flow's earlier runs in a store (cache.jsonl):
    read once, on the first lookup of a run; an output is loaded only when it
    is reused. An entry whose file or output cannot be read is no entry."""

    @staticmethod
    def clock():
        """Now, for cache_ttl (looked up at each call, so a test may replace it)."""
        return time.time()

    def __init__(self, store, flow_name, run_id=None):
        self.store, self.flow_name, self.run_id = store, flow_name, run_id
        self.entries = None         # task name -> its entries, newest run first
        self.outputs = {}           # run id -> that run's outputs, once one is reused
        self.lock = _allocate_lock()    # tasks are decided on several worker threads

    def build(self):
        import json
        self.entries = {}
        for run_id in reversed(self.store.ids()):
            if run_id == self.run_id:
                continue
            try:
                with open(os.path.join(self.store.runs_dir, run_id, "cache.jsonl"), "rb") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for raw in lines:
                try:
                    entry = json.loads(raw)
                    if entry.get("flow") != self.flow_name:
                        continue
                    if not (isinstance(entry["task"], str) and isinstance(entry["code"], str)
                            and isinstance(entry["inputs"], dict)
                            and isinstance(entry["origin"], str)
                            and isinstance(entry["at"], (int, float))
                            and isinstance(entry["artifacts"], dict)):
                        continue
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue        # a cut line or a foreign one: as if it were not there
                entry["run"] = run_id
                self.entries.setdefault(entry["task"], []).append(entry)

    def entries_of(self, name, ttl):
        if self.entries is None:
            self.build()
        entries = self.entries.get(name, [])
        if ttl is not None:
            now = self.clock()
            entries = [e for e in entries if now - e["at"] <= ttl]
        return entries

    def output(self, entry):
        outputs = self.outputs.get(entry["run"])
        if outputs is None:
            outputs = self.outputs[entry["run"]] = self.store.load_outputs(entry["run"])
        return outputs.get(entry["task"], _MISSING)

    def decide(self, name, code, hashes, ttl):
        """(action, reason, entry, output): the one explanation of a cache=True
        task's state, for a run (admit) and for engine.plan alike."""
        with self.lock:
            return self._decide(name, code, hashes, ttl)

    def _decide(self, name, code, hashes, ttl):
        while True:
            action, reason, entry = _cache_verdict(self.entries_of(name, ttl), code, hashes)
            if action != "reuse":
                return action, reason, None, None
            out = self.output(entry)
            if out is not _MISSING:
                return action, reason, entry, out
            self.entries[name].remove(entry)    # its output is gone: judge without it


def _add_record_events(folder, events):
    """Append events (dicts) to a finished run's record in ``folder``: what
    happened after the run ended, such as webhook deliveries."""
    import json
    path = os.path.join(folder, "run.json")
    with _record_lock:
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read())
            record["events"].extend(events)
            _atomic_write(path, _dumps(record).encode("utf-8"))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            _warn("could not add %s to the record in %s (%s)"
                  % (", ".join(e["event"] for e in events), folder, exc))


_RUN_STATES = (RunState.PENDING, RunState.RUNNING, RunState.COMPLETED, RunState.FAILED,
               RunState.CANCELLING, RunState.CANCELLED)


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


_RECORD_TYPES = {"started_at": str, "ended_at": str, "duration_ms": (int, float),
                 "events": list, "scheduled_for": str, "executor": str}


_TASK_TYPES = {"state": str, "attempts": int, "started_at": str, "ended_at": str,
               "duration_ms": (int, float), "error": str, "traceback": str, "reason": str,
               "reused_from": str}


def _record_problem(record):
    """What makes decoded run.json data not a pyoco run record, or None. It
    checks the type of every field that readers index or compute with; null
    or missing is fine where a record may have no value."""
    def kind(value):
        return _JSON_KINDS.get(type(value), "something else")

    def wrong(value, kinds):
        return value is not None and (isinstance(value, bool) or not isinstance(value, kinds))

    if not isinstance(record, dict):
        return "it holds %s, not an object" % kind(record)
    for key, kinds in (("run_id", str), ("flow", str), ("status", str), ("tasks", dict)):
        if key not in record:
            return "no %r" % key
        if not isinstance(record[key], kinds):
            return "%r is %s" % (key, kind(record[key]))
    if record["status"] not in _RUN_STATES:
        return "unknown status %r" % record["status"]
    for key, kinds in _RECORD_TYPES.items():
        if wrong(record.get(key), kinds):
            return "%r is %s" % (key, kind(record[key]))
    for name, t in record["tasks"].items():
        if not isinstance(t, dict):
            return "task %r is %s, not an object" % (name, kind(t))
        for key, kinds in _TASK_TYPES.items():
            if wrong(t.get(key), kinds):
                return "task %r: %r is %s" % (name, key, kind(t[key]))
    if not all(isinstance(e, dict) for e in record.get("events") or ()):
        return "an event is not an object"
    return None


def _settle_if_dead(record, folder):
    """Mark a RUNNING record FAILED in place when its process is gone."""
    import json
    reason = None
    path = os.path.join(folder, "process.json")
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read())
        age = time.time() - os.stat(path).st_mtime
    except (OSError, ValueError):
        info, age = {}, None
    if not isinstance(info, dict):
        info = {}
    pid, host = info.get("pid"), info.get("host")
    if isinstance(pid, int) and host == _hostname() and not _pid_alive(pid):
        reason = "process %d on %s died before the run finished" % (pid, host)
    elif age is not None and age > _DEAD_AFTER_S:
        reason = "no heartbeat from process %s on %s for %.0f s" % (pid, host, age)
    elif age is None and record.get("started_at") is None:
        return
    if reason is None:
        return
    record["status"] = RunState.FAILED
    record["reason"] = reason
    if record.get("ended_at") is None and age is not None:
        last_sign = time.time() - age           # the last heartbeat: as near an end as we know
        record["ended_at"] = _iso(last_sign)
        started = _parse_iso(record.get("started_at"))
        if started is not None:
            record["duration_ms"] = round(max(0.0, last_sign - started) * 1000, 3)

    for task in (record.get("tasks") or {}).values():
        if task.get("state") == TaskState.RUNNING:
            task["state"] = TaskState.FAILED
            task["error"] = task.get("error") or "process died"
            task["reason"] = reason
        elif task.get("state") == TaskState.PENDING:
            task["state"] = TaskState.CANCELLED
            task["reason"] = reason


_NULL_TASK_TAIL = (', "error": null, "traceback": null, "reason": null, "artifacts": {},'
                   ' "reused_from": null}')


_PENDING_TASK = (': {"state": "PENDING", "attempts": 0, "started_at": null, "ended_at": null,'
                 ' "duration_ms": null' + _NULL_TASK_TAIL)


def _record_json(run):
    """The run record as JSON text, equal to ``_dumps(run.to_dict())`` but
    written with string templates: the record of a 10,000-task run is saved
    in a few milliseconds instead of a hundred."""
    import json
    plan = run._plan
    qnames = plan.json_names
    if qnames is None or len(qnames) < len(plan.names):     # map instances add names
        qnames = plan.json_names = [json.dumps(name, ensure_ascii=False) for name in plan.names]

    iso = _iso
    prefixes = {}           # whole second -> '"2026-11-29T05:10:11'
    done = {}               # time -> its quoted text: events reuse the tasks' times

    def quoted_iso(ts):
        text = done.get(ts)
        if text is None:
            whole = int(ts)
            prefix = prefixes.get(whole)
            if prefix is None:
                prefix = prefixes[whole] = '"' + time.strftime("%Y-%m-%dT%H:%M:%S",
                                                               time.gmtime(whole))
            text = done[ts] = '%s.%03dZ"' % (prefix, (ts - whole) * 1000)
        return text


    head = _dumps({
        "run_id": run.run_id, "flow": run.flow_name, "status": run.status,
        "params": run.params, "started_at": iso(run.started_at),
        "ended_at": iso(run.ended_at), "duration_ms": run.duration_ms,
        "reason": run.reason, "resumed_from": run.resumed_from,
        "scheduled_for": iso(run.scheduled_for), "executor": run.executor})
    parts = [head[:-1], ', "tasks": {']
    states, attempts, started, ended = run._state, run._attempts, run._started, run._ended
    special = set(run._errors) | set(run._task_artifacts)
    reasons, reused_from = run._reasons, run._reused_from
    quoted = {None: "null"}     # reasons and run ids: many reused tasks share one
    tasks = []
    pending = TaskState.PENDING
    for i, qname in enumerate(qnames):
        if i in special:
            tasks.append("%s: %s" % (qname, _dumps(TaskRecord(run, i).to_dict())))
            continue
        state = states[i]
        if state is pending and i not in reasons:
            tasks.append(qname + _PENDING_TASK)
            continue
        tail = _NULL_TASK_TAIL
        if reasons or reused_from:
            reason, origin = reasons.get(i), reused_from.get(i)
            if reason is not None or origin is not None:
                for text in (reason, origin):
                    if text not in quoted:
                        quoted[text] = _dumps(text)
                tail = (', "error": null, "traceback": null, "reason": %s, "artifacts": {},'
                        ' "reused_from": %s}' % (quoted[reason], quoted[origin]))
        s, e = started[i], ended[i]
        tasks.append('%s: {"state": "%s", "attempts": %d, "started_at": %s, "ended_at": %s,'
                     ' "duration_ms": %s%s' % (
                         qname, state, attempts[i],
                         'null' if s is None else quoted_iso(s),
                         'null' if e is None else quoted_iso(e),
                         'null' if s is None or e is None else repr(round((e - s) * 1000, 3)),
                         tail))
    parts.append(", ".join(tasks))
    parts.append('}, "events": [')
    events = []
    quoted_name = dict(zip(plan.names, qnames))
    quoted_name[None] = "null"
    for ts, event, name, state, data in list(run._events):
        text = '{"ts": %s, "event": "%s", "task": %s, "state": "%s"' % (
            quoted_iso(ts), event, quoted_name[name], state)
        if data:
            text += ", " + _dumps(data)[1:-1]
        events.append(text + "}")
    parts.append(", ".join(events))
    parts.append("]}")
    return "".join(parts)


def _output_line(name, value):
    """Task ``name``'s output as one outputs.jsonl line: JSON when it round-trips
    exactly, else pickle; None when neither works. The JSON text is written
    as it was checked, not encoded a second time."""
    import json
    task = json.dumps(name)
    try:
        text = json.dumps(value, allow_nan=False)     # \u escapes: any str can be written
        back = json.loads(text)
        if back == value and type(back) is type(value):
            return '{"json": %s, "task": %s}' % (text, task)
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        import base64
        import pickle
        data = base64.b64encode(pickle.dumps(value, protocol=4)).decode("ascii")
    except Exception:
        return None
    return '{"pickle": "%s", "task": %s}' % (data, task)


def _shorten_log_line(raw, limit):
    """One stored log line cut to at most ``limit`` bytes, keeping the end of its text."""
    import json
    try:
        entry = json.loads(raw)
        text = entry["text"]
    except (ValueError, KeyError, TypeError):
        return b""
    keep = len(text)
    while True:
        entry["text"] = "…" + text[len(text) - keep:] if keep < len(text) else text
        line = (_dumps(entry) + "\n").encode("utf-8")
        if len(line) <= limit or keep == 0:
            return line if len(line) <= limit else b""
        keep = max(0, keep - max(1, len(line) - limit))


class _RunRecorder:

    """Writes one run into the store: an observer of the engine's events."""

    def __init__(self, store, run, folder):
        import threading
        self.store, self.run, self.folder = store, run, folder
        self.logs_dir = os.path.join(folder, "logs")
        self.artifacts_dir = os.path.join(folder, "artifacts")
        self.cancel_file = os.path.join(folder, "cancel")     # written by `pyoco runs cancel`
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.dirty = True
        self.failing = False            # a write failed since the last heartbeat: wait for it
        self.warned = False             # the store's trouble was reported (once per run)
        self.error = None               # the last write's failure
        self.process_saved = False      # process.json written (the heartbeat touches it)
        self.graph_saved = False
        self.succeeded = []             # task names in the order they succeeded
        self.saved_outputs = 0          # how many of those are in outputs.jsonl
        self.log_files = {}             # task name -> [fd, bytes written]
        self.partial = {}               # (thread, task, stream) -> text without its newline
        try:
            self.max_log = int(os.environ.get("PYOCO_MAX_LOG_BYTES") or 0)
            if self.max_log < 0:
                raise ValueError("negative")
        except ValueError:
            _warn("PYOCO_MAX_LOG_BYTES must be a whole number of bytes, not %r; task logs"
                  " are kept whole" % os.environ["PYOCO_MAX_LOG_BYTES"])
            self.max_log = 0
        self.keeper = None
        self.closed = False             # the final record is written: late lines are dropped
        self.final_saved = False
        self.artifacts_seen = 0         # run.artifact_changes when the record was last saved

    def start(self):
        import threading
        self.save_process()
        self.save_graph()
        _tee_install()

        self.keeper = threading.Thread(target=self.keep, name="pyoco-store", daemon=True)
        self.keeper.start()

    def guarded(self, fn, *args):
        """Run a write and return its result (True for None), or None when it
        fails. After a failure (warned once) writes wait for the keeper's
        next heartbeat, which tries again: a full disk costs one attempt a beat."""
        if self.failing:
            return None
        try:
            result = fn(*args)
        except OSError as exc:
            self.failing, self.error = True, exc
            if not self.warned:
                self.warned = True
                _warn("cannot write to run store %s (%s); run %s goes on, and its record is"
                      " tried again every %g s" % (self.store.root, exc, self.run.run_id,
                                                   _HEARTBEAT_S))
            return None
        return True if result is None else result

    def observe(self, run, ev):
        self.dirty = True
        kind, name = ev[1], ev[2]
        if name is None:
            if kind == "run.started":
                self.save()     # a run killed in its first second still shows when it began
            elif kind in _RUN_ENDS:
                self.finish()
            return
        if kind == "task.succeeded":
            self.succeeded.append(name)
        elif kind not in _TASK_ENDS:
            return
        if name in self.log_files:
            self.end_log(name)

    # -- printed lines

    def feed(self, name, stream, text):
        key = (_get_ident(), name, stream)
        text = self.partial.pop(key, "") + text
        *lines, rest = text.split("\n")
        if rest:
            self.partial[key] = rest
        for line in lines:
            self.log_line(name, stream, line)

    def log_line(self, name, stream, text, ts=None):
        if self.closed or self.failing:     # closed: e.g. a thread abandoned at its timeout
            return                          # failing: lines wait for no one, they are dropped
        entry = (_dumps({"ts": _iso(ts or time.time()), "task": name,
                         "stream": stream, "text": text}) + "\n").encode("utf-8")
        with self.lock:
            slot = self.log_files.get(name)
            if slot is None:
                fd = self.guarded(self.open_log, name)
                if fd is None:
                    return
                slot = self.log_files[name] = [fd, 0]
            if self.guarded(os.write, slot[0], entry) is None:
                return
            slot[1] += len(entry)
            if self.max_log and slot[1] > 2 * self.max_log:
                self.cap_log(name, slot)

    def open_log(self, name):
        os.makedirs(self.logs_dir, exist_ok=True)
        return os.open(self.log_path(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log_path(self, name):
        return os.path.join(self.logs_dir, _safe_file_name(name) + ".jsonl")

    def cap_log(self, name, slot):
        """Keep only the last max_log bytes (whole lines) of a task's log."""
        path = self.log_path(name)
        os.close(slot[0])
        with open(path, "rb") as f:
            data = f.read()             # at most about twice the cap, see log_line
        keep = data[-self.max_log:]
        if len(data) > self.max_log:
            keep = keep[keep.find(b"\n") + 1:]
        if not keep and data:           # the last line alone is over the cap: keep its end
            keep = _shorten_log_line(data.rstrip(b"\n").rsplit(b"\n", 1)[-1], self.max_log)
        self.guarded(_atomic_write, path, keep)
        slot[0] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        slot[1] = len(keep)

    def end_log(self, name):
        for key in [k for k in self.partial if k[1] == name]:
            self.log_line(name, key[2], self.partial.pop(key))
        with self.lock:
            slot = self.log_files.pop(name, None)
            if slot is None:
                return
            if self.max_log and slot[1] > self.max_log:
                self.cap_log(name, slot)
            os.close(slot[0])

    # -- the record

    def save(self):
        """Write the record; True when it was written. Once the final record is
        written nothing overwrites it (webhooks add their events to that file)."""
        with self.lock:         # snapshot and write together: an older one never wins
            if self.final_saved:
                return True
            self.dirty = False
            self.artifacts_seen = self.run.artifact_changes
            data = _record_json(self.run).encode("utf-8")
            if self.guarded(_atomic_write, os.path.join(self.folder, "run.json"), data):
                self.final_saved = self.closed
                return True
            self.dirty = True   # the next heartbeat tries again
            return False

    def save_process(self):
        """process.json: who runs the run; its mtime is the heartbeat."""
        self.process_saved = bool(self.guarded(
            _atomic_write, os.path.join(self.folder, "process.json"),
            _dumps({"pid": os.getpid(), "host": _hostname(),
                    "started_at": _iso(self.run.started_at or time.time())}).encode()))

    def save_graph(self):
        """graph.json: the DAG as `pyoco graph` sees it, for the browser page."""
        plan = self.run._plan
        edges = [[plan.names[p], name] for name, preds in zip(plan.names, plan.preds)
                 for p in preds]
        self.graph_saved = bool(self.guarded(
            _atomic_write, os.path.join(self.folder, "graph.json"),
            _dumps({"nodes": plan.names, "edges": edges,
                    "rules": {name: words for name, words in zip(
                        plan.names, map(_task_rules, [plan] * len(plan.names),
                                        range(len(plan.names)))) if words}}).encode("utf-8")))

    def save_outputs(self, cached_only=False):
        """Append the outputs of tasks that succeeded since the last call (with
        ``cached_only``, of cache=True tasks only), then those tasks' cache entries."""
        new = self.succeeded[self.saved_outputs:]
        if not new or self.failing:
            return
        run = self.run
        results, index, entries = run.results, run._plan.index, run._cache_entries
        lines, cached = [], []
        for name in new:
            entry = index[name] in entries if entries else False
            if cached_only and not entry:
                continue
            line = _output_line(name, results.get(name))
            if line is not None:
                lines.append(line)
                if entry:
                    cached.append(dict(entries[index[name]], flow=run.flow_name, task=name,
                                       artifacts=run._task_artifacts.get(index[name]) or {}))
        if not lines or self.guarded(self.append, "outputs.jsonl", lines):
            self.saved_outputs += len(new)
            if cached:              # after the outputs: an entry always has its output
                for entry in cached:
                    entry.pop("run", None)
                self.guarded(self.append, "cache.jsonl", [_dumps(e) for e in cached])

    def append(self, file_name, lines):
        with open(os.path.join(self.folder, file_name), "ab") as f:
            end = f.seek(0, os.SEEK_END)
            try:
                f.write(("\n".join(lines) + "\n").encode("utf-8"))
                f.flush()
            except OSError:
                f.truncate(end)     # no cut line for the retry to append to
                raise

    def keep(self):
        """The keeper thread: the heartbeat, and the record saved while it changes;
        after a failed write, one more try each beat."""
        process_path = os.path.join(self.folder, "process.json")
        while not self.stop_event.wait(_HEARTBEAT_S):
            try:
                self.failing = False
                if self.process_saved:
                    self.guarded(os.utime, process_path, None)
                else:
                    self.save_process()
                if not self.closed and (
                        self.dirty or self.run.artifact_changes != self.artifacts_seen):
                    self.save_outputs()
                    self.save()
                elif self.closed and not self.final_saved:
                    self.save()
            except Exception as exc:        # the heartbeat must outlive any one bad write
                _warn("run %s: recording failed: %s" % (self.run.run_id, _describe(exc)))

    def finish(self):
        """The run's last event: write everything one last time."""
        for name in list(self.log_files) + [k[1] for k in list(self.partial)]:
            self.end_log(name)
        self.failing = False            # whatever failed before, the end is tried
        if self.run.status != RunState.COMPLETED:
            self.save_outputs()
        elif self.run._cache_entries:
            self.save_outputs(cached_only=True)     # cache=True outputs are kept for every run
        if self.run._plan.maps or not self.graph_saved:
            self.save_graph()           # with the map instances the run added
        with self.lock:
            self.closed = True
        self.failing = False
        self.save()

    def close(self):
        """The run is over (or abandoned): stop the keeper, and make sure the
        final record was written."""
        self.stop_event.set()
        if self.keeper is not None:
            self.keeper.join()
            _tee_remove()
        if not self.closed:             # the run never got to its last event
            self.finish()
        if not self.final_saved:
            self.failing, self.warned = False, True     # if this fails, the message says it
            if not self.save():
                _warn("cannot write the final record of run %s to run store %s (%s); the"
                      " record there is not final" % (self.run.run_id, self.store.root,
                                                       self.error))


# ---------------------------------------------------------------------------
# Observers: webhooks
# ---------------------------------------------------------------------------

_WEBHOOK_EVENTS = ("run.completed", "run.failed", "run.cancelled")


def _webhook_settings():
    """Read PYOCO_WEBHOOK_* once per run; None when no webhook is configured."""
    urls = [u.strip() for u in os.environ.get("PYOCO_WEBHOOK_URL", "").split(",") if u.strip()]
    if not urls:
        return None
    good = []
    for url in urls:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in ("http", "https") and "://" in url:
            good.append(url)
        else:
            _warn("PYOCO_WEBHOOK_URL: %r is refused; only http:// and https:// URLs are sent to"
                  % _redact(url))

    def number(key, default, kind):
        text = os.environ.get(key, "").strip()
        try:
            value = kind(text) if text else default
            if value < 0:
                raise ValueError
            return value
        except ValueError:
            _warn("%s must be a number >= 0, not %r; using %s" % (key, text, default))
            return default
    events = [e.strip() for e in os.environ.get("PYOCO_WEBHOOK_EVENTS", "").split(",")
              if e.strip()] or list(_WEBHOOK_EVENTS)
    for event in events:
        if event not in _WEBHOOK_EVENTS:
            _warn("PYOCO_WEBHOOK_EVENTS: unknown event %r (known: %s)"
                  % (event, ", ".join(_WEBHOOK_EVENTS)))
    return {"urls": good, "events": events,
            "timeout": number("PYOCO_WEBHOOK_TIMEOUT", 3.0, float) or 3.0,
            "attempts": max(1, number("PYOCO_WEBHOOK_RETRIES", 3, int)),
            "secret": os.environ.get("PYOCO_WEBHOOK_SECRET") or None,
            "format": os.environ.get("PYOCO_WEBHOOK_FORMAT", "json").strip().lower()}


def _redact(url):
    """scheme://host of a URL: webhook paths often carry secrets (Slack's do), and
    user:password@ always does."""
    import re
    scheme, sep, rest = url.partition("://")
    if not sep:                 # no telling a scheme from a user name before an @
        return "…" if "@" in url else url.split(":", 1)[0][:16] + ":…"
    return scheme + sep + re.split(r"[/?#]", rest, maxsplit=1)[0].rsplit("@", 1)[-1]


def _without_credentials(url):
    """(the URL without user:password@, the Basic Authorization header for
    them or None), percent-decoded as curl does."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit
    try:
        parts = urlsplit(url)
    except ValueError:          # the attempt reports it
        return url, None
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(("%s:%s" % (unquote(user), unquote(password))).encode("utf-8"))
    return urlunsplit(parts._replace(netloc=hostport)), "Basic " + token.decode("ascii")


def webhook_payload(run):
    """The JSON body sent when ``run`` ends (SPEC section 7)."""
    record = run.to_dict(events=False)
    return {"event": "run." + run.status.lower(), "run_id": run.run_id, "flow": run.flow_name,
            "status": run.status, "started_at": record["started_at"],
            "ended_at": record["ended_at"], "duration_ms": record["duration_ms"],
            "tasks": {name: {"state": t["state"], "duration_ms": t["duration_ms"],
                             "error": t["error"]} for name, t in record["tasks"].items()}}


def _slack_escape(text):
    """Text as Slack shows it literally: ``<!channel>`` in an error must not ping anyone."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_text(run):
    icon = {"COMPLETED": "🥕", "FAILED": "💥", "CANCELLED": "🛑"}.get(run.status, "🐇")
    text = "%s pyoco: flow *%s* %s in %s (run %s)" % (
        icon, _slack_escape(run.flow_name), run.status.lower(), _ms(run.duration or 0),
        _slack_escape(run.run_id))
    if run.status == RunState.FAILED:
        text += "\n%s" % _slack_escape(run.failure())
    return text


def _webhook_observer(folder):
    """The observer that posts a run's outcome when it ends, or None when no
    webhook is configured. Outcomes go into the record in ``folder``."""
    if not os.environ.get("PYOCO_WEBHOOK_URL", "").strip():
        return None

    def observe(run, ev):
        if ev[2] is None and ev[1] in _RUN_ENDS:
            _send_webhooks(run, folder)
    return observe


class _Delivery:
    """One webhook being delivered; its outcome is reported once, by the
    delivering thread or, when the budget ran out first, by drain_webhooks."""

    def __init__(self, url, folder, state, budget):
        self.url, self.folder, self.state = url, folder, state
        self.deadline = time.monotonic() + budget
        self.budget = budget
        self.thread = None
        self.lock = _allocate_lock()
        self.reported = False

    def report(self, outcome):
        with self.lock:
            if self.reported:
                return
            self.reported = True
        if outcome.get("error"):
            outcome["error"] = _scrub(outcome["error"], self.url)
            tries = outcome["attempts"]
            _warn("webhook to %s failed%s: %s" % (
                outcome["url"], "" if tries is None else " after %d attempt%s"
                % (tries, "" if tries == 1 else "s"), outcome["error"]))
        event = {"ts": _iso(time.time()), "event": "webhook." + outcome.pop("outcome"),
                 "task": None, "state": self.state}
        event.update(outcome)
        if self.folder is not None:
            _add_record_events(self.folder, [event])

    def cut_off(self):
        self.report({"outcome": "failed", "url": _redact(self.url), "attempts": None,
                     "status_code": None,
                     "error": "cut off: no complete answer within the %.1f s budget"
                              % self.budget})


def _send_webhooks(run, folder=None):
    """Post the run's outcome to every configured URL on a background thread.

    The run never waits on the network; the process waits at exit at most
    for the retries' budget (attempts x timeout + backoff), see
    ``drain_webhooks``. Outcomes become events of the run's record.
    """
    settings = _webhook_settings()
    event = "run." + run.status.lower()
    if settings is None or not settings["urls"] or event not in settings["events"]:
        return None
    import threading
    body = (_dumps({"text": _slack_text(run)}) if settings["format"] == "slack"
            else _dumps(webhook_payload(run))).encode("utf-8")
    attempts, timeout = settings["attempts"], settings["timeout"]
    budget = attempts * timeout + sum(0.5 * 2 ** k for k in range(attempts - 1)) + 1.0

    def deliver(delivery):
        delivery.report(_post(delivery.url, body, event, settings, attempts, timeout))

    global _webhooks_drained_at_exit
    if not _webhooks_drained_at_exit:
        import atexit
        atexit.register(drain_webhooks)
        _webhooks_drained_at_exit = True
    _pending_webhooks[:] = [d for d in _pending_webhooks if not d.reported]
    threads = []
    for url in settings["urls"]:        # one thread per URL: a slow one delays no other
        delivery = _Delivery(url, folder, run.status, budget)
        delivery.thread = threading.Thread(target=deliver, args=(delivery,),
                                           name="pyoco-webhook", daemon=True)
        _pending_webhooks.append(delivery)
        delivery.thread.start()
        threads.append(delivery.thread)
    return threads


def _post(url, body, event, settings, attempts, timeout):
    import hashlib
    import hmac
    import urllib.error
    import urllib.request

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None         # a 3xx is the answer: a failed attempt, never followed

    opener = urllib.request.build_opener(NoRedirects)
    headers = {"Content-Type": "application/json", "User-Agent": "pyoco/" + __version__,
               "X-Pyoco-Event": event}
    if settings["secret"]:
        digest = hmac.new(settings["secret"].encode(), body, hashlib.sha256).hexdigest()
        headers["X-Pyoco-Signature"] = "sha256=" + digest
    target, authorization = _without_credentials(url)
    if authorization:
        headers["Authorization"] = authorization
    error, status = None, None
    for attempt in range(1, attempts + 1):
        try:
            request = urllib.request.Request(target, data=body, headers=headers, method="POST")
            with opener.open(request, timeout=timeout) as response:
                status = response.status
                response.read(65536)
            return {"outcome": "delivered", "url": _redact(url), "attempts": attempt,
                    "status_code": status}
        except urllib.error.HTTPError as exc:
            status, error = exc.code, "HTTP %d" % exc.code
            exc.close()
        except Exception as exc:
            error = _describe(exc)
        if attempt < attempts:
            time.sleep(0.5 * 2 ** (attempt - 1))
    return {"outcome": "failed", "url": _redact(url), "attempts": attempts,
            "status_code": status, "error": error}


def _scrub(text, url):
    """An error message with the URL's path and query (often secret) and any
    user:password@ in it cut out."""
    from urllib.parse import unquote
    rest = url.partition("://")[2]
    netloc = rest.split("/", 1)[0]
    path = rest[len(netloc):]
    for secret in sorted({url, path, path.split("?", 1)[0], path.lstrip("/")} - {"", "/"},
                         key=len, reverse=True):
        text = text.replace(secret, "/…")
    userinfo = netloc.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    for secret in sorted({userinfo, unquote(userinfo), password, unquote(password)} - {""},
                         key=len, reverse=True):
        text = text.replace(secret, "…")
    return text


def drain_webhooks():
    """Wait for webhook deliveries still under way, each at most until its budget
    ends; one cut off there is recorded as failed."""
    while _pending_webhooks:
        delivery = _pending_webhooks.pop(0)
        delivery.thread.join(max(0.0, delivery.deadline - time.monotonic()))
        if delivery.thread.is_alive():
            delivery.cut_off()


# ---------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------

def _task_numbers(plan, names, where):
    """The task numbers of ``names``; FlowError names an unknown one and the closest."""
    if isinstance(names, str):
        names = [names]
    numbers = []
    for name in names:
        i = plan.index.get(name)
        if i is None:
            raise FlowError("%s: flow %r has no task %r%s" % (
                where, plan.flow_name, name, _closest(name, plan.names)))
        numbers.append(i)
    return numbers


class Engine:
    """Runs flows: independent tasks in parallel on up to ``workers`` threads.

    ``trace``: True (to stderr), False (silent) or a text stream.
    ``cute``: emoji trace (default, unless PYOCO_CUTE=0) or plain ASCII lines.
    ``store``: a folder to record runs in (``RunStore`` or path), False for
    none; by default runs are recorded only when PYOCO_HOME is set.
    ``observers``: callables ``observer(run, event)`` that see every ``Event``
    of every run; they must be quick, must not raise (an observer that raises
    is reported once and dropped) and only read.
    ``pools``: pool sizes (``{"api": 4}``) or ``{"size": .., "rate": "10/s"}``
    that override the flow's or declare more (a size alone keeps the flow's rate).
    ``executor``: where tasks run (SPEC section 14): ``"thread"`` (default),
    ``"process"`` (a process per worker; tasks, inputs and outputs must
    pickle, and a timeout kills the task's process), ``"dask"`` (a local
    Dask cluster for the run), ``"dask://HOST:PORT"``, ``"ray"`` (a local Ray
    for the run), ``"ray://HOST:PORT"``, ``"MODULE:NAME"`` (an Executor or a
    function returning one), or any ``concurrent.futures.Executor``, such as
    a Dask client's ``get_executor()``. PYOCO_EXECUTOR is for the CLI only.
    An unknown SPEC is a ValueError; one that cannot be opened (a missing
    package, an unreachable scheduler) is an ExecutorError from ``run``.
    Outside threads, ``ctx`` is a copy: see docs/scale-out.md.
    ``progress``: when the cute trace goes to stderr, stderr is a terminal
    and tasks run on threads, each running map is one line redrawn in place
    instead of a line per instance (SPEC section 3). None (default): unless
    PYOCO_PROGRESS=0; True: even then; False: every event is a line.
    ``trace_backend``: a ``TraceBackend`` (the original pyoco's interface)
    told of each run and task instead of the trace being printed.
    """

    def __init__(self, workers=8, trace=True, cute=None, store=None, observers=(),
                 executor="thread", pools=None, progress=None, trace_backend=None):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError("workers must be a whole number >= 1, not %r" % (workers,))
        _check_executor(executor)
        if trace_backend is not None and not callable(
                getattr(trace_backend, "on_node_start", None)):
            raise TypeError("trace_backend must be a pyoco.TraceBackend (on_flow_start,"
                            " on_node_start, ...), not %r" % (trace_backend,))
        if progress not in (None, True, False):
            raise ValueError("progress must be None (auto), True or False, not %r"
                             % (progress,))
        self.workers = workers
        self.executor = executor
        self.trace = trace
        self.cute = _cute_default() if cute is None else bool(cute)
        self.progress = progress
        self.trace_backend = trace_backend  # the original's trace interface, instead of the trace
        self.store = store
        self.observers = list(observers)
        self.pools = dict(pools or {})      # sizes (or {"size", "rate"}) over the flow's own
        _parse_pools(self.pools, "Engine(pools=...)")
        self._active = {}           # run id -> its _Scheduler while the run goes
        self._opened = None         # an _OpenExecutor kept open across runs (pyoco serve)

    @property
    def active_runs(self):
        """run id -> Run, for the runs going on now (the original pyoco's name)."""
        return {run_id: scheduler.run for run_id, scheduler in list(self._active.items())}

    def _store(self):
        if self.store is False:
            return None
        if isinstance(self.store, RunStore):
            return self.store
        if self.store is not None:
            return RunStore(self.store)
        home = os.environ.get("PYOCO_HOME")
        return RunStore(home) if home else None

    def run(self, flow, params=None, *, raise_on_failure=True, run_id=None, resume=None,
            only=None, rerun_from=None, overrides=None, scheduled_for=None):
        """Run ``flow`` and return its ``Run``.

        Raises FlowError before anything runs when the flow is invalid,
        ExecutorError (nothing recorded) when the executor cannot be opened,
        RunFailed when a task failed (``__cause__`` is its exception) and
        RunCancelled when the run was cancelled, unless ``raise_on_failure``
        is False. ``resume``: the id of a FAILED or CANCELLED run in the
        store; tasks that succeeded there are not run again (see RunStore).
        ``only``: task names to run, with the upstream tasks they need (the
        rest are SKIPPED, "not selected"); ``rerun_from``: task names to run
        with everything downstream, the other tasks' outputs taken from the
        store; ``overrides``: task name -> the output it has without being
        called (SPEC section 11). An unknown name is a FlowError.
        ``scheduled_for``: the schedule's time (Unix) that starts this run,
        kept in its record (``pyoco serve`` passes it).
        """
        if isinstance(flow, _Chain):        # flow = Flow() >> a >> b, as the original wrote it
            flow = flow.flow
        if not isinstance(flow, Flow):
            raise TypeError("Engine.run needs a Flow, got %r" % (flow,))
        params = dict(params or {})
        store = self._store()
        plan, binds, params, old, fixed, forced = self._prepare(
            flow, params, store, resume, only, rerun_from, overrides)
        if self.executor == "process":
            _check_picklable(plan)
        if old is not None:
            reused = store.reusable_outputs(old, plan, forced)
        elif rerun_from:
            reused = store.newest_outputs(plan, forced) if store is not None else {}
        else:
            reused = {}
        pools = self._pools(plan)
        where = self._opened or _open_executor(self.executor, self.workers)
        ended = False
        try:
            run = self._run(plan, flow, params, binds, store, reused, pools, where, run_id,
                            resume, scheduled_for, fixed, forced)
            ended = True
        finally:
            if where is not self._opened:   # what this run started, also after Ctrl+C
                where.close(wait=ended)
        if store is not None:
            store.prune()
        if raise_on_failure:
            if run.status == RunState.FAILED:
                raise _run_failed("run %s of flow %r failed: %s"
                                  % (run.run_id, run.flow_name, run.failure()), run) from run.error
            if run.status == RunState.CANCELLED:
                raise RunCancelled("run %s of flow %r was cancelled (%s)"
                                   % (run.run_id, run.flow_name, run.reason), run)
        return run

    def _run(self, plan, flow, params, binds, store, reused, pools, where, run_id, resume,
             scheduled_for, fixed, forced):
        """One run on an opened executor, to its end; returns its Run."""
        run_id, folder = run_id or _new_run_id(), None
        if store is not None:
            run_id, folder = store.new_run_folder(run_id)
        run = Run(plan, flow, params, run_id)
        run.resumed_from = resume
        run.scheduled_for = scheduled_for
        run.executor = where.name
        recorder = _RunRecorder(store, run, folder) if folder is not None else None
        cache = _CacheIndex(store, plan.flow_name, run_id) \
            if plan.cached and store is not None else None
        core = _Scheduler(run, binds, self._observers(recorder, folder), reused, recorder,
                          pools, cache, fixed, forced)
        if recorder is not None:
            run.artifacts_dir = recorder.artifacts_dir
            core.cancel_file = recorder.cancel_file
        self._active[run.run_id] = core
        guard = _SignalGuard(core)
        tee = self.trace is True or self.trace is sys.stderr    # task prints: whole lines
        if tee:
            _tee_install()
        try:
            if recorder is not None:
                recorder.start()
            core.start()
            if not core.plan.roots:
                core.finish()
            elif where.pool is None:
                _ThreadDriver(core, self.workers).execute()
            else:
                _FutureDriver(core, self.workers, where).execute()
        finally:
            guard.restore()
            if recorder is not None:
                recorder.close()
            if tee:
                _tee_remove()
            self._active.pop(run.run_id, None)      # after the record is final
        return run

    def plan(self, flow, params=None, only=None, rerun_from=None, *, resume=None):
        """What ``run`` would do with these arguments, without calling any task
        or writing anything: one dict per task, in topological order, with
        ``task``, ``action`` (``run``, ``reuse``, ``skip`` or ``depends``: decided
        when an upstream task that runs has returned), ``reason`` (SPEC section
        11's words) and ``reused_from``. Raises FlowError like ``run``.
        """
        if not isinstance(flow, Flow):
            raise TypeError("Engine.plan needs a Flow, got %r" % (flow,))
        store = self._store()
        plan, binds, params, old, fixed, forced = self._prepare(
            flow, dict(params or {}), store, resume, only, rerun_from, None)
        if old is not None:
            reused = store.reusable_outputs(old, plan, forced)
        elif rerun_from and store is not None:
            reused = store.newest_outputs(plan, forced)
        else:
            reused = {}
        cache = _CacheIndex(store, plan.flow_name) if plan.cached and store is not None \
            else None
        run = Run(plan, flow, params, None)     # holds the outputs known before running
        order = range(len(plan.names))
        if not all(p < i for i, ups in enumerate(plan.preds) for p in ups):
            order = [plan.index[name] for name in _topological(plan)]
        entries = []
        for i in order:
            action, reason, origin = _plan_task(plan, binds, run, i, fixed, forced,
                                                     reused, cache)
            entries.append({"task": plan.names[i], "action": action, "reason": reason,
                            "reused_from": origin})
        return entries

    def _prepare(self, flow, params, store, resume, only, rerun_from, overrides):
        """What run() and plan() share: the compiled plan, its bindings and the
        run's params, the record being resumed (or None), the tasks settled before they start
        (task number -> ("skip", reason) or ("value", output)) and the tasks
        that run whatever is stored (``rerun_from`` and their downstream)."""
        old = None
        if resume:
            if store is None:
                raise StoreError("resume needs a run store: pass Engine(store=PATH) or set"
                                 " PYOCO_HOME")
            old = store.resumable(resume, any_status=bool(rerun_from))
            params = dict(old.get("params") or {}, **params)   # the old run's, unless given
        plan = flow._compile()
        fixed, forced = {}, set()
        if only:
            keep = set(_task_numbers(plan, only, "only"))
            stack = list(keep)
            while stack:                # and the upstream tasks they need
                for p in plan.preds[stack.pop()]:
                    if p not in keep:
                        keep.add(p)
                        stack.append(p)
            fixed.update((i, ("skip", "not selected")) for i in range(len(plan.names))
                         if i not in keep)
        if rerun_from:
            forced = set(_task_numbers(plan, rerun_from, "rerun_from"))
            stack = list(forced)
            while stack:
                i = stack.pop()
                for s in plan.free[i] + plan.joins[i]:
                    if s not in forced:
                        forced.add(s)
                        stack.append(s)
        if overrides:
            if not isinstance(overrides, dict):
                raise TypeError("overrides must be a dict of task name -> output, not %r"
                                % (overrides,))
            for i, name in zip(_task_numbers(plan, list(overrides), "overrides"), overrides):
                fixed[i] = ("value", overrides[name])
        if fixed:       # a parameter only tasks that are not called need may be left out
            _, missing = plan.bind(params, strict=False)
            needed = {p for name, p in missing if plan.index[name] not in fixed}
            unneeded = {p: None for name, p in missing if p not in needed}
            binds, _ = plan.bind(dict(params, **unneeded), strict=True)
        else:
            binds, _ = plan.bind(params, strict=True)
        return plan, binds, params, old, fixed, forced

    def _pools(self, plan):
        """The run's pool limits: the flow's, overridden by this engine's; a task
        naming a pool nobody declared is a FlowError."""
        limits = _parse_pools(plan.pools, "flow %r" % plan.flow_name)
        for name, (size, rate) in _parse_pools(self.pools, "Engine(pools=...)").items():
            given = self.pools[name]
            keep_rate = not isinstance(given, dict) and name in limits
            limits[name] = (size, limits[name][1] if keep_rate else rate)
        for name, pool in zip(plan.names, plan.pool_of):
            if pool is not None and pool not in limits:
                raise FlowError("task %r uses pool %r, which has no size: declare it with"
                                " Flow(..., pools={%r: 2}), Engine(pools={%r: 2}) or"
                                " --pool %s=2%s" % (name, pool, pool, pool, pool,
                                                    _closest(pool, limits)))
        return limits

    def _observers(self, recorder, folder):
        """Who sees a run's events, in order: the caller's observers, the trace,
        the logging bridge, the store's recorder, then webhooks (which fire on the
        run's last event, once the recorder has saved the final record)."""
        observers = list(self.observers)
        if self.trace_backend is not None:
            observers.append(_backend_observer(self.trace_backend))
        elif self.trace:
            terminal = _progress_terminal(self.trace, self.cute, self.progress, self.executor)
            observers.append(_TraceWriter(self.trace, self.cute) if terminal is None
                             else _ProgressTrace(terminal))
        logger = _logging_observer()
        if logger is not None:
            observers.append(logger)
        if recorder is not None:
            observers.append(recorder.observe)
        webhooks = _webhook_observer(folder)
        if webhooks is not None:
            observers.append(webhooks)
        return observers

    def live_run(self, run_id):
        """The ``Run`` of a run this engine is running now, else None."""
        core = self._active.get(run_id)
        return core.run if core is not None else None

    def cancel(self, run_id, reason="cancelled by Engine.cancel"):
        """Ask a run of this engine to stop: nothing new starts, ctx.cancelled is set.

        Returns False when no such run is active.
        """
        core = self._active.get(run_id)
        return core is not None and core.cancel(reason)


def _plan_task(plan, binds, run, i, fixed, forced, reused, cache):
    """One task's (action, reason, reused_from) for plan(); a task it reuses
    leaves its output in ``run`` for the tasks below it."""
    name = plan.names[i]
    if i in fixed:
        return "skip", fixed[i][1], None
    if not plan.cache_level[i]:
        return "run", "cache=False", None
    if name in reused:
        out, _, origin = reused[name]
        run._state[i], run._outputs[i] = TaskState.SUCCEEDED, out
        return "reuse", "output reused from run %s" % origin, origin
    if i in forced:
        return "run", "selected by --from", None
    if plan.cache_level[i] == 1:
        return "run", "not cached (cache='resume')", None
    node = plan.nodes[i]
    source = getattr(node, "base", node)
    code = _task_code(source, plan.funcs[i])
    if i in plan.maps:          # each instance has its fingerprint; the first to run says why
        over, item_name, kwonly = plan.maps[i]
        if over[0] == _B_NODE and run._state[over[1]] != TaskState.SUCCEEDED:
            return "depends", "upstream %r runs: decided when it returns" % (
                plan.names[over[1]]), None
        try:
            items = list(_arguments(run, (over,))[0][0])
        except Exception as exc:
            return "run", "its items cannot be read yet: %s" % _describe(exc), None
        verdicts = [_plan_cached(run, i, source, code, "%s[%d]" % (name, k), cache,
                                      ((_B_CONST, item, (), None, item_name, kwonly),)
                                      + binds[i]) for k, item in enumerate(items)]
        verdict = next((v for v in verdicts if v[0] != "reuse"), None)
        if verdict is not None or not verdicts:
            return (verdict or ("run", "no earlier run", None, None))[:3]
        run._state[i] = TaskState.SUCCEEDED
        run._outputs[i] = [v[3] for v in verdicts]
        return verdicts[0][:3]
    action, reason, origin, out = _plan_cached(run, i, source, code, name, cache,
                                                    binds[i])
    if action == "reuse":
        run._state[i], run._outputs[i] = TaskState.SUCCEEDED, out
    return action, reason, origin


def _plan_cached(run, i, source, code, name, cache, binds):
    """A cache=True task's (action, reason, reused_from, output) for plan():
    the values known now are fingerprinted, the others wait for their task."""
    named = {}
    for b in binds:
        if b[0] == _B_NODE and run._state[b[1]] != TaskState.SUCCEEDED:
            named[b[4]] = _Later(run._plan.names[b[1]])
        elif b[0] == _B_SCRATCH:
            named[b[4]] = _Later("ctx.scratch")
        else:
            try:
                args, kwargs = _arguments(run, (b,))
            except Exception as exc:
                return "run", "input %r cannot be read: %s" % (b[4], _describe(exc)), \
                    None, None
            named[b[4]] = args[0] if args else kwargs[b[4]]
    unknown = [v for v in named.values() if isinstance(v, _Later)]
    if unknown and source.cache_key is not None:
        hashes = {"cache_key": unknown[0]}
    elif unknown:
        hashes = {p: v if isinstance(v, _Later) else _value_hash(v)
                  for p, v in named.items()}
    else:
        try:
            hashes = _input_hashes(run, i, source, named)
        except Exception as exc:
            return "run", "cache_key failed: %s" % _describe(exc), None, None
    if cache is None:
        return "run", "no earlier run", None, None
    action, reason, entry, out = cache.decide(name, code, hashes, source.cache_ttl)
    return action, reason, entry and entry["origin"], out


def run(flow, params=None, trace=True, cute=True):
    """Run ``flow`` on a fresh ``Engine(trace=trace, cute=cute)`` and return the Run
    (the original pyoco's one-call form; a failed run raises RunFailed)."""
    return Engine(trace=trace, cute=cute).run(flow, params)


# ---------------------------------------------------------------------------
# Read side: metrics
# ---------------------------------------------------------------------------

# Bucket bounds in seconds: sub-second tasks and hour-long runs both land in
# buckets that tell them apart.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)


class _Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self):
        self.counts = [0] * len(DURATION_BUCKETS)
        self.total = 0.0
        self.count = 0

    def observe(self, value):
        for k, bound in enumerate(DURATION_BUCKETS):
            if value <= bound:
                self.counts[k] += 1
                break
        self.total += value
        self.count += 1


class MetricsView:
    """An incremental view of a run store for /metrics and /runs.

    Each refresh (at most every ``min_interval`` seconds) stats every run's
    record and re-reads only those that changed; finished runs are added to
    the counters once. Counters never go down while the view lives, even
    when old runs are pruned from the store.
    """

    def __init__(self, store, min_interval=0.5):
        import threading
        self.store = store
        self.min_interval = min_interval
        self.lock = threading.Lock()
        self.refreshed_at = 0.0
        self.records = {}           # run id -> record without events
        self.stamps = {}            # run id -> (mtime_ns, size) of its run.json
        self.counted = set()        # finished runs already in the counters
        self.webhooks_seen = {}     # run id -> webhook events already counted
        self.flows = set()
        self.runs_total = {}        # (flow, status) -> count
        self.tasks_total = {}       # (flow, task, state) -> count
        self.retries_total = {}     # (flow, task) -> count
        self.reused_total = {}      # (flow, task) -> count of outputs taken from earlier runs
        self.run_hist = {}          # flow -> _Histogram
        self.task_hist = {}         # (flow, task) -> _Histogram
        self.last_run = {}          # (flow, status) -> ended_at
        self.webhooks_total = {}    # outcome -> count
        self.version = 0            # bumped when anything changed; render() reuses its text
        self.rendered = (-1, "")

    def refresh(self, force=False):
        with self.lock:
            now = time.monotonic()
            if not force and now - self.refreshed_at < self.min_interval:
                return
            self.refreshed_at = now
            try:
                entries = list(os.scandir(self.store.runs_dir))
            except OSError:
                entries = []
            present = set()
            changed = False
            for entry in entries:
                run_id = entry.name
                if run_id not in self.stamps and not _valid_run_id(run_id):
                    continue
                try:
                    st = os.stat(os.path.join(entry.path, "run.json"))
                except OSError:
                    continue
                present.add(run_id)
                stamp = (st.st_mtime_ns, st.st_size)
                record = self.records.get(run_id)
                if stamp != self.stamps.get(run_id):
                    full = self.store.get(run_id, events=True)
                    if full is None:        # gone, or not a pyoco record: tried again next time
                        changed |= self.records.pop(run_id, None) is not None
                        continue
                    self.stamps[run_id] = stamp
                    events = full.pop("events", None) or []
                    self.records[run_id] = record = full
                    self._count_webhooks(run_id, events)
                    changed = True
                elif record is not None and record["status"] not in _FINISHED:
                    settled = dict(record)
                    settled["tasks"] = {k: dict(v) for k, v in record["tasks"].items()}
                    _settle_if_dead(settled, entry.path)
                    if settled["status"] != record["status"]:
                        self.records[run_id] = record = settled
                        changed = True
                if record is not None:
                    self.flows.add(record.get("flow"))
                    if record["status"] in _FINISHED and run_id not in self.counted:
                        self._count(record)
                        self.counted.add(run_id)
            for gone in set(self.records) - present:
                del self.records[gone]
                self.stamps.pop(gone, None)
                changed = True
            if changed:
                self.version += 1

    def _count(self, record):
        flow, status = record.get("flow"), record["status"]
        key = (flow, status)
        self.runs_total[key] = self.runs_total.get(key, 0) + 1
        ended = _parse_iso(record.get("ended_at"))
        if ended is not None and ended > self.last_run.get(key, 0.0):
            self.last_run[key] = ended
        if record.get("duration_ms") is not None:
            self.run_hist.setdefault(flow, _Histogram()).observe(record["duration_ms"] / 1000)
        tasks = record.get("tasks") or {}
        for name, t in tasks.items():
            base, _, number = name[:-1].rpartition("[") if name.endswith("]") else ("", "", "")
            if number.isdigit() and base in tasks:
                name = base + "[*]"     # map instances share one label: bounded cardinality
            tkey = (flow, name, t.get("state"))

            self.tasks_total[tkey] = self.tasks_total.get(tkey, 0) + 1
            if t.get("reused_from"):
                self.reused_total[(flow, name)] = self.reused_total.get((flow, name), 0) + 1
            if (t.get("attempts") or 0) > 1:
                rkey = (flow, name)
                self.retries_total[rkey] = self.retries_total.get(rkey, 0) + t["attempts"] - 1
            if t.get("duration_ms") is not None and t.get("state") in (TaskState.SUCCEEDED,
                                                                       TaskState.FAILED):
                self.task_hist.setdefault((flow, name), _Histogram()).observe(
                    t["duration_ms"] / 1000)

    def _count_webhooks(self, run_id, events):
        hooks = [e for e in events if str(e.get("event", "")).startswith("webhook.")]
        for event in hooks[self.webhooks_seen.get(run_id, 0):]:
            outcome = event["event"].split(".", 1)[1]
            self.webhooks_total[outcome] = self.webhooks_total.get(outcome, 0) + 1
        self.webhooks_seen[run_id] = len(hooks)

    def runs(self, status=None, flow=None, limit=50):
        """Records without events, newest first."""
        self.refresh()
        with self.lock:
            records = [r for r in self.records.values()
                       if (status is None or r["status"] == status)
                       and (flow is None or r.get("flow") == flow)]
        records.sort(key=lambda r: (r.get("started_at") or "", r["run_id"]), reverse=True)
        return records[:limit]

    def render(self):
        """The Prometheus text exposition (format 0.0.4) of the store."""
        import platform
        self.refresh()
        with self.lock:
            if self.rendered[0] == self.version:
                return self.rendered[1]
            in_progress = {flow: 0 for flow in self.flows}
            for record in self.records.values():
                if record["status"] not in _FINISHED:
                    in_progress[record.get("flow")] = in_progress.get(record.get("flow"), 0) + 1
            out = []
            _metric(out, "pyoco_build_info", "gauge", "pyoco version and Python that serve these"
                    " metrics.", [({"version": __version__,
                                    "python": platform.python_version()}, 1)])
            runs_total = {(f, s): 0 for f in self.flows for s in _FINISHED}  # alerts see 0 -> 1
            runs_total.update(self.runs_total)
            _metric(out, "pyoco_runs_total", "counter", "Finished runs by flow and final status.",
                    [({"flow": f, "status": s}, n) for (f, s), n in sorted(runs_total.items(),
                                                                           key=_key_text)])
            _metric(out, "pyoco_runs_in_progress", "gauge", "Runs that are running or cancelling.",
                    [({"flow": f}, n) for f, n in sorted(in_progress.items(), key=_key_text)])
            _metric(out, "pyoco_last_run_timestamp_seconds", "gauge",
                    "When the last run of a flow with this status ended (Unix time).",
                    [({"flow": f, "status": s}, ts) for (f, s), ts in
                     sorted(self.last_run.items(), key=_key_text)])
            _histogram(out, "pyoco_run_duration_seconds", "Run durations by flow.",
                       [({"flow": f}, h) for f, h in sorted(self.run_hist.items(),
                                                            key=_key_text)])
            _histogram(out, "pyoco_task_duration_seconds",
                       "Durations of tasks that ran (succeeded or failed), by flow and task.",
                       [({"flow": f, "task": t}, h) for (f, t), h in
                        sorted(self.task_hist.items(), key=_key_text)])
            _metric(out, "pyoco_tasks_total", "counter", "Task outcomes by flow, task and state.",
                    [({"flow": f, "task": t, "state": s}, n) for (f, t, s), n in
                     sorted(self.tasks_total.items(), key=_key_text)])
            _metric(out, "pyoco_task_retries_total", "counter",
                    "Extra attempts made after task failures.",
                    [({"flow": f, "task": t}, n) for (f, t), n in
                     sorted(self.retries_total.items(), key=_key_text)])
            _metric(out, "pyoco_tasks_reused_total", "counter",
                    "Tasks whose output was reused from an earlier run instead of running.",
                    [({"flow": f, "task": t}, n) for (f, t), n in
                     sorted(self.reused_total.items(), key=_key_text)])
            _metric(out, "pyoco_webhook_deliveries_total", "counter",
                    "Webhook deliveries by outcome (delivered or failed).",
                    [({"outcome": o}, self.webhooks_total.get(o, 0))
                     for o in ("delivered", "failed")])
            _metric(out, "pyoco_store_runs", "gauge", "Runs currently kept in the run store.",
                    [({}, len(self.records))])
            self.rendered = (self.version, "".join(out))
        return self.rendered[1]


def _key_text(item):
    return str(item[0])


def _label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels, extra=None):
    pairs = list(labels.items()) + ([extra] if extra else [])
    if not pairs:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (k, _label_value(v)) for k, v in pairs)


def _number(value):
    return "+Inf" if value == float("inf") else repr(value)


def _metric(out, name, kind, help_text, samples):
    out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, help_text, name, kind))
    for labels, value in samples:
        out.append("%s%s %s\n" % (name, _labels(labels), _number(value)))


def _histogram(out, name, help_text, samples):
    out.append("# HELP %s %s\n# TYPE %s histogram\n" % (name, help_text, name))
    for labels, h in samples:
        running = 0
        for bound, n in zip(DURATION_BUCKETS, h.counts):
            running += n
            out.append("%s_bucket%s %d\n" % (name, _labels(labels, ("le", repr(bound))), running))
        out.append("%s_bucket%s %d\n" % (name, _labels(labels, ("le", "+Inf")), h.count))
        out.append("%s_sum%s %s\n" % (name, _labels(labels), repr(float(h.total))))
        out.append("%s_count%s %d\n" % (name, _labels(labels), h.count))


# ---------------------------------------------------------------------------
# Read side: the HTTP server
# ---------------------------------------------------------------------------

class HTTPError(PyocoError):
    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _ip_literal(host):
    """``host`` (an IPv6 one with or without brackets) as an ipaddress object, else None."""
    import ipaddress
    try:
        return ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return None


def _is_loopback(host):
    if host == "localhost":
        return True
    ip = _ip_literal(str(host))
    if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped                 # ::ffff:127.0.0.1, a v4 client of a v6 socket
    return ip is not None and ip.is_loopback


def _host_header(value):
    """The host a Host header names, lower-case and without its port: a name,
    an IPv4 literal or a bracketed IPv6 literal; None when it is malformed
    (``::1`` without brackets, a port that is not a number)."""
    value = value.strip(" \t").lower()
    if value.startswith("["):
        end = value.find("]") + 1
        host, port = value[:end], value[end:]
        ip = _ip_literal(host) if end else None
        if ip is None or ip.version != 6:
            return None
    else:
        host, sep, port = value.partition(":")
        port = sep + port
    if not host or (port and not (port == ":" or port[1:].isascii() and port[1:].isdigit())):
        return None
    return host


class Server:
    """``pyoco serve``: the JSON run API and /metrics over a run store.

    ``flows`` (name -> Flow) are the flows ``POST /runs`` may start, in this
    process; ``files`` (name -> path) says where each came from, for GET /flows.
    Flows with a ``schedule`` are started at its times while the server
    serves, unless ``schedule`` is False. ``clock``: what the scheduler reads
    the time from and waits with (see _WallClock). Call ``start()`` for a
    background thread or ``serve_forever()``.
    """

    max_body = 1 << 20

    def __init__(self, store, host="127.0.0.1", port=0, flows=None, engine=None,
                 token=None, files=None, schedule=True, clock=None):
        from http.server import ThreadingHTTPServer
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self.view = MetricsView(self.store)
        self.flows = dict(flows or {})
        self.files = dict(files or {})
        self.engine = engine or Engine(store=self.store)
        self.token = token if token is not None else os.environ.get("PYOCO_API_TOKEN") or None
        self.allowed_hosts = {name.strip().lower() for name in
                              os.environ.get("PYOCO_ALLOWED_HOSTS", "").split(",")} - {""}
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self.host = host
        self.runs = {}              # run id -> thread, for runs started through the API
        self._begun = {}            # run id -> Event set once that run has begun
        self.engine.observers.append(self._observe)
        handler = type("Handler", (_make_handler_class(),), {"app": self})
        server_class = ThreadingHTTPServer
        ip = _ip_literal(host)
        if ip is not None and ip.version == 6:
            import socket
            server_class = type("ThreadingHTTPServer6", (ThreadingHTTPServer,),
                                {"address_family": socket.AF_INET6})
        self.httpd = server_class((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = None
        self.timetable = None       # the scheduler thread's state, when a flow has a schedule
        if schedule and any(flow.schedule is not None for flow in self.flows.values()):
            self.timetable = _Timetable(self, clock or _WallClock())

    @property
    def url(self):
        host = self.host if ":" not in self.host else "[%s]" % self.host
        return "http://%s:%d" % (host, self.port)

    def start(self):
        import threading
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,),
                                       name="pyoco-serve",
                                       daemon=True)
        self.thread.start()
        if self.timetable is not None:
            self.timetable.start()
        return self

    def serve_forever(self):
        if self.timetable is not None:
            self.timetable.start()
        self.httpd.serve_forever(0.1)

    def close(self, wait=5.0):
        """Stop serving and scheduling; cancel the runs this server started
        (through the API or a schedule) and wait a little for them."""
        if self.timetable is not None:
            self.timetable.close()
        self.httpd.shutdown() if self.thread is not None else None
        self.httpd.server_close()
        for run_id in list(self.runs):
            self.engine.cancel(run_id, "the server is shutting down")
        deadline = time.monotonic() + wait
        for thread in list(self.runs.values()):
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- routes

    def route(self, method, path, query, body, client, headers):
        self.check_host(headers, client)
        parts = [p for p in path.split("/") if p]
        if not parts:
            self.allow(method, "GET")
            return 200, _Raw(_PAGE.encode("utf-8"), "text/html; charset=utf-8")
        if parts == ["healthz"]:
            self.allow(method, "GET")
            return 200, {"status": "ok", "version": __version__}
        if parts == ["metrics"]:
            self.allow(method, "GET")
            text = self.view.render()
            return 200, text if self.timetable is None else text + self.timetable.render()
        if parts == ["flows"]:
            self.allow(method, "GET")
            _query_keys(query, ())
            return 200, self.flow_list()
        if parts == ["runs"]:
            self.allow(method, "GET", "POST")
            if method == "POST":
                self.authorize(client, headers)
                return self.start_run(body)
            status, flow, limit = _runs_query(query)
            return 200, self.view.runs(status=status, flow=flow, limit=limit)
        if len(parts) >= 2 and parts[0] == "runs":
            run_id = parts[1]
            if not _valid_run_id(run_id):
                raise HTTPError(404, "no run %r" % run_id)
            if len(parts) == 2:
                self.allow(method, "GET")
                _query_keys(query, ())
                return 200, self.record(run_id)
            if parts[2:] == ["logs"]:
                self.allow(method, "GET")
                return 200, self.logs(run_id, query)
            if parts[2:] == ["view"]:
                self.allow(method, "GET")
                return 200, _Raw(_PAGE.encode("utf-8"), "text/html; charset=utf-8")
            if parts[2:] == ["graph"]:
                self.allow(method, "GET")
                return 200, self.graph(run_id)
            if parts[2:3] == ["artifacts"] and len(parts) > 3:
                self.allow(method, "GET")
                from urllib.parse import unquote
                return 200, self.artifact(run_id, "/".join(unquote(p) for p in parts[3:]))
            if parts[2:] == ["cancel"]:
                self.allow(method, "POST")
                self.authorize(client, headers)
                return self.cancel(run_id)
        raise HTTPError(404, "no such endpoint: %s (see /healthz, /metrics, /runs, /flows)"
                        % path)

    @staticmethod
    def allow(method, *methods):
        if method not in methods:
            raise HTTPError(405, "%s is not allowed here; use %s" % (method, " or ".join(methods)),
                            {"Allow": ", ".join(methods)})

    def check_host(self, headers, client):
        """Refuse (403) a request whose Host is not this server's: an IP
        literal, localhost or a name in PYOCO_ALLOWED_HOSTS. A page on another
        site whose name was re-pointed at 127.0.0.1 sends its own name."""
        given = headers.get_all("Host") or []
        if len(given) > 1:
            raise HTTPError(400, "a request may have one Host header, not %d" % len(given))
        if "*" in self.allowed_hosts:
            return
        if not given or not given[0].strip():       # HTTP/1.0: no browser sends that
            if _is_loopback(client):
                return
            raise HTTPError(403, "requests from beyond loopback need a Host header")
        host = _host_header(given[0])
        if host is None or not (host == "localhost" or host in self.allowed_hosts
                                or _ip_literal(host) is not None):
            raise HTTPError(403, "Host %r is not a name of this server: use an IP address or"
                                 " localhost, or list the name in PYOCO_ALLOWED_HOSTS"
                            % given[0])

    def authorize(self, client, headers):
        import hmac
        from urllib.parse import urlsplit
        for key in ("Origin", "Referer"):           # set by browsers, Origin on most writes
            source = headers.get(key)
            if source:
                try:
                    url = urlsplit(source)
                    same = url.scheme == "http" and url.netloc.lower() == (
                        headers.get("Host") or "").lower()
                except ValueError:
                    same = False
                if not same:
                    raise HTTPError(403, "cross-site request refused (%s %s)" % (key, source))
                break
        if self.token:
            given = headers.get("Authorization") or ""
            if not given.startswith("Bearer ") or not hmac.compare_digest(
                    given[7:].strip().encode(), self.token.encode()):
                raise HTTPError(401, "this endpoint needs Authorization: Bearer <PYOCO_API_TOKEN>",
                                {"WWW-Authenticate": "Bearer"})
            return
        if not (_is_loopback(self.host) and _is_loopback(client)):
            raise HTTPError(403, "changes are refused: set PYOCO_API_TOKEN to allow them when"
                                 " the server listens beyond loopback")
        host = _host_header(headers.get("Host") or "localhost")
        if host is None or not _is_loopback(host):      # a PYOCO_ALLOWED_HOSTS name too
            raise HTTPError(403, "changes without PYOCO_API_TOKEN must be addressed to"
                                 " localhost, 127.0.0.1 or [::1], not %r" % headers.get("Host"))

    def graph(self, run_id):
        """The run's DAG: task names and [upstream, downstream] edges."""
        import json
        try:
            with open(os.path.join(self.store.folder(run_id), "graph.json"), "rb") as f:
                graph = json.loads(f.read())
            if not isinstance(graph, dict):
                raise ValueError("not a graph")
        except (OSError, ValueError):
            if self.store.get(run_id, events=False) is None:
                raise HTTPError(404, "no run %r" % run_id)
            raise HTTPError(404, "run %s has no saved graph" % run_id)
        graph["run_id"] = run_id
        return graph

    def artifact(self, run_id, name):
        """An artifact's bytes. Served so that a browser shows but never runs it."""
        import mimetypes
        record = self.store.get(run_id, events=False)
        if record is None:
            raise HTTPError(404, "no run %r" % run_id)
        root = os.path.realpath(os.path.join(self.store.folder(run_id), "artifacts"))
        path = os.path.realpath(os.path.join(root, name))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            raise HTTPError(404, "run %s has no artifact %r" % (run_id, name))
        kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if not kind.startswith(("text/", "image/")) or kind in ("text/html", "image/svg+xml"):
            kind = "application/octet-stream" if not kind.startswith("text/") else "text/plain"
        with open(path, "rb") as f:
            data = f.read()
        return _Raw(data, kind + ("; charset=utf-8" if kind.startswith("text/") else ""),
                    {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"})

    def record(self, run_id):
        run = self.live(run_id)
        record = run.to_dict() if run is not None else self.store.get(run_id)
        if record is None:
            raise HTTPError(404, "no run %r" % run_id)
        return record

    def logs(self, run_id, query):
        values = _query_keys(query, ("tail", "task"))
        tail = _int_param(values, "tail", 100, 1, 10000)
        task = values.get("task") or None
        run = self.live(run_id)
        record = run.to_dict(events=False) if run is not None else self.store.get(
            run_id, events=False)
        if record is None:
            raise HTTPError(404, "no run %r" % run_id)
        if task is not None and task not in (record.get("tasks") or {}):
            raise HTTPError(404, "run %s has no task %r" % (run_id, task))
        return {"run_id": run_id, "status": record["status"],
                "logs": self.store.logs(run_id, task=task, tail=tail)}

    def cancel(self, run_id):
        if self.engine.cancel(run_id, "cancel requested through the HTTP API"):
            return 202, {"run_id": run_id, "status": RunState.CANCELLING}
        record = self.store.get(run_id, events=False)
        if record is None:
            raise HTTPError(404, "no run %r" % run_id)
        if record["status"] not in (RunState.RUNNING, RunState.CANCELLING, RunState.PENDING):
            raise HTTPError(409, "run %s already ended %s" % (run_id, record["status"]))
        self.store.request_cancel(run_id)
        return 202, {"run_id": run_id, "status": RunState.CANCELLING}

    def flow_list(self):
        """GET /flows: each loaded flow, its schedule, next time and newest run."""
        out = []
        for name, flow in self.flows.items():
            newest = self.view.runs(flow=name, limit=1)
            next_at = self.timetable.next_at.get(name) if self.timetable is not None else None
            out.append({"flow": name, "file": self.files.get(name), "schedule": flow.schedule,
                        "next_run_at": _iso(next_at), "last_run": newest[0] if newest else None})
        return out

    def start_run(self, body):
        try:
            request = _loads(body or b"{}")
        except ValueError as exc:
            raise HTTPError(400, "the body must be JSON: %s" % exc)
        if not isinstance(request, dict) or set(request) - {"flow", "params"}:
            raise HTTPError(400, 'the body must be {"flow": NAME, "params": {...}}')
        name, params = request.get("flow"), request.get("params") or {}
        if not isinstance(name, str) or not name:
            raise HTTPError(400, 'the body needs "flow": the name of a flow this server runs'
                                 " (%s)" % (", ".join(sorted(self.flows)) or "none loaded"))
        if not isinstance(params, dict):
            raise HTTPError(400, "params must be a JSON object")
        run_id = self.launch(name, params)
        return 202, {"run_id": run_id, "flow": name, "status": RunState.RUNNING}

    def launch(self, name, params, scheduled_for=None):
        """Start loaded flow ``name`` on a thread of its own and return the run's
        id once the run has begun: POST /runs and the schedules start runs here.
        HTTPError when there is no such flow or ``params`` do not fit it."""
        import threading
        flow = self.flows.get(name)
        if flow is None:
            raise HTTPError(404, "no flow %r here; this server runs: %s"
                            % (name, ", ".join(sorted(self.flows)) or "none (pass FLOW.py"
                               " files to pyoco serve)"))
        try:
            flow.validate(params)
        except FlowError as exc:
            raise HTTPError(400, str(exc))
        run_id = _new_run_id()
        started = self._begun[run_id] = threading.Event()

        def go():
            try:
                self.engine.run(flow, params, run_id=run_id, raise_on_failure=False,
                                scheduled_for=scheduled_for)
            except Exception as exc:
                _warn("run %s of flow %r failed to start: %s" % (run_id, name, _describe(exc)))
            finally:
                self.runs.pop(run_id, None)
                self._begun.pop(run_id, None)
                started.set()
        thread = threading.Thread(target=go, name="pyoco-run-" + run_id)
        self.runs[run_id] = thread
        thread.start()
        started.wait(10)            # answer once the run exists, so its id can be read at once
        return run_id

    def _observe(self, run, ev):
        if ev[1] == "run.started" and run.run_id in self._begun:
            self._begun[run.run_id].set()

    def live(self, run_id):
        """The Run object of a run this server's engine is running, else None."""
        return self.engine.live_run(run_id)


class _WallClock:
    """The scheduler's clock: ``now()`` in Unix seconds, and ``wait(seconds,
    stop)`` that returns after ``seconds`` or as soon as the Event ``stop`` is
    set. Tests pass their own object with these two methods to drive time."""

    @staticmethod
    def now():
        return time.time()

    @staticmethod
    def wait(seconds, stop):
        stop.wait(seconds)


_CLAIMS_KEPT = 100      # claim files kept per flow; older ones are deleted


class _Timetable:
    """The scheduler thread of ``pyoco serve``: starts each scheduled flow at
    its times, through Server.launch (as POST /runs does).

    A time is started once between all servers on one store: the first to
    create its claim file (O_EXCL) in ``<store>/schedule/<flow>/`` starts it,
    or skips it while a run of that flow is still running; the others do
    nothing. A server that dies after claiming loses that one time only.
    """

    def __init__(self, server, clock):
        import threading
        self.server, self.clock = server, clock
        self.flows = {name: flow for name, flow in server.flows.items()
                      if flow.schedule is not None}
        now = clock.now()
        self.next_at = {name: flow._schedule.next_after(now)     # name -> Unix time or None
                        for name, flow in self.flows.items()}
        self.skipped = dict.fromkeys(self.flows, 0)     # name -> times skipped for overlap
        self.claims = os.path.join(server.store.root, "schedule")
        self.stop = threading.Event()
        self.thread = None

    def start(self):
        import threading
        if self.thread is None:
            self.thread = threading.Thread(target=self.loop, name="pyoco-schedule", daemon=True)
            self.thread.start()

    def close(self, wait=5.0):
        self.stop.set()
        if self.thread is not None:
            self.thread.join(wait)

    def loop(self):
        try:
            self.catch_up(self.clock.now())
            while not self.stop.is_set():
                now = self.clock.now()
                for name, at in list(self.next_at.items()):
                    if at is not None and at <= now:
                        schedule = self.flows[name]._schedule
                        self.next_at[name] = schedule.next_after(now)
                        self.fire(name, schedule.latest_until(now))   # one run, however late
                coming = [at for at in self.next_at.values() if at is not None]
                # wake at least every minute: a wall clock that was set moves the times
                self.clock.wait(min([60.0] + [at - now for at in coming]), self.stop)
        except Exception as exc:        # a bug: say so, and keep serving the API
            _warn("the scheduler stopped: %s" % _describe(exc))

    def catch_up(self, now):
        """At start: run each flow once for the latest time missed since its
        last scheduled run (schedule_catchup="latest")."""
        for name, flow in self.flows.items():
            if flow.schedule_catchup != "latest":
                continue
            done = [_parse_iso(r.get("scheduled_for")) for r in
                    self.server.view.runs(flow=name, limit=None) if r.get("scheduled_for")]
            missed = flow._schedule.latest_until(now) if done else None
            if missed is not None and missed > max(done) + 0.5:     # records keep milliseconds
                self.fire(name, missed)

    def fire(self, name, at):
        if self.stop.is_set() or not self.claim(name, at):
            return
        if self.flows[name].schedule_overlap != "allow":
            running = self.running(name)
            if running is not None:
                self.skipped[name] += 1
                _write_line(None, "pyoco serve: skip flow %r at %s: run %s is still %s\n"
                            % (name, _iso(at), running["run_id"], running["status"]))
                return
        try:
            self.server.launch(name, {}, scheduled_for=at)
        except HTTPError as exc:
            _warn("flow %r was not started for %s: %s" % (name, _iso(at), exc.message))

    def running(self, name):
        """A record of a run of flow ``name`` still running, from any process, or None."""
        view = self.server.view
        view.refresh(force=True)        # settles the runs of processes that died
        for record in view.runs(flow=name, limit=None):
            if record["status"] in (RunState.PENDING, RunState.RUNNING, RunState.CANCELLING):
                return record
        for run_id in list(self.server.runs):       # begun here, not yet in the store
            run = self.server.live(run_id)    # (or recorded, but its engine not yet done)
            if run is not None and run.flow_name == name and run.status not in _FINISHED:
                return run.to_dict(events=False)
        return None

    def claim(self, name, at):
        """Whether this server starts flow ``name``'s time ``at`` (it is the first to ask)."""
        folder = os.path.join(self.claims, _safe_file_name(name))
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(os.path.join(folder, "%d.claim" % at),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            _warn("flow %r was not started for %s: cannot claim it in %s (%s)"
                  % (name, _iso(at), folder, exc))
            return False
        try:
            os.write(fd, _dumps({"flow": name, "scheduled_for": _iso(at), "pid": os.getpid(),
                                 "host": _hostname()}).encode("utf-8"))
        finally:
            os.close(fd)
        try:
            old = sorted((n for n in os.listdir(folder) if n.endswith(".claim")),
                         key=lambda n: int(n.partition(".")[0]) if n[0].isdigit() else 0)
            for stale in old[:-_CLAIMS_KEPT]:
                os.unlink(os.path.join(folder, stale))
        except (OSError, ValueError):
            pass                        # another server pruned them first
        return True

    def render(self):
        """The scheduler's lines of /metrics."""
        out = []
        next_at = dict(self.next_at)
        _metric(out, "pyoco_schedule_next_run_timestamp_seconds", "gauge",
                "When each scheduled flow runs next (Unix time).",
                [({"flow": name}, at) for name, at in sorted(next_at.items()) if at is not None])
        _metric(out, "pyoco_schedule_skipped_total", "counter",
                "Scheduled times skipped because a run of the flow was still running.",
                [({"flow": name}, n) for name, n in sorted(self.skipped.items())])
        return "".join(out)


class _Raw:
    """A response body that is not JSON: bytes, their content type, extra headers."""

    __slots__ = ("data", "content_type", "headers")

    def __init__(self, data, content_type, headers=None):
        self.data, self.content_type, self.headers = data, content_type, headers or {}


def _query_keys(query, allowed):
    from urllib.parse import parse_qsl
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise HTTPError(400, "malformed query string %r" % query)
    values = {}
    for key, value in pairs:
        if key not in allowed:
            raise HTTPError(400, "unknown query parameter %r; this endpoint takes %s"
                            % (key, ", ".join(allowed) or "none"))
        if key in values:
            raise HTTPError(400, "query parameter %r given twice" % key)
        values[key] = value
    return values


def _int_param(values, key, default, low, high):
    text = values.get(key) or ""
    if not text:
        return default
    try:
        if not (text.isascii() and text.isdigit()):
            raise ValueError(text)
        value = int(text)
    except ValueError:
        raise HTTPError(400, "%s must be a whole number from %d to %d, not %r"
                        % (key, low, high, text))
    if not low <= value <= high:
        raise HTTPError(400, "%s must be from %d to %d, not %d" % (key, low, high, value))
    return value


def _runs_query(query):
    values = _query_keys(query, ("status", "flow", "limit"))
    status = values.get("status") or None
    if status is not None and status not in _RUN_STATES:
        raise HTTPError(400, "unknown status %r; use one of %s" % (status, ", ".join(_RUN_STATES)))
    return status, values.get("flow") or None, _int_param(values, "limit", 50, 1, 1000)


def _answer_body(payload, headers):
    """(bytes, content type, headers) of an answer: _Raw as it is, text for
    /metrics, anything else as JSON."""
    if isinstance(payload, _Raw):
        return payload.data, payload.content_type, dict(payload.headers, **headers)
    if isinstance(payload, str):
        return payload.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8", headers
    return (_dumps(payload, indent=None) + "\n").encode("utf-8"), "application/json", headers


def _request_body(handler):
    """The request's body, read by its Content-Length; HTTPError when it is bad."""
    given = handler.headers.get_all("Content-Length") or []
    if not given:
        if handler.headers.get("Transfer-Encoding"):
            handler.close_connection = True
            raise HTTPError(411, "send the body with a Content-Length")
        return b""
    length = given[0].strip(" \t")     # only what HTTP calls whitespace around it
    if len(given) > 1 or not (length.isascii() and length.isdigit()):
        handler.close_connection = True    # int() would take 1_0, +10 or a folded line
        raise HTTPError(400, "bad Content-Length %s: it must be one number in"
                             " ASCII digits" % ", ".join(map(repr, given)))
    length = int(length)
    if length < 0 or length > handler.app.max_body:
        handler.close_connection = True
        raise HTTPError(413, "the body may be at most %d bytes" % handler.app.max_body)
    try:
        body = handler.rfile.read(length)
    except OSError:                 # a timeout: the client sent less than it said
        body = b""
    if len(body) < length:
        handler.close_connection = True
        raise HTTPError(408, "the body was cut short: %d of %d bytes arrived"
                        % (len(body), length))
    return body


def _make_handler_class():
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        """One request: parse, route through the Server, answer JSON or text."""

        server_version = "pyoco/" + __version__
        protocol_version = "HTTP/1.1"
        timeout = 10            # seconds a client may stay idle before it is dropped
        app = None

        def handle_one(self, method, head=False):
            from urllib.parse import urlsplit
            url = urlsplit(self.path)
            body = b""
            try:
                body = self.read_body()     # any method: an unread body would desync the next
                status, payload = self.app.route(method, url.path, url.query, body,
                                                 self.client_address[0], self.headers)
                headers = {}
            except HTTPError as exc:
                status, payload, headers = exc.status, {"error": exc.message}, exc.headers
            except Exception as exc:        # a bug: answer 500, keep serving
                status, payload, headers = 500, {"error": "internal error: %s"
                                                 % _describe(exc)}, {}
            data, kind, headers = _answer_body(payload, headers)
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(data)
            except OSError:                 # the client left; nothing to tell it
                self.close_connection = True

        def read_body(self):
            return _request_body(self)

        def handle(self):
            try:
                super().handle()
            except OSError:                 # a client that vanished mid-request
                self.close_connection = True

        def do_HEAD(self):
            self.handle_one("GET", head=True)

        def send_error(self, code, message=None, explain=None):
            """Errors http.server finds itself (a bad request line, an unknown
            method) answer like ours: a status line and a JSON body."""
            if code == 501:         # a method nobody handles: the method is wrong here
                code, message = 405, "method %r is not allowed" % (self.command,)
            if self.request_version == "HTTP/0.9":
                self.request_version = "HTTP/1.0"   # always send a status line
            self.close_connection = True
            data = (_dumps({"error": message or "bad request"}) + "\n").encode("utf-8")
            try:
                self.send_response(code, None)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                if code == 405:
                    self.send_header("Allow", "GET, POST")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            except OSError:
                pass

        def log_message(self, format, *args):
            pass            # quiet: errors reach the client as JSON

    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):    # routed alike
        setattr(Handler, "do_" + method, lambda self, method=method: self.handle_one(method))
    return Handler


# ---------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------
#
# Distributions publish tasks under the entry-point group "pyoco.tasks". An
# entry point names a Task subclass (preferred), a register(registry) hook
# that adds several tasks, or a plain function (accepted, with a warning).
# Nothing is imported until a flow or a command asks for plugins, and a
# plugin that fails to load is reported, never raised at the caller.

PLUGIN_GROUP = "pyoco.tasks"


class PluginWarning(UserWarning):
    """A plugin works but should change (for example: a plain function)."""


class PluginInfo:
    """One task offered by a plugin distribution."""

    __slots__ = ("name", "distribution", "version", "kind", "summary", "entry_point",
                 "target", "problems", "options")

    def __init__(self, name, distribution, version, kind, target, entry_point):
        self.name = name
        self.distribution = distribution
        self.version = version
        self.kind = kind                # "task" (Task subclass) or "function"
        self.target = target
        self.entry_point = entry_point
        self.summary = _summary_of(target)
        self.problems = []              # (level, message) found by lint
        self.options = {}               # task options a hook gave with task_class(...)

    def to_dict(self):
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "kind": self.kind, "summary": self.summary, "entry_point": self.entry_point}

    def __repr__(self):
        return "<plugin %r from %s %s (%s)>" % (self.name, self.distribution, self.version,
                                                self.kind)


def _summary_of(target):
    text = getattr(target, "summary", None) if isinstance(target, type) else None
    if not text:
        doc = getattr(target, "__doc__", None)
        if isinstance(target, type) and doc == Task.__doc__:
            doc = None
        text = (doc or "").strip().split("\n\n")[0].replace("\n", " ").strip()
    return " ".join(str(text).split()) or None


class PluginRegistry:
    """The tasks that installed plugins offer, by name; ``problems`` lists
    what could not be loaded (``(distribution, entry point, message)``)."""

    def __init__(self):
        self.tasks = {}
        self.problems = []
        self.duplicates = {}            # name -> every PluginInfo that claims it
        self._source = None             # (distribution, version, entry point) while loading

    def add(self, task_class_or_function, name=None):
        """Add one task (for ``register(registry)`` hooks): a Task subclass or a function."""
        dist, version, ep = self._source or ("<direct>", None, None)
        target = task_class_or_function
        if isinstance(target, type) and issubclass(target, Task):
            kind = "task"
            name = name or target.name
        elif isinstance(target, FunctionTask):      # an @task function, options and all
            kind = "task"
            name = name or target.name
        elif isinstance(target, Task):
            raise TypeError("registry.add takes a Task subclass, not an instance (%r)" % target)
        elif callable(target):
            kind = "function"
            name = name or getattr(target, "__name__", None)
        else:
            raise TypeError("registry.add takes a Task subclass or a function, not %r"
                            % (target,))
        if not isinstance(name, str) or not name:
            raise ValueError("registry.add: %r needs a name" % (target,))
        info = PluginInfo(name, dist, version, kind, target, ep)
        if kind == "function":
            info.problems.append(("warning", _FUNCTION_ADVICE % {"name": name}))
            import warnings
            warnings.warn("plugin %r from %s is a plain function: " % (name, dist)
                          + _FUNCTION_ADVICE % {"name": name}, PluginWarning, stacklevel=2)
        other = self.tasks.get(name)
        if other is not None:
            self.duplicates.setdefault(name, [other]).append(info)
            message = "two plugins offer a task named %r: %s and %s" % (
                name, ", ".join("%s %s" % (i.distribution, i.version or "")
                                for i in self.duplicates[name][:-1]).strip(),
                ("%s %s" % (dist, version or "")).strip())
            self.problems.append((dist, ep, message))
            return info
        self.tasks[name] = info
        return info

    # The original pyoco's registry methods, so its register(registry) hooks load.

    def task_class(self, task_class, name=None, **options):
        """Add a Task subclass whose nodes get ``options`` (``plugin_task`` may override)."""
        if not (isinstance(task_class, type) and issubclass(task_class, Task)):
            raise TypeError("registry.task_class takes a Task subclass, not %r" % (task_class,))
        unknown = set(options) - set(_OPTIONS) - set(_ALIASES) - {"name"}
        if unknown:
            raise _unknown_options("task", unknown, _OPTIONS + tuple(_ALIASES))
        probe = _plugin_node(task_class, dict(options))     # its name may come from __init__
        info = self.add(task_class, name=name or probe.name)
        info.options = dict(options)
        return info

    def register_callable(self, fn, name=None, **options):
        """Add a function as a task with ``options`` (lint advises a Task subclass)."""
        if not callable(fn) or isinstance(fn, type):
            raise TypeError("registry.register_callable takes a function, not %r" % (fn,))
        node = FunctionTask(getattr(fn, "func", fn), name=name, **options)
        info = self.add(node, name=node.name)
        info.kind = "function"
        info.problems.append(("warning", _FUNCTION_ADVICE % {"name": node.name}))
        return info

    def task(self, name=None, **options):
        """``@registry.task(name=..., retries=...)``: ``register_callable`` as a decorator."""
        if callable(name):              # @registry.task without parentheses
            self.register_callable(name, **options)
            return name

        def register(fn):
            self.register_callable(fn, name=name, **options)
            return fn
        return register

    _INFO_KEYS = ("summary", "description", "version", "tags")

    def task_info(self, name, **info):
        """Describe a task added earlier: ``summary=`` (what ``plugins list`` shows) and
        ``description``, ``version``, ``tags``, kept for the summary when it has none."""
        unknown = set(info) - set(self._INFO_KEYS)
        if unknown:
            first = sorted(unknown)[0]
            raise TypeError("registry.task_info: unknown key %r%s (the keys are: %s)"
                            % (first, _closest(first, self._INFO_KEYS), ", ".join(self._INFO_KEYS)))
        entry = self.tasks.get(name)
        if entry is None:
            raise KeyError("registry.task_info: no task %r added%s (added: %s)" % (
                name, _closest(name, self.tasks), ", ".join(sorted(self.tasks)) or "none"))
        text = info.get("summary") or info.get("description")
        if text:
            entry.summary = " ".join(str(text).split())
        return entry

    def names(self):
        return sorted(self.tasks)

    def get(self, name):
        """The PluginInfo for ``name``; raises FlowError naming what exists."""
        if name in self.duplicates:
            raise FlowError("plugin task %r is ambiguous: offered by %s; uninstall one"
                            % (name, " and ".join(i.distribution for i in self.duplicates[name])))
        info = self.tasks.get(name)
        if info is None:
            for dist, where, message in self.problems:
                if where and where.split(" = ")[0] == name:
                    raise FlowError("plugin task %r (from %s) could not be loaded: %s"
                                    % (name, dist, message))
            import difflib

            close = difflib.get_close_matches(name, self.tasks, n=1)
            raise FlowError("no plugin task %r%s; installed plugin tasks: %s" % (
                name, " (did you mean %r?)" % close[0] if close else "",
                ", ".join(self.names()) or "none (see: pyoco plugins list)"))
        return info


_FUNCTION_ADVICE = ("plain functions are accepted but deprecated; make it a Task subclass,"
                    " e.g. class %(name)s(pyoco.Task): def run(self, ctx, ...): ... and point"
                    " the entry point at the class")


def _entry_points():
    """(distribution, version, entry point) for group pyoco.tasks, once each.

    Walks distributions rather than calling entry_points(group=...), whose
    shape differs on 3.9 and which does not name the distribution there.
    """
    from importlib import metadata
    seen = set()
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"] or "?"
            version = dist.version
            eps = [ep for ep in dist.entry_points if ep.group == PLUGIN_GROUP]
        except Exception:
            continue
        for ep in eps:
            key = (name.lower(), ep.name)
            if key not in seen:
                seen.add(key)
                yield name, version, ep


def load_plugins(refresh=False):
    """The PluginRegistry of installed plugins (loaded once, then cached).

    What plugin modules print while they load goes to stderr, so that
    machine-readable output on stdout stays clean.
    """
    global _registry
    if _registry is not None and not refresh:
        return _registry
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):
        _registry = _load_registry()
    return _registry


def _load_registry():
    registry = PluginRegistry()
    for dist, version, ep in _entry_points():
        where = "%s = %s" % (ep.name, ep.value)
        registry._source = (dist, version, where)
        try:
            target = ep.load()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            registry.problems.append((dist, where, "cannot import %s: %s"
                                      % (ep.value, _describe(exc))))
            continue
        try:
            if isinstance(target, FunctionTask) or (isinstance(target, type)
                                                    and issubclass(target, Task)):
                registry.add(target, name=ep.name)
            elif callable(target) and _is_hook(target):
                target(registry)
            elif callable(target) and not isinstance(target, type):
                registry.add(target, name=ep.name)
            else:
                registry.problems.append((dist, where, "%s is %r (of type %s), not a Task"
                                          " subclass, a register(registry) hook or a function"
                                          % (ep.value, target, type(target).__name__)))
        except Exception as exc:
            registry.problems.append((dist, where, "loading failed: %s" % _describe(exc)))
    registry._source = None
    return registry


def _is_hook(fn):
    try:
        params, _ = _parameters(fn)
    except (TypeError, ValueError):
        return False
    return getattr(fn, "__name__", "") == "register" or [p[0] for p in params] == ["registry"]


def plugin_task(plugin, /, **options):
    """A task node for the installed plugin task ``plugin``.

    Options are task options (``name``, ``retries``, ``inputs``, ...); the
    node is named ``plugin`` unless ``name`` says otherwise. Raises
    FlowError for an unknown or ambiguous name.
    """
    info = load_plugins().get(plugin)
    options.setdefault("name", plugin)
    if isinstance(info.target, FunctionTask):   # its decorator's options, then these
        base = info.target
        merged = {key: getattr(base, key) for key in _OPTIONS if key != "name"}
        merged["inputs"] = dict(base.inputs or {})
        merged.update(options)
        return FunctionTask(base.func, **merged)
    if info.kind == "task":
        return _plugin_node(info.target, dict(info.options, **options))
    return FunctionTask(info.target, **options)


def _plugin_node(cls, options):
    """A node of plugin class ``cls`` with ``options``. A class whose ``__init__``
    takes none (the original's style: ``super().__init__(func=self.run, name=...)``)
    is made without them, then given them."""
    init = cls.__init__
    if init is not Task.__init__:
        params, varkw = _parameters(init)
        if not varkw and not set(options) <= {p[0] for p in params}:
            node = cls()
            for key, value in options.items():
                setattr(node, key, value)
            return node
    return cls(**options)


def lint_plugins(registry=None):
    """Problems with installed plugins: a list of dicts with level, plugin,
    distribution and message. Errors: load failures and duplicates;
    warnings: plain functions, missing summaries, run signatures pyoco
    cannot wire."""
    registry = registry or load_plugins()
    found = []
    for dist, where, message in registry.problems:
        found.append({"level": "error", "plugin": where.split(" = ")[0] if where else None,
                      "distribution": dist, "message": message})
    for name in registry.names():
        info = registry.tasks[name]
        for level, message in info.problems:
            found.append({"level": level, "plugin": name, "distribution": info.distribution,
                          "message": message})
        if not info.summary:
            found.append({"level": "warning", "plugin": name, "distribution": info.distribution,
                          "message": "no description: give the class a docstring or a"
                                     " `summary` attribute"})
        problem = _wiring_problem(info)
        if problem:
            found.append({"level": problem[0], "plugin": name, "distribution": info.distribution,
                          "message": problem[1]})
    return found


def _wiring_problem(info):
    """(level, message) when pyoco cannot call the plugin's task well, else None."""
    target = info.target
    label = info.name
    method = False
    if isinstance(target, FunctionTask):
        target = target.func
    elif info.kind == "task":
        if target.run is Task.run:
            return "error", "%s does not implement run(self, ctx, **inputs)" % target.__name__
        target, label, method = target.run, "%s.run" % target.__name__, True
    code = getattr(target, "__code__", None)
    if code is not None and code.co_flags & 0x04:
        return "error", "%s takes *args, which pyoco cannot fill by name" % label
    try:
        params, _ = _parameters(target)
    except (TypeError, ValueError) as exc:
        return "error", "cannot read the signature of %s: %s" % (label, exc)
    names = [p[0] for p in params][1 if method else 0:]
    if not names or names[0] != "ctx":
        return "warning", "%s does not take ctx first; tasks are run(self, ctx, **inputs)" % label
    return None


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

class UsageError(PyocoError):
    """Bad command-line input: exits 2 with the message."""


def _load_target(target):
    """Import a flow file (or package.module) and return its module namespace."""
    import importlib.util
    if target.endswith(".py") or os.sep in target or (os.altsep and os.altsep in target):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise UsageError("flow file %s: no such file" % target)
        dotted, root = _package_module(path)
        _add_flow_folder(os.path.dirname(path))     # for its sibling imports
        if dotted and _on_path(root):       # its relative imports work only as that module
            module_name = dotted

            def load():
                return importlib.import_module(dotted)
        else:
            module_name = _flow_module_name(path)
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module

            def load():
                spec.loader.exec_module(module)
                return module
        try:
            return load()
        except SyntaxError as exc:
            sys.modules.pop(module_name, None)
            raise UsageError("%s:%s: syntax error: %s" % (exc.filename or target, exc.lineno,
                                                          exc.msg)) from None
        except FlowError as exc:
            sys.modules.pop(module_name, None)
            raise UsageError("%s:%s: %s" % (target, _failing_line(exc, path), exc)) from None
        except BaseException as exc:        # SystemExit too: a flow file may not end us
            sys.modules.pop(module_name, None)
            if isinstance(exc, KeyboardInterrupt):
                raise
            hint = ""
            if isinstance(exc, ImportError) and "relative import" in str(exc):
                hint = ("; run it as a module of its package instead: `pyoco run %s:flow`"
                        " in %s" % (dotted, root) if dotted else
                        "; its folder is not a package (no __init__.py): use absolute imports")
            raise UsageError("%s:%s: loading the flow file raised %s%s"
                             % (target, _failing_line(exc, path), _describe(exc), hint)) from None
    _cwd_on_path()
    try:
        return importlib.import_module(target)

    except ImportError as exc:
        raise UsageError("cannot import %r: %s (a flow is FILE.py or package.module:NAME)"
                         % (target, exc)) from None
    except SyntaxError as exc:
        raise UsageError("%s:%s: syntax error: %s" % (exc.filename, exc.lineno, exc.msg)) from None
    except (Exception, SystemExit) as exc:
        raise UsageError("importing %r raised %s" % (target, _describe(exc))) from None


def _cwd_on_path():
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())     # as python -m does: `pyoco run pkg.mod:flow` finds pkg here


def _package_module(path):
    """(dotted module name, folder it is found from) for a .py file inside a
    package (folders with __init__.py), else (None, None)."""
    folder, parts = os.path.dirname(path), [os.path.splitext(os.path.basename(path))[0]]
    while os.path.isfile(os.path.join(folder, "__init__.py")):
        folder, name = os.path.split(folder)
        parts.insert(0, name)
    if len(parts) == 1 or not all(part.isidentifier() for part in parts):
        return None, None
    return ".".join(parts), folder


def _on_path(folder):
    """Whether modules in ``folder`` are importable: it is the working
    directory (which then goes on sys.path, as python -m puts it) or on sys.path."""
    real = os.path.realpath(folder)
    if real == os.path.realpath(os.getcwd()):
        _cwd_on_path()
        return True
    return any(os.path.realpath(entry or os.curdir) == real for entry in sys.path)


def _flow_module_name(path):
    """A module name for a flow file that shadows nothing and no other flow file."""
    stem = "".join(c if c.isalnum() else "_"
                   for c in os.path.splitext(os.path.basename(path))[0])
    name, n = "pyoco_flow_" + stem, 1
    while getattr(sys.modules.get(name), "__file__", path) != path:
        n += 1
        name = "pyoco_flow_%s_%d" % (stem, n)
    return name


def _add_flow_folder(folder):
    """Put a flow file's folder on sys.path for its sibling imports, after the
    standard library: a flows/queue.py must not replace the queue module."""
    if folder in sys.path:
        return
    stdlib = os.path.dirname(os.__file__)
    at = len(sys.path)
    for n, entry in enumerate(sys.path):
        full = os.path.abspath(entry or os.curdir)
        if full == stdlib or (full.startswith(stdlib + os.sep) and "-packages" not in full):
            at = n + 1
    sys.path.insert(at, folder)


def _failing_line(exc, path):
    tb, line = exc.__traceback__, "?"
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def load_flow(target, name=None):
    """The Flow named by ``target`` (``FILE.py``, ``package.module`` or ``...:NAME``).

    ``name`` (or ``:NAME``) picks a flow by its variable or its Flow name
    when the module defines several. Raises UsageError when it cannot.
    """
    if target.endswith((".yaml", ".yml")):
        return _load_yaml_flow(target, name)
    if ":" in target and not os.path.exists(target):
        target, _, picked = target.rpartition(":")
        name = name or picked
    flows = _module_flows(_load_target(target))

    if name is not None:
        for var, flow in flows:
            if name in (var, flow.name):
                return flow
        raise UsageError("%s has no flow %r; its flows: %s" % (
            target, name, ", ".join(_flow_label(v, f) for v, f in flows) or "none"))
    if not flows:
        raise UsageError("%s defines no Flow (expected a module-level variable such as"
                         " flow = Flow(name=...))" % target)
    if len(flows) > 1:
        raise UsageError("%s defines several flows: %s; pick one with --flow NAME"
                         % (target, ", ".join(_flow_label(v, f) for v, f in flows)))
    return flows[0][1]


# The original pyoco's YAML flow files (SPEC section 15): tasks by "module:function",
# task modules to import, and graphs of >> chains. The graph is parsed here, never
# evaluated: a line is NAME, "(a & b)" or "(a | b)" terms joined by ">>".

_YAML_KEYS = ("version", "discovery", "tasks", "flows", "flow")
_YAML_DISCOVERY = ("glob_modules", "packages", "entry_points")
_YAML_FLOW_KEYS = ("graph", "defaults", "name")
_YAML_TASK_KEYS = ("callable",) + tuple(k for k in _OPTIONS if k != "name") + tuple(_ALIASES)


def _yaml_documents(path):
    """The YAML file's data and its node tree (for line numbers); UsageError when bad."""
    import importlib
    try:
        yaml = importlib.import_module("yaml")     # optional: only YAML flow files need it
    except ImportError:
        raise UsageError("%s: YAML flow files need PyYAML, which is not installed:"
                         " pip install pyyaml (or write the flow in Python)" % path) from None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UsageError("flow file %s: %s" % (path, exc.strerror or exc)) from None
    try:
        return yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = ":%d" % (mark.line + 1) if mark is not None else ""
        raise UsageError("%s%s: not valid YAML: %s" % (path, where, _one_line(
            getattr(exc, "problem", None) or exc))) from None


def _yaml_line(tree, *keys):
    """The file line (1-based) where the value at ``keys`` starts, or None."""
    node = tree
    for key in keys:
        if getattr(node, "id", None) != "mapping":
            return None
        node = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
        if node is None:
            return None
    block = getattr(node, "style", None) in ("|", ">")
    return node.start_mark.line + (2 if block else 1)


def _yaml_section(path, where, value, keys, kind=dict):
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise UsageError("%s: %s must be %s, not %s" % (path, where, _JSON_KINDS.get(
            kind, kind.__name__), _JSON_KINDS.get(type(value), type(value).__name__)))
    if kind is dict and keys is not None:
        for key in value:
            if key not in keys:
                raise UsageError("%s: unknown key %r in %s%s (the keys are: %s)"
                                 % (path, key, where, _closest(key, keys), ", ".join(keys)))
    return value


def _yaml_modules(path, discovery):
    """Import the task modules ``discovery`` names; their tasks by variable and name."""
    import glob
    import importlib
    _cwd_on_path()
    found = {}
    modules = []
    for key in _YAML_DISCOVERY:
        entries = _yaml_section(path, "discovery.%s" % key, discovery.get(key), None, list)
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise UsageError("%s: discovery.%s entries are strings, not %r"
                                 % (path, key, entry))
            if key != "glob_modules" or not (entry.endswith(".py") or "*" in entry
                                             or "/" in entry):
                modules.append((entry, None))      # a module name, as in glob_modules: [tasks]
                continue
            files = sorted(glob.glob(entry, recursive=True))
            if not any(f.endswith(".py") for f in files):
                raise UsageError("%s: discovery.glob_modules %r matches no .py file (paths"
                                 " are relative to the working directory, %s)"
                                 % (path, entry, os.getcwd()))
            for file in files:
                if file.endswith(".py"):
                    rel = os.path.relpath(file)
                    dotted = rel[:-3].replace(os.sep, ".")
                    ok = not rel.startswith("..") and all(p.isidentifier()
                                                          for p in dotted.split("."))
                    modules.append((dotted if ok else file, file))
    for name, file in modules:
        where = "discovery: %s" % (file or name)
        if file is not None and not name.replace(".", "").isidentifier():
            module = _load_target(file)
        else:
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                raise UsageError("%s: %s: cannot import %r: %s" % (path, where, name, exc)) from None
            except Exception as exc:
                raise UsageError("%s: %s: importing %r raised %s"
                                 % (path, where, name, _describe(exc))) from None
        for var, value in vars(module).items():
            if isinstance(value, Task) and not var.startswith("_"):
                found.setdefault(var, value)
                found.setdefault(value.name, value)
    return found


def _yaml_callable(path, name, spec):
    import importlib
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr:
        raise UsageError("%s: tasks.%s.callable must be \"module:function\", not %r"
                         % (path, name, spec))
    _cwd_on_path()
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError("%s: tasks.%s.callable %r: cannot import %r: %s"
                         % (path, name, spec, module_name, exc)) from None
    except Exception as exc:
        raise UsageError("%s: tasks.%s.callable %r: importing %r raised %s"
                         % (path, name, spec, module_name, _describe(exc))) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError("%s: tasks.%s.callable %r: module %r has no %r"
                             % (path, name, spec, module_name, attr)) from None
    return obj


def _yaml_node(path, name, obj, conf):
    """A fresh node named ``name`` for ``obj`` (an @task function, a Task, a Task
    subclass or a function) with the options of its ``tasks:`` entry."""
    import copy
    if isinstance(obj, FunctionTask):
        options = {key: getattr(obj, key) for key in _OPTIONS if key != "name"}
        options["inputs"] = dict(obj.inputs or {})
        node = FunctionTask(obj.func, name=name, **options)
    elif isinstance(obj, Task):
        node = copy.copy(obj)
        node.name = name
    elif isinstance(obj, type) and issubclass(obj, Task):
        node = obj(name=name)
    elif callable(obj):
        node = FunctionTask(obj, name=name)
    else:
        raise UsageError("%s: task %r is %r, not a task or a function" % (path, name, obj))
    for key, value in conf.items():
        if key == "inputs":
            node.inputs = dict(node.inputs, **_yaml_section(path, "tasks.%s.inputs" % name,
                                                            value, None))
        elif key != "callable":
            try:
                setattr(node, key, value)
            except (TypeError, ValueError) as exc:
                raise UsageError("%s: tasks.%s.%s: %s" % (path, name, key, exc)) from None
    return node


def _graph_lines(text):
    """The graph's chains as (line number, text): comments dropped; a chain goes on
    to the next line while a parenthesis is open or the line ends with >>."""
    chains, pending, start = [], "", 0
    for number, line in enumerate(str(text).splitlines(), 1):
        code = line.split("#", 1)[0].strip()
        if not code:
            continue
        if not pending:
            start = number
        pending = (pending + " " + code).strip()
        if pending.count("(") > pending.count(")") or pending.endswith(">>"):
            continue
        chains.append((start, pending))
        pending = ""
    if pending:
        chains.append((start, pending))
    return chains


def _graph_terms(chain, problem):
    """``a >> (b & c) >> (d | e)`` as [(["a"], ""), (["b", "c"], "&"), (["d", "e"], "|")]."""
    import re
    tokens = re.findall(r"\s*(>>|[&|()]|[A-Za-z_][A-Za-z0-9_]*|\S)", chain)
    terms, n = [], 0

    def expect_term(n):
        if n >= len(tokens):
            problem("the chain ends after >>; a task name or (group) must follow")
        token = tokens[n]
        if token == "(":
            names, ops, n = [], set(), n + 1
            while True:
                if n >= len(tokens) or not tokens[n].isidentifier():
                    problem("expected a task name inside ( ), got %r"
                            % (tokens[n] if n < len(tokens) else "the end of the line"))
                names.append(tokens[n])
                n += 1
                if n < len(tokens) and tokens[n] == ")":
                    break
                if n >= len(tokens) or tokens[n] not in ("&", "|"):
                    problem("expected & or | or ) after %r, got %r" % (
                        names[-1], tokens[n] if n < len(tokens) else "the end of the line"))
                ops.add(tokens[n])
                n += 1
            if len(ops) > 1:
                problem("a group mixes & and |; write (a & b) or (a | b)")
            return (names, ops.pop() if ops else ""), n + 1
        if token.isidentifier():
            return ([token], ""), n + 1
        problem("unexpected %r; a graph line is task names joined by >>, with (a & b)"
                " groups and (a | b) OR-joins" % token)

    while True:
        term, n = expect_term(n)
        terms.append(term)
        if n >= len(tokens):
            return terms
        if tokens[n] in ("&", "|"):
            problem("put the group in parentheses: (a %s b); %s binds looser than >>"
                    % (tokens[n], tokens[n]))
        if tokens[n] != ">>":
            problem("expected >> after %r, got %r" % (" ".join(term[0]), tokens[n]))
        n += 1


def _yaml_flow(path, flow_name, conf, nodes_for, graph_line):
    """Build flow ``flow_name`` from its graph; ``nodes_for(name)`` gives a task's node."""
    flow = Flow(name=flow_name)
    graph = conf.get("graph")
    if not isinstance(graph, str) or not graph.strip():
        raise UsageError("%s: flow %r needs a graph: lines such as a >> (b & c) >> d"
                         % (path, flow_name))
    for number, chain in _graph_lines(graph):
        where = "%s:%s: flow %r graph line %d %r" % (
            path, graph_line + number - 1 if graph_line else "?", flow_name, number, chain)

        def problem(message):
            raise UsageError("%s: %s" % (where, message))
        terms = _graph_terms(chain, problem)
        if terms[0] == (["flow"], "") and len(terms) > 1 and "flow" not in nodes_for.known:
            terms = terms[1:]           # "flow >> a >> b", as the original wrote it too
        tails, any_join = [], False
        for names, op in terms:
            heads = [nodes_for(name, problem) for name in names]
            for node in heads:
                try:
                    flow.add(node, after=tails)
                except FlowError as exc:        # a >> a
                    problem(str(exc))
                if any_join:
                    node.run_if = "any_succeeded"
            tails, any_join = heads, op == "|"
    return flow


def _load_yaml_flow(path, name=None):
    """Flow ``name`` (or the only one) of an original-pyoco YAML file, its parameter
    defaults in ``flow._defaults``. Raises UsageError naming the file, key or line."""
    data, tree = _yaml_documents(path)
    data = _yaml_section(path, "the file", data, _YAML_KEYS)
    if data.get("flows") is not None and data.get("flow") is not None:
        raise UsageError("%s: has both flows: and flow:; use one" % path)
    if data.get("flow") is not None:
        conf = _yaml_section(path, "flow", data["flow"], _YAML_FLOW_KEYS)
        confs = {str(conf.get("name") or "main"): (conf, ("flow", "graph"))}
    else:
        confs = {}
        for key, conf in _yaml_section(path, "flows", data.get("flows"), None).items():
            confs[str(key)] = (_yaml_section(path, "flows.%s" % key, conf, ("graph", "defaults")),
                               ("flows", key, "graph"))
    if not confs:
        raise UsageError("%s defines no flow (expected flows: NAME: {graph: ...})" % path)
    if name is None and len(confs) > 1:
        raise UsageError("%s defines several flows: %s; pick one with --flow NAME"
                         % (path, ", ".join(confs)))
    if name is not None and name not in confs:
        raise UsageError("%s has no flow %r%s; its flows: %s"
                         % (path, name, _closest(name, confs), ", ".join(confs)))
    name = name if name is not None else next(iter(confs))
    conf, keys = confs[name]
    defaults = _yaml_section(path, "flow %r defaults" % name, conf.get("defaults"), None)
    tasks_conf = _yaml_section(path, "tasks", data.get("tasks"), None)
    discovered = _yaml_modules(path, _yaml_section(path, "discovery", data.get("discovery"),
                                                   _YAML_DISCOVERY))
    nodes = {}

    def nodes_for(task_name, problem):
        node = nodes.get(task_name)
        if node is None:
            entry = _yaml_section(path, "tasks.%s" % task_name, tasks_conf.get(task_name),
                                  _YAML_TASK_KEYS)
            if entry.get("callable") is not None:
                obj = _yaml_callable(path, task_name, entry["callable"])
            elif task_name in discovered:
                obj = discovered[task_name]
            else:
                known = sorted(set(tasks_conf) | set(discovered))
                problem("no task %r%s (tasks: %s)" % (task_name, _closest(task_name, known),
                                                      ", ".join(known) or "none"))
            node = nodes[task_name] = _yaml_node(path, task_name, obj, entry)
        return node
    nodes_for.known = set(tasks_conf) | set(discovered)

    flow = _yaml_flow(path, name, conf, nodes_for, _yaml_line(tree, *keys))
    flow._defaults = dict(defaults)
    return flow


def _module_flows(module):
    """The module's Flow objects as (variable, flow), each flow once."""
    found = {}
    for var, value in vars(module).items():
        if isinstance(value, _Chain):       # flow = Flow() >> a >> b: the flow it built
            value = value.flow
        if isinstance(value, Flow) and not var.startswith("_"):
            found.setdefault(id(value), (var, value))
    return list(found.values())


def _flow_label(var, flow):

    return var if var == flow.name else "%s (variable %s)" % (flow.name, var)


def _parse_params(pairs):
    params = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError("bad -p %r: expected KEY=VALUE, for example -p day=2026-11-29" % pair)
        try:
            params[key.strip()] = _loads(value)     # -p x=NaN is the string "NaN"
        except ValueError:
            params[key.strip()] = value
    return params


def render_graph(flow, fmt="text"):
    """The flow's DAG as text, Mermaid or Graphviz dot (a str); a task's
    run_if, when, pool and max_parallel are shown with it."""
    plan = flow._compile()
    names = plan.names
    labels = [" ".join([name] + ["[%s]" % w for w in _task_rules(plan, i)])
              for i, name in enumerate(names)]
    if fmt == "mermaid":
        ids = {name: "t%d" % i for i, name in enumerate(names)}
        lines = ["flowchart TD"]
        for i, name in enumerate(names):
            lines.append('    %s["%s"]' % (ids[name], labels[i].replace('"', "#quot;")))
        for i, ups in enumerate(plan.preds):
            for up in ups:
                lines.append("    %s --> %s" % (ids[names[up]], ids[names[i]]))
        return "\n".join(lines) + "\n"
    if fmt == "dot":
        def q(text):
            return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')
        lines = ["digraph %s {" % q(flow.name), "    rankdir=LR;"]
        for i, name in enumerate(names):
            lines.append("    %s;" % q(name) if labels[i] == name else
                         "    %s [label=%s];" % (q(name), q(labels[i])))
        for i, ups in enumerate(plan.preds):
            for up in ups:
                lines.append("    %s -> %s;" % (q(names[up]), q(names[i])))
        return "\n".join(lines + ["}"]) + "\n"
    lines = ["flow %s (%d task%s)" % (flow.name, len(names), "" if len(names) == 1 else "s")]
    for name in _topological(plan):
        i = plan.index[name]
        ups = plan.preds[i]
        lines.append("  %s%s" % (labels[i], " <- " + ", ".join(names[u] for u in ups)
                                 if ups else ""))
    return "\n".join(lines) + "\n"


def _topological(plan):
    from graphlib import TopologicalSorter
    order = TopologicalSorter({i: ups for i, ups in enumerate(plan.preds)}).static_order()
    return [plan.names[i] for i in order]


def _build_parser():
    import argparse
    store_help = "the run store folder (default: $PYOCO_HOME, else ./.pyoco)"
    executor_help = ("where tasks run: thread (default), process, dask, dask://HOST:PORT, ray,"
                     " ray://HOST:PORT or MODULE:NAME (default: $PYOCO_EXECUTOR, else thread)")
    parser = argparse.ArgumentParser(
        prog="pyoco", description="Run and inspect pyoco flows.",
        epilog="Exit codes: 0 success, 1 a run failed or check found problems,"
               " 2 usage error, 130 cancelled.")
    parser.add_argument("--version", action="version", version="pyoco " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser("run", help="run a flow", description="Run a flow file's flow.")
    run.add_argument("target", metavar="FLOW", nargs="?",
                     help="FLOW.py, package.module[:NAME] or an original-pyoco flow.yaml")
    run.add_argument("--config", metavar="FLOW.yaml", help="the flow file, as the original"
                     " pyoco took its YAML files (same as giving FLOW)")
    run.add_argument("--flow", help="which flow, by Flow name or variable")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a run parameter; VALUE is JSON when it parses, else a string")
    run.add_argument("--workers", type=int, default=8, help="parallel tasks (default 8)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--cute", dest="cute", action="store_true", default=None,
                      help="emoji trace (the default)")
    mode.add_argument("--non-cute", dest="cute", action="store_false",
                      help="plain ASCII trace for CI logs")
    run.add_argument("--progress", choices=("on", "off"),
                     help="on a terminal, each running map is one line redrawn in place"
                          " (default: on, unless PYOCO_PROGRESS=0); off: a line per event")
    run.add_argument("--resume", metavar="RUN_ID",
                     help="run a FAILED or CANCELLED run again, reusing what succeeded")
    run.add_argument("--pool", action="append", default=[], metavar="NAME=SIZE",
                     help="the size of a pool, over the flow's (repeatable)")
    run.add_argument("--store", metavar="DIR", help=store_help)
    run.add_argument("--only", action="append", default=[], metavar="NAME",
                     help="run only this task and the upstream tasks it needs (repeatable)")
    run.add_argument("--from", dest="rerun_from", action="append", default=[], metavar="NAME",
                     help="run this task and everything downstream, reusing the other"
                          " tasks' stored outputs (repeatable)")
    run.add_argument("--plan", action="store_true",
                     help="say what the run would do, per task; nothing runs or is written")
    run.add_argument("--json", action="store_true", help="with --plan: the plan as JSON")
    run.add_argument("--executor", metavar="SPEC", help=executor_help)

    check = commands.add_parser("check", help="validate a flow without running it",
                                description="Validate a flow; nothing runs.")
    check.add_argument("target", metavar="FLOW", nargs="?")
    check.add_argument("--config", metavar="FLOW.yaml", help="the flow file (same as FLOW)")
    check.add_argument("--flow")
    check.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--json", action="store_true", help="machine-readable result")

    graph = commands.add_parser("graph", help="print a flow's DAG",
                                description="Print a flow's DAG.")
    graph.add_argument("target", metavar="FLOW", nargs="?")
    graph.add_argument("--config", metavar="FLOW.yaml", help="the flow file (same as FLOW)")
    graph.add_argument("--flow")
    graph.add_argument("--format", choices=("text", "mermaid", "dot"), default="text")

    runs = commands.add_parser("runs", help="list, inspect and cancel recorded runs",
                               description="Read the run store.")
    runs_commands = runs.add_subparsers(dest="runs_command", metavar="COMMAND")
    runs_commands.required = True
    listing = runs_commands.add_parser("list", help="recent runs, newest first",
                                       description="List recorded runs, newest first.")
    listing.add_argument("--status", choices=(RunState.PENDING, RunState.RUNNING,
                                              RunState.COMPLETED, RunState.FAILED,
                                              RunState.CANCELLING, RunState.CANCELLED))
    listing.add_argument("--flow", help="only runs of this flow")
    listing.add_argument("--limit", type=int, default=20, help="at most N runs (default 20)")
    listing.add_argument("--json", action="store_true", help="the records as a JSON list")
    show = runs_commands.add_parser("show", help="one run in detail",
                                    description="Show one run's record.")
    show.add_argument("run_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="the full record as JSON")
    logs = runs_commands.add_parser("logs", help="what a run's tasks printed",
                                    description="Print a run's task logs.")
    logs.add_argument("run_id", metavar="ID")
    logs.add_argument("--task", help="only this task")
    logs.add_argument("--tail", type=int, default=100, help="the last N lines (default 100)")
    cancel = runs_commands.add_parser("cancel", help="ask a running run to stop",
                                      description="Cancel a run from another process.")
    cancel.add_argument("run_id", metavar="ID")
    for sub in (listing, show, logs, cancel):
        sub.add_argument("--store", metavar="DIR", help=store_help)

    serve = commands.add_parser(
        "serve", help="serve /metrics and the JSON run API",
        description="Serve Prometheus /metrics and the JSON run API over the run store."
                    " FLOW files given here can be started with POST /runs.")
    serve.add_argument("flows", nargs="*", metavar="FLOW.py", help="flows POST /runs may start")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080,
                       help="port (default 8080; 0 picks a free one)")
    serve.add_argument("--store", metavar="DIR", help=store_help)
    serve.add_argument("--progress", choices=("on", "off"),
                       help="progress lines for the runs it starts, as for run")
    serve.add_argument("--no-schedule", dest="schedule", action="store_false",
                       help="do not start the flows' scheduled runs (POST /runs still can)")
    serve.add_argument("--executor", metavar="SPEC",
                       help=executor_help + "; opened once and shared by the runs it starts")

    plugins = commands.add_parser("plugins", help="installed plugin tasks",
                                  description="Plugin tasks published under the entry-point"
                                              " group pyoco.tasks.")
    plugin_commands = plugins.add_subparsers(dest="plugins_command", metavar="COMMAND")
    plugin_commands.required = True
    for verb, text in (("list", "one row per plugin task"),
                       ("lint", "report load errors and tasks that should change;"
                                " exits 1 when it finds problems")):
        sub = plugin_commands.add_parser(verb, help=text, description=text)
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _parse_pool_sizes(pairs):
    """--pool NAME=SIZE values as {NAME: SIZE}; UsageError says which one is bad."""
    sizes = {}
    for pair in pairs:
        name, sep, size = pair.partition("=")
        if not sep or not name or not size.strip().isdigit() or int(size) < 1:
            raise UsageError("--pool %r: write NAME=SIZE with a whole number >= 1, as in"
                             " --pool api=4" % pair)
        sizes[name] = int(size)
    return sizes


_PROGRESS_FLAG = {None: None, "on": True, "off": False}     # --progress -> Engine(progress=)


def _cli_flow(args):
    """The flow FLOW (or --config FILE) names, and its parameter defaults (YAML files')."""
    if args.config is not None and args.target is not None:
        raise UsageError("pyoco %s: give the flow file once: FLOW or --config FILE, not both"
                         % args.command)
    args.target = args.target if args.target is not None else args.config
    if args.target is None:
        raise UsageError("pyoco %s needs a flow: FLOW.py, package.module:NAME or"
                         " --config flow.yaml" % args.command)
    flow = load_flow(args.target, args.flow)
    return flow, dict(getattr(flow, "_defaults", None) or {})


def _cli_executor(args):
    """The executor SPEC: --executor, else $PYOCO_EXECUTOR, else thread."""
    spec, where = args.executor, "--executor"
    if spec is None:
        spec, where = os.environ.get("PYOCO_EXECUTOR", "").strip() or "thread", \
            "PYOCO_EXECUTOR"
    try:
        return _check_executor(spec)
    except ValueError as exc:
        raise UsageError("%s: %s" % (where, exc)) from None


def _cmd_run(args):
    if args.workers < 1:
        raise UsageError("--workers must be at least 1, not %d" % args.workers)
    params = _parse_params(args.param)
    executor = _cli_executor(args)
    flow, defaults = _cli_flow(args)
    params = dict(defaults, **params)
    engine = Engine(workers=args.workers, cute=args.cute, store=_cli_store(args),
                    pools=_parse_pool_sizes(args.pool),
                    progress=_PROGRESS_FLAG[args.progress], executor=executor)
    if args.json and not args.plan:
        raise UsageError("--json goes with --plan (pyoco run FLOW --plan --json)")
    targets = {"only": args.only or None, "rerun_from": args.rerun_from or None}
    try:
        if args.plan:
            _print_plan(engine.plan(flow, params, resume=args.resume, **targets), args.json)
            return 0
        engine.run(flow, params, resume=args.resume, **targets)
    except FlowError as exc:            # raised before any task runs
        raise UsageError("%s: %s" % (args.target, exc)) from None
    except RunFailed as exc:
        _write_line(None, "pyoco: %s\n" % exc)
        return 1
    except RunCancelled as exc:
        _write_line(None, "pyoco: %s\n" % exc)
        return 130
    return 0


def _print_plan(entries, as_json):
    """`pyoco run --plan`: ACTION  TASK  REASON lines under a header, or a JSON list."""
    if as_json:
        _write_line(sys.stdout, _dumps(entries, indent=2) + "\n")
        return
    width = max([len(e["task"]) for e in entries] + [4])
    lines = ["%-8s %-*s  %s" % ("ACTION", width, "TASK", "REASON")]
    lines += ["%-8s %-*s  %s" % (e["action"], width, e["task"], e["reason"]) for e in entries]
    _write_line(sys.stdout, "\n".join(lines) + "\n")


def _rules_report(flow):
    """Task name -> what decides whether it starts (run_if, when, pool), for tasks with any."""
    plan = flow._compile()
    return {name: _task_rules(plan, i) for i, name in enumerate(plan.names)
            if _task_rules(plan, i)}


def _cmd_check(args):
    params = _parse_params(args.param)
    flow, defaults = _cli_flow(args)
    params = dict(defaults, **params)
    problems, needs = [], []
    try:
        needs = flow.validate(params if args.param else None)
        needs = [(name, p) for name, p in needs if p not in defaults]
    except FlowError as exc:
        problems.append(str(exc))
    schedule = flow._schedule
    next_runs = schedule.upcoming(3, time.time()) if schedule is not None else []
    if args.json:
        report = {"ok": not problems, "flow": flow.name, "problems": problems,
                  "tasks": [n.name for n in flow.tasks] if not problems else [],
                  "needs_params": sorted({p for _, p in needs}),
                  "pools": {} if problems else {
                      name: dict(zip(("size", "rate"), (size, flow.pools[name].get("rate")
                                                        if isinstance(flow.pools[name], dict)
                                                        else None)))
                      for name, (size, _) in _parse_pools(flow.pools, flow.name).items()},
                  "rules": _rules_report(flow) if not problems else {},
                  "schedule": flow.schedule, "next_runs": [_iso(ts) for ts in next_runs]}
        _print_json(report)
    elif problems:
        for problem in problems:
            print("problem: %s" % problem)
    else:
        print("ok: flow %s, %d task%s" % (flow.name, len(flow), "" if len(flow) == 1 else "s"))
        if flow.schedule is not None:
            print("  schedule: %s (%s); next: %s" % (
                flow.schedule, flow.schedule_tz or "local time", ", ".join(
                    _iso(ts) for ts in next_runs) or "never"))
        for name, words in _rules_report(flow).items():
            print("  %s: %s" % (name, ", ".join(words)))
        for task_name, pname in needs:
            print("  needs run parameter %r (for task %r): pass -p %s=..."
                  % (pname, task_name, pname))
    return 1 if problems else 0


def _cmd_graph(args):
    flow, _ = _cli_flow(args)
    try:
        sys.stdout.write(render_graph(flow, args.format))
    except FlowError as exc:
        raise UsageError("%s: %s" % (args.target, exc)) from None
    return 0


def _cli_store(args):
    return RunStore(args.store or os.environ.get("PYOCO_HOME") or ".pyoco")


def _known_record(store, run_id):
    record = store.get(run_id)
    if record is None:
        raise UsageError("no run %r in %s (see: pyoco runs list)" % (run_id, store.root))
    return record


def _cmd_runs(args):
    store = _cli_store(args)
    if args.runs_command == "list":
        if args.limit < 1:
            raise UsageError("--limit must be at least 1, not %d" % args.limit)
        records = store.list(status=args.status, flow=args.flow, limit=args.limit)
        if args.json:
            _print_json(records)
            return 0
        rows = [("RUN ID", "FLOW", "STATUS", "STARTED (UTC)", "DURATION", "NOTE")]
        for r in records:
            failed = [n for n, t in (r.get("tasks") or {}).items()
                      if t.get("state") == TaskState.FAILED]
            note = ("failed: " + ", ".join(failed)) if failed else (r.get("reason") or "")
            rows.append((r["run_id"], r.get("flow") or "", r.get("status") or "",
                         (r.get("started_at") or "")[:19].replace("T", " "),
                         _ms(r["duration_ms"] / 1000) if r.get("duration_ms") is not None
                         else "-", note))
        if len(rows) == 1:
            print("no runs in %s" % store.root)
        else:
            print(_table(rows))
        return 0
    record = _known_record(store, args.run_id)
    if args.runs_command == "show":
        if args.json:
            _print_json(record)
            return 0
        print("run %s  flow %s  %s" % (record["run_id"], record["flow"], record["status"]))
        print("started %s  ended %s  duration %s" % (
            record.get("started_at"), record.get("ended_at"),
            _ms(record["duration_ms"] / 1000) if record.get("duration_ms") is not None else "-"))
        for key in ("params", "reason", "resumed_from", "scheduled_for"):
            if record.get(key):
                print("%s: %s" % (key, _dumps(record[key]) if key == "params" else record[key]))
        rows = [("TASK", "STATE", "ATTEMPTS", "DURATION", "NOTE")]
        for name, t in (record.get("tasks") or {}).items():
            rows.append((name, t.get("state"), str(t.get("attempts")),
                         _ms(t["duration_ms"] / 1000) if t.get("duration_ms") is not None
                         else "-", t.get("error") or t.get("reason") or ""))
        print(_table(rows))
        for name, t in (record.get("tasks") or {}).items():
            if t.get("traceback"):
                print("\n--- %s ---\n%s" % (name, t["traceback"].rstrip()))
        return 0
    if args.runs_command == "logs":
        if args.tail < 1:
            raise UsageError("--tail must be at least 1, not %d" % args.tail)
        if args.task is not None and args.task not in (record.get("tasks") or {}):
            raise UsageError("run %s has no task %r; its tasks: %s"
                             % (args.run_id, args.task, ", ".join(record.get("tasks") or {})))
        for line in store.logs(args.run_id, task=args.task, tail=args.tail):
            print("%s %s %s | %s" % (line.get("ts"), line.get("task"), line.get("stream"),
                                     line.get("text")))
        return 0
    # cancel
    if record["status"] not in (RunState.RUNNING, RunState.CANCELLING):
        _write_line(None, "pyoco runs cancel: run %s already ended %s; nothing to cancel\n"
                    % (args.run_id, record["status"]))
        return 1
    store.request_cancel(args.run_id)
    print("cancel requested for run %s" % args.run_id)
    return 0


def _cmd_serve(args):
    import signal
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be from 0 to 65535, not %d" % args.port)
    store = _cli_store(args)
    executor = _cli_executor(args)
    flows, files = {}, {}
    for target in args.flows:
        for var, flow in _module_flows(_load_target(target)):
            if flows.setdefault(flow.name, flow) is not flow:
                raise UsageError("two flows are named %r; give one another name" % flow.name)
            files[flow.name] = target
    engine = Engine(store=store, progress=_PROGRESS_FLAG[args.progress], executor=executor)
    try:
        server = Server(store, host=args.host, port=args.port, flows=flows, files=files,
                        engine=engine, schedule=args.schedule)
    except OSError as exc:
        host = "[%s]" % args.host if ":" in args.host and "[" not in args.host else args.host
        raise UsageError("cannot listen on %s:%d: %s" % (host, args.port, exc.strerror
                                                         or exc)) from None
    try:                    # one cluster or connection for the server's life, shared by its runs
        engine._opened = _open_executor(executor, engine.workers)
    except BaseException:
        server.close()
        raise
    if not _is_loopback(args.host) and not server.token:
        _warn("listening beyond loopback without PYOCO_API_TOKEN: POST endpoints are refused")

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    for name, flow in flows.items():     # before the line that says the server is up
        if flow.schedule is not None:
            next_at = server.timetable.next_at[name] if server.timetable is not None else None
            _write_line(None, "pyoco serve: flow %r runs at %r (%s); %s\n" % (
                name, flow.schedule, "UTC" if flow._schedule.every else
                flow.schedule_tz or "local time",
                "next at %s" % _iso(next_at) if next_at is not None else
                "not scheduled here (--no-schedule)" if server.timetable is None else "never"))
    print("pyoco serve: listening on %s (store %s%s)" % (
        server.url, store.root, "; flows: " + ", ".join(sorted(flows)) if flows else ""),
        flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        engine._opened.close(wait=False)
    return 0


def _cmd_plugins(args):
    registry = load_plugins()
    if args.plugins_command == "list":
        infos = [registry.tasks[n] for n in registry.names()]
        if args.json:
            _print_json([i.to_dict() for i in infos])
        elif infos:
            print(_table([("NAME", "DISTRIBUTION", "VERSION", "KIND", "SUMMARY")] + [
                (i.name, i.distribution, i.version or "", i.kind, i.summary or "")
                for i in infos]))
        else:
            print("no plugin tasks installed (entry-point group %s)" % PLUGIN_GROUP)
        for dist, where, message in registry.problems:
            _warn("plugin %s (%s): %s" % (where, dist, message))
        return 0
    found = lint_plugins(registry)
    if args.json:
        _print_json(found)
    elif found:
        for f in found:
            print("%s: %s (%s): %s" % (f["level"], f["plugin"], f["distribution"], f["message"]))
    else:
        print("ok: %d plugin task%s, no problems" % (len(registry.tasks),
                                                     "" if len(registry.tasks) == 1 else "s"))
    return 1 if found else 0


def _print_json(value):
    """JSON on stdout for --json: ASCII escapes keep it valid on any console encoding."""
    print(_dumps(value, indent=2, ensure_ascii=True))


def _table(rows):
    widths = [max(len(str(row[c])) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()
                     for row in rows)


def main(argv=None):
    """The command line: ``pyoco``, ``python -m pyoco`` and ``python pyoco.py``."""
    for stream in (sys.stdout, sys.stderr):     # a console that cannot show a character
        try:                                    # gets an escape, not a traceback
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler = {"run": _cmd_run, "check": _cmd_check, "graph": _cmd_graph,
               "runs": _cmd_runs, "serve": _cmd_serve, "plugins": _cmd_plugins}[args.command]

    try:
        code = handler(args)
        drain_webhooks()
        return code
    except (UsageError, StoreError, ExecutorError) as exc:
        _write_line(None, "pyoco %s: error: %s\n" % (args.command, exc))
        return 2
    except KeyboardInterrupt:
        # A second Ctrl+C: the record is saved; tasks may still be running in
        # threads that cannot be stopped, so leave without waiting for them.
        _flush_stdout()
        os._exit(130)
    except BrokenPipeError:         # `pyoco runs list | head`: the reader left; so do we
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:          # a store or file we cannot read or write
        _write_line(None, "pyoco %s: error: %s\n" % (args.command, exc))
        return 2


# ---------------------------------------------------------------------------
# The pyoco.core.* names of the original package, served from this one file
# ---------------------------------------------------------------------------

def _register_aliases():
    if __name__ == "__main__":
        return
    module_type = type(sys)
    core = module_type(__name__ + ".core", "Compatibility names of the original pyoco layout.")
    core.__path__ = []
    parts = {
        "models": {"Flow": Flow, "Task": Task, "FunctionTask": FunctionTask, "task": task,
                   "TaskState": TaskState, "RunStatus": RunStatus, "RunContext": Run},
        "engine": {"Engine": Engine, "Run": Run, "TaskRecord": TaskRecord},
        "context": {"Context": Context},
        "exceptions": {"PyocoError": PyocoError, "FlowError": FlowError,
                       "RunFailed": RunFailed, "RunCancelled": RunCancelled, "Skip": Skip},
    }
    sys.modules.setdefault(core.__name__, core)
    for part, names in parts.items():
        sub = module_type("%s.%s" % (core.__name__, part))
        sub.__dict__.update(names)
        setattr(core, part, sub)
        core.__dict__.update(names)
        sys.modules.setdefault(sub.__name__, sub)
    globals()["core"] = core
    # from pyoco.dsl.syntax import task: the original's home of the decorator
    dsl = module_type(__name__ + ".dsl", "Compatibility names of the original pyoco layout.")
    dsl.__path__ = []
    syntax = module_type(dsl.__name__ + ".syntax")
    syntax.__dict__.update({"task": task, "TaskWrapper": FunctionTask, "Branch": _OrJoin,
                            "Parallel": _Group})
    dsl.syntax = syntax
    sys.modules.setdefault(dsl.__name__, dsl)
    sys.modules.setdefault(syntax.__name__, syntax)
    globals()["dsl"] = dsl
    # from pyoco.trace.console import ConsoleTraceBackend: the original's trace interface
    trace_pkg = module_type(__name__ + ".trace", "Compatibility names of the original pyoco layout.")
    trace_pkg.__path__ = []
    for part, names in (("backend", {"TraceBackend": TraceBackend}),
                        ("console", {"ConsoleTraceBackend": ConsoleTraceBackend,
                                     "TraceBackend": TraceBackend})):
        sub = module_type("%s.%s" % (trace_pkg.__name__, part))
        sub.__dict__.update(names)
        setattr(trace_pkg, part, sub)
        sys.modules.setdefault(sub.__name__, sub)
    sys.modules.setdefault(trace_pkg.__name__, trace_pkg)
    globals()["trace"] = trace_pkg


_register_aliases()


# ---------------------------------------------------------------------------
# The browser page
# ---------------------------------------------------------------------------

# The page at / and /runs/{id}/view: one self-contained document that only reads
# the JSON API below (no CDN, no build step).
_PAGE = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pyoco runs</title>
<style>
:root { --bg:#fbf9ff; --fg:#2b2540; --muted:#6f6887; --card:#ffffff; --line:#e4def3;
  --accent:#8a6fd1; --carrot:#f07c24; --ok:#3f9b5f; --fail:#d64545; --skip:#9a94ad;
  --cancel:#c7883a; --run:#3b82c4; --pend:#cfc8e3; }
[data-theme="dark"] { --bg:#17141f; --fg:#ece8f7; --muted:#a69fbf; --card:#221d2e; --line:#3a3350;
  --accent:#b39ddb; --carrot:#ff9830; --ok:#62c483; --fail:#ff6b6b; --skip:#8d86a3;
  --cancel:#e0a458; --run:#6cb2f0; --pend:#4a4260; }
@media (prefers-color-scheme: dark) { :root:not([data-theme="light"]) { --bg:#17141f; --fg:#ece8f7;
  --muted:#a69fbf; --card:#221d2e; --line:#3a3350; --accent:#b39ddb; --carrot:#ff9830; --ok:#62c483;
  --fail:#ff6b6b; --skip:#8d86a3; --cancel:#e0a458; --run:#6cb2f0; --pend:#4a4260; } }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--fg); }
header { display:flex; align-items:center; gap:1rem; padding:.8rem 1.2rem; border-bottom:1px solid var(--line); background:var(--card); }
header h1 { font-size:1.2rem; margin:0; }
header h1 a { color:inherit; text-decoration:none; }
header .grow { flex:1; }
main { padding:1rem 1.2rem; max-width:1200px; margin:0 auto; }
a { color:var(--accent); }
button, select { font:inherit; color:var(--fg); background:var(--card); border:1px solid var(--line); border-radius:6px; padding:.3rem .6rem; }
button:hover, select:hover { border-color:var(--accent); }
:focus-visible { outline:3px solid var(--carrot); outline-offset:2px; }
.filters { display:flex; gap:.8rem; flex-wrap:wrap; align-items:center; margin-bottom:.8rem; }
table { width:100%; border-collapse:collapse; background:var(--card); border:1px solid var(--line); border-radius:8px; overflow:hidden; }
th, td { text-align:left; padding:.45rem .6rem; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:.85rem; }
tr:last-child td { border-bottom:none; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:.85rem; }
.badge { display:inline-block; padding:.05rem .5rem; border-radius:999px; font-size:.8rem; font-weight:600; color:#fff; }
.s-COMPLETED, .s-SUCCEEDED { background:var(--ok); } .s-FAILED { background:var(--fail); }
.s-SKIPPED { background:var(--skip); } .s-CANCELLED, .s-CANCELLING { background:var(--cancel); }
.s-RUNNING { background:var(--run); } .s-PENDING { background:var(--pend); color:var(--fg); }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:.8rem 1rem; margin-bottom:1rem; }
.card h2 { font-size:1rem; margin:0 0 .6rem; }
.muted { color:var(--muted); }
.timeline { position:relative; }
.tl-row { display:flex; align-items:center; height:22px; }
.tl-name { width:190px; flex:none; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; padding-right:.5rem; font-size:.85rem; }
.tl-track { position:relative; flex:1; height:14px; background:linear-gradient(var(--line),var(--line)) center/100% 1px no-repeat; }
.tl-bar { position:absolute; top:0; height:14px; border-radius:4px; min-width:3px; }
.tl-bar.s-SKIPPED, .tl-bar.s-CANCELLED { background:repeating-linear-gradient(45deg,var(--skip),var(--skip) 3px,transparent 3px,transparent 6px); border:1px solid var(--skip); }
.tl-tick { position:absolute; top:-3px; width:2px; height:20px; background:var(--carrot); }
.tl-axis { display:flex; justify-content:space-between; margin-left:190px; font-size:.75rem; color:var(--muted); }
pre.tb { background:var(--bg); border:1px solid var(--line); border-radius:6px; padding:.6rem; overflow:auto; max-height:320px; }
svg text { fill:var(--fg); font-size:11px; }
svg .edge { stroke:var(--muted); fill:none; }
svg .rule { font-size:9px; fill:var(--muted); }
.legend span { margin-right:.8rem; }
#status { font-size:.8rem; }
.error { color:var(--fail); }
details summary { cursor:pointer; }
.cells { display:flex; gap:3px; flex-wrap:wrap; align-items:center; max-width:330px; }
.cell { display:inline-block; width:12px; height:18px; border-radius:3px; }
.cell:hover { outline:2px solid var(--carrot); }
svg.trend polyline { fill:none; stroke:var(--accent); stroke-width:1.5; }
svg.trend circle { fill:var(--carrot); }
td.actions { white-space:nowrap; }
td.actions button { margin:0 .3rem .2rem 0; }
</style>
</head>
<body>
<header>
  <h1><a href="/">🐇 pyoco</a></h1>
  <span class="muted mono" id="version"></span>
  <span class="grow"></span>
  <span id="status" class="muted" aria-live="polite"></span>
  <label><input type="checkbox" id="auto" checked> auto-refresh</label>
  <button type="button" id="theme" title="switch between light and dark">🌓 theme</button>
</header>
<main id="main" tabindex="-1"><p class="muted">loading…</p></main>
<script>
"use strict";
const STATES = ["RUNNING", "CANCELLING", "COMPLETED", "FAILED", "CANCELLED", "PENDING"];
const filters = {flow: "", status: ""};
let knownFlows = new Set();

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.setAttribute("style", v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}
async function api(path) {
  const r = await fetch(path, {headers: {"Accept": "application/json"}, cache: "no-store"});
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  return body;
}
const badge = (s) => h("span", {class: "badge s-" + s}, s);
const ms = (v) => v === null || v === undefined ? "–" : v < 1000 ? v.toFixed(1) + " ms" : (v / 1000).toFixed(2) + " s";
const when = (iso) => iso ? iso.replace("T", " ").replace("Z", "") : "–";
const t = (iso) => iso ? Date.parse(iso) : null;
const runPath = (id) => "/runs/" + encodeURIComponent(id);
const FINISHED = ["COMPLETED", "FAILED", "CANCELLED"];
let flowNote = "";

// Changes (Run now, Cancel) follow the API's rules: the browser sends this page's
// Origin, and with PYOCO_API_TOKEN set the page asks for the token once and keeps
// it in sessionStorage, so it lives as long as this tab.
async function post(path, body) {
  for (let asked = false; ; asked = true) {
    const headers = {"Content-Type": "application/json", "Accept": "application/json"};
    const token = sessionStorage.getItem("pyoco-token");
    if (token) headers["Authorization"] = "Bearer " + token;
    const r = await fetch(path, {method: "POST", headers, body: JSON.stringify(body || {}), cache: "no-store"});
    const answer = await r.json().catch(() => ({}));
    if (r.status === 401) {
      sessionStorage.removeItem("pyoco-token");
      const given = asked ? null : prompt("This server needs its API token (PYOCO_API_TOKEN) to start or cancel runs. It is kept in this tab only.");
      if (given && given.trim()) { sessionStorage.setItem("pyoco-token", given.trim()); continue; }
    }
    if (!r.ok) throw new Error(answer.error || ("HTTP " + r.status));
    return answer;
  }
}
async function act(what, path, body) {
  try {
    const answer = await post(path, body);
    flowNote = `${what}: run ${answer.run_id}`;
  } catch (err) { flowNote = `${what} refused: ${err.message}`; }
  refresh();
}
const cancelButton = (r) => h("button", {type: "button", class: "cancel", "data-run": r.run_id,
  title: "ask run " + r.run_id + " to stop", onclick: () => act("cancel", runPath(r.run_id) + "/cancel")}, "■ Cancel");

function trend(runs) {
  const d = runs.map((r) => r.duration_ms).filter((v) => v !== null && v !== undefined);
  const W = 120, H = 28;
  const box = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "trend", role: "img",
    "aria-label": d.length ? `durations of the last ${d.length} finished runs, the latest ${ms(d[d.length - 1])}` : "no finished runs yet"});
  if (!d.length) return box;
  const lo = Math.min(...d), span = Math.max(...d) - lo || 1;
  const pts = d.map((v, i) => [d.length === 1 ? W / 2 : 3 + i * (W - 6) / (d.length - 1), H - 4 - (v - lo) / span * (H - 8)]);
  box.append(svg("polyline", {points: pts.map((p) => p.join(",")).join(" ")}));
  const [x, y] = pts[pts.length - 1];
  box.append(svg("circle", {cx: x, cy: y, r: 2.5}));
  const tip = svg("title", {}); tip.textContent = d.map(ms).join(" → "); box.append(tip);
  return box;
}

async function flowsCard() {
  const flows = await api("/flows");
  if (!flows.length) return "";
  const rows = await Promise.all(flows.map(async (f) => {
    const runs = (await api("/runs?" + new URLSearchParams({flow: f.flow, limit: "20"}))).reverse();
    const finished = runs.filter((r) => FINISHED.includes(r.status));
    const ok = finished.filter((r) => r.status === "COMPLETED").length;
    const cells = runs.map((r) => h("a", {class: "cell s-" + r.status, href: runPath(r.run_id) + "/view", "data-run": r.run_id,
      "aria-label": `run ${r.run_id}: ${r.status}`, title: `${when(r.started_at)} · ${r.status} · ${ms(r.duration_ms)}` + (r.scheduled_for ? ` · scheduled for ${when(r.scheduled_for)}` : "")}));
    return h("tr", {"data-flow": f.flow},
      h("td", {}, h("strong", {}, f.flow), f.file ? h("div", {class: "muted mono"}, f.file) : ""),
      h("td", {class: "mono schedule"}, f.schedule || h("span", {class: "muted"}, "–")),
      h("td", {class: "mono next"}, when(f.next_run_at)),
      h("td", {}, h("div", {class: "cells"}, cells.length ? cells : h("span", {class: "muted"}, "no runs yet"))),
      h("td", {class: "rate", title: `${ok} of ${finished.length} finished runs completed`}, finished.length ? Math.round(ok / finished.length * 100) + "%" : "–"),
      h("td", {}, trend(finished)),
      h("td", {class: "actions"}, h("button", {type: "button", class: "run-now", "data-flow": f.flow, title: "POST /runs " + f.flow,
        onclick: () => act("run now", "/runs", {flow: f.flow})}, "▶ Run now"),
        runs.filter((r) => r.status === "RUNNING").map(cancelButton)));
  }));
  return h("div", {class: "card", id: "flows"}, h("h2", {}, "Flows"),
    h("table", {id: "flow-table"}, h("thead", {}, h("tr", {}, ["Flow", "Schedule", "Next run (UTC)", "Last runs", "Success", "Duration", ""].map((c) => h("th", {scope: "col"}, c)))),
      h("tbody", {}, rows)),
    h("p", {id: "flow-note", class: flowNote.includes("refused") ? "error" : "muted", "aria-live": "polite"}, flowNote));
}

function currentRun() {
  const m = location.pathname.match(/^\/runs\/([^/]+)\/view$/);
  return m ? decodeURIComponent(m[1]) : null;
}

async function renderList() {
  const q = new URLSearchParams({limit: "100"});
  if (filters.flow) q.set("flow", filters.flow);
  if (filters.status) q.set("status", filters.status);
  const [runs, flows] = await Promise.all([api("/runs?" + q), flowsCard()]);
  runs.forEach((r) => knownFlows.add(r.flow));
  const flowSel = h("select", {id: "flow-filter", "aria-label": "flow",
      onchange: (e) => { filters.flow = e.target.value; refresh(); }},
    h("option", {value: ""}, "all flows"),
    [...knownFlows].sort().map((f) => h("option", {value: f, selected: f === filters.flow}, f)));
  const statusSel = h("select", {id: "status-filter", "aria-label": "status",
      onchange: (e) => { filters.status = e.target.value; refresh(); }},
    h("option", {value: ""}, "any status"),
    STATES.map((s) => h("option", {value: s, selected: s === filters.status}, s)));
  const rows = runs.map((r) => {
    const failed = Object.entries(r.tasks || {}).filter(([, v]) => v.state === "FAILED").map(([k]) => k);
    return h("tr", {"data-run": r.run_id},
      h("td", {}, h("a", {href: runPath(r.run_id) + "/view", class: "mono"}, r.run_id)),
      h("td", {}, r.flow), h("td", {}, badge(r.status)), h("td", {class: "mono"}, when(r.started_at)),
      h("td", {}, ms(r.duration_ms)), h("td", {class: failed.length ? "error" : "muted"}, failed.join(", ") || r.reason || "",
        r.status === "RUNNING" ? [" ", cancelButton(r)] : ""));
  });
  const main = document.getElementById("main");
  main.replaceChildren(flows,
    h("div", {class: "filters"}, h("label", {}, "Flow ", flowSel), h("label", {}, "Status ", statusSel),
      h("span", {class: "muted"}, runs.length + " run" + (runs.length === 1 ? "" : "s"))),
    runs.length ? h("table", {id: "runs"},
      h("thead", {}, h("tr", {}, ["Run", "Flow", "Status", "Started (UTC)", "Duration", "Failed task"].map((c) => h("th", {scope: "col"}, c)))),
      h("tbody", {}, rows))
      : h("p", {class: "muted"}, "No runs yet. Run a flow with `pyoco run flow.py` and it appears here. 🥕"));
}

function timeline(record) {
  const tasks = Object.entries(record.tasks || {});
  const starts = tasks.map(([, v]) => t(v.started_at)).filter((x) => x !== null);
  const t0 = Math.min(t(record.started_at) || Infinity, ...starts);
  const ends = tasks.map(([, v]) => t(v.ended_at)).filter((x) => x !== null);
  const t1 = Math.max(t(record.ended_at) || 0, ...ends, t0 + 1, record.ended_at ? 0 : Date.now());
  const span = t1 - t0 || 1;
  const pos = (x) => Math.max(0, Math.min(100, (x - t0) / span * 100));
  const retries = {};
  for (const e of record.events || []) if (e.event === "task.retrying") (retries[e.task] = retries[e.task] || []).push(t(e.ts));
  tasks.sort((a, b) => (t(a[1].started_at) ?? Infinity) - (t(b[1].started_at) ?? Infinity));
  const rows = tasks.map(([name, v]) => {
    const s = t(v.started_at), e = t(v.ended_at) ?? (s !== null ? t1 : null);
    const title = `${name}: ${v.state}, ${ms(v.duration_ms)}, ${v.attempts} attempt${v.attempts === 1 ? "" : "s"}` + (v.reason ? ` (${v.reason})` : "") + (v.error ? ` — ${v.error}` : "");
    let bar;
    if (s !== null) bar = h("div", {class: "tl-bar s-" + v.state, style: `left:${pos(s)}%;width:${Math.max(0.4, pos(e) - pos(s))}%`, title});
    else bar = h("div", {class: "tl-bar s-" + v.state, style: `left:${Math.min(99, pos(t(v.ended_at) ?? t1))}%;width:1%`, title});
    const ticks = (retries[name] || []).map((x) => h("div", {class: "tl-tick", style: `left:${pos(x)}%`, title: "retry"}));
    return h("div", {class: "tl-row", "data-task": name, "data-state": v.state},
      h("div", {class: "tl-name", title: name}, name, v.attempts > 1 ? h("span", {class: "muted"}, " ×" + v.attempts) : "",
        v.reused_from ? h("span", {class: "muted", title: "reused from run " + v.reused_from}, " ♻") : ""),
      h("div", {class: "tl-track"}, bar, ticks));
  });
  return h("div", {class: "card"}, h("h2", {}, "Timeline"),
    h("div", {class: "timeline", id: "timeline", role: "img", "aria-label": "one bar per task from its start to its end"}, rows),
    h("div", {class: "tl-axis"}, h("span", {}, "0"), h("span", {}, ms(span))),
    h("p", {class: "legend muted"}, ["SUCCEEDED", "FAILED", "RUNNING", "SKIPPED", "CANCELLED"].map((s) => h("span", {}, badge(s))),
      h("span", {}, h("span", {class: "tl-tick", style: "position:static;display:inline-block;height:10px"}), " retry")));
}

function dag(graph, record) {
  const card = h("div", {class: "card"}, h("h2", {}, "Graph"));
  const nodes = graph.nodes || [];
  if (nodes.length > 400) { card.append(h("p", {class: "muted"}, `${nodes.length} tasks: too many to draw here; try pyoco graph.`)); return card; }
  const preds = Object.fromEntries(nodes.map((n) => [n, []]));
  for (const [a, b] of graph.edges || []) if (preds[b]) preds[b].push(a);
  const level = {};
  const depth = (n, seen = new Set()) => {
    if (level[n] !== undefined) return level[n];
    if (seen.has(n)) return 0;
    seen.add(n);
    return (level[n] = preds[n].length ? 1 + Math.max(...preds[n].map((p) => depth(p, seen))) : 0);
  };
  nodes.forEach((n) => depth(n));
  const columns = [];
  nodes.forEach((n) => (columns[level[n]] = columns[level[n]] || []).push(n));
  const W = 150, H = 34, GX = 40, GY = 10, at = {};
  columns.forEach((col, x) => col.forEach((n, y) => (at[n] = {x: x * (W + GX) + 4, y: y * (H + GY) + 4})));
  const width = columns.length * (W + GX), height = Math.max(...columns.map((c) => c.length)) * (H + GY) + 8;
  const box = svg("svg", {width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "task graph", id: "dag"});
  for (const [a, b] of graph.edges || []) {
    if (!at[a] || !at[b]) continue;
    const x1 = at[a].x + W, y1 = at[a].y + H / 2, x2 = at[b].x, y2 = at[b].y + H / 2;
    box.append(svg("path", {class: "edge", d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}`}));
  }
  const color = {SUCCEEDED: "--ok", FAILED: "--fail", SKIPPED: "--skip", CANCELLED: "--cancel", RUNNING: "--run", PENDING: "--pend"};
  for (const n of nodes) {
    const st = (record.tasks[n] || {}).state || "PENDING";
    const g = svg("g", {"data-task": n});
    const rules = (graph.rules || {})[n] || [];
    const title = svg("title", {}); title.textContent = `${n}: ${st}` + (rules.length ? ` (${rules.join(", ")})` : ""); g.append(title);
    g.append(svg("rect", {x: at[n].x, y: at[n].y, width: W, height: H, rx: 7, fill: `var(${color[st] || "--pend"})`, "fill-opacity": "0.25", stroke: `var(${color[st] || "--pend"})`}));
    const label = svg("text", {x: at[n].x + 8, y: at[n].y + H / 2 + 4}); label.textContent = n.length > 21 ? n.slice(0, 20) + "…" : n;
    g.append(label);
    if (rules.length) {
      const rule = svg("text", {x: at[n].x + 8, y: at[n].y + H - 3, class: "rule"});
      rule.textContent = rules.join(" · ").slice(0, 26);
      g.append(rule);
    }
    box.append(g);
  }
  card.append(h("div", {style: "overflow:auto"}, box));
  return card;
}

async function renderRun(id) {
  const [record, graph] = await Promise.all([api(runPath(id)), api(runPath(id) + "/graph").catch(() => ({nodes: [], edges: []}))]);
  const tasks = Object.entries(record.tasks || {});
  const failures = tasks.filter(([, v]) => v.state === "FAILED");
  const summary = h("div", {class: "card", id: "summary"},
    h("h2", {}, "Run ", h("span", {class: "mono"}, record.run_id), " ", badge(record.status)),
    h("p", {}, "Flow ", h("strong", {}, record.flow), " · started ", h("span", {class: "mono"}, when(record.started_at)),
      " · ", ms(record.duration_ms), record.scheduled_for ? h("span", {class: "muted"}, " · scheduled for " + when(record.scheduled_for)) : "",
      record.resumed_from ? [" · resumed from ", h("a", {href: runPath(record.resumed_from) + "/view", class: "mono"}, record.resumed_from)] : "",
      record.reason ? h("span", {class: "muted"}, " · " + record.reason) : ""),
    Object.keys(record.params || {}).length ? h("p", {class: "mono muted"}, "params " + JSON.stringify(record.params)) : "");
  const errors = failures.length ? h("div", {class: "card", id: "failures"}, h("h2", {}, "Failures"),
    failures.map(([name, v]) => h("div", {}, h("p", {}, h("strong", {}, name), " ", h("span", {class: "error"}, v.error || "")),
      v.traceback ? h("pre", {class: "tb"}, v.traceback) : ""))) : "";
  const rows = tasks.map(([name, v]) => {
    const logs = h("pre", {class: "tb", hidden: true});
    const more = h("details", {ontoggle: async (e) => {
      if (!e.target.open || logs.dataset.loaded) return;
      logs.hidden = false; logs.textContent = "loading…";
      try {
        const data = await api(runPath(id) + "/logs?tail=50&task=" + encodeURIComponent(name));
        logs.textContent = data.logs.map((l) => `${when(l.ts)} ${l.stream.padEnd(6)} ${l.text}`).join("\n") || "(no output)";
        logs.dataset.loaded = "1";
      } catch (err) { logs.textContent = String(err.message); }
    }}, h("summary", {}, "log"), logs);
    const arts = Object.keys(v.artifacts || {}).map((a) => h("a", {href: runPath(id) + "/artifacts/" + a.split("/").map(encodeURIComponent).join("/"), class: "mono"}, a));
    const reused = v.reused_from ? h("small", {class: "muted reused"}, " reused from ", h("a", {href: runPath(v.reused_from) + "/view", class: "mono"}, v.reused_from)) : "";
    return h("tr", {"data-task": name}, h("td", {class: "mono"}, name), h("td", {}, badge(v.state), reused), h("td", {}, String(v.attempts)),
      h("td", {}, ms(v.duration_ms)), h("td", {class: v.error ? "error" : "muted"}, v.error || v.reason || ""),
      h("td", {}, arts.length ? arts.flatMap((a, i) => i ? [", ", a] : [a]) : ""), h("td", {}, more));
  });
  const table = h("div", {class: "card"}, h("h2", {}, "Tasks"), h("table", {id: "tasks"},
    h("thead", {}, h("tr", {}, ["Task", "State", "Attempts", "Duration", "Note", "Artifacts", "Log"].map((c) => h("th", {scope: "col"}, c)))),
    h("tbody", {}, rows)));
  document.getElementById("main").replaceChildren(h("p", {}, h("a", {href: "/"}, "← all runs")), summary, errors, timeline(record), dag(graph, record), table);
  return record;
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  const status = document.getElementById("status");
  try {
    const id = currentRun();
    if (id) {
      const record = await renderRun(id);
      document.title = `pyoco · ${record.flow} · ${record.status}`;
    } else {
      await renderList();
      document.title = "pyoco runs";
    }
    status.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    status.textContent = "";
    document.getElementById("main").replaceChildren(h("p", {class: "error"}, "Could not load: " + err.message));
  } finally { busy = false; }
}

const stored = localStorage.getItem("pyoco-theme");
if (stored) document.documentElement.dataset.theme = stored;
document.getElementById("theme").addEventListener("click", () => {
  const dark = document.documentElement.dataset.theme ? document.documentElement.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "light" : "dark";
  localStorage.setItem("pyoco-theme", document.documentElement.dataset.theme);
});
api("/healthz").then((d) => (document.getElementById("version").textContent = "v" + d.version)).catch(() => {});
setInterval(() => {
  if (document.getElementById("auto").checked && !document.querySelector("details[open]")) refresh();
}, 3000);
refresh();
</script>
</body>
</html>
'''


if __name__ == "__main__":
    # Hand over to the module under its import name, so that flow files which
    # `import pyoco` share its classes with the command line.
    import pyoco
    sys.exit(pyoco.main())
