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
    "TaskState", "RunState",
    "PyocoError", "FlowError", "RunFailed", "RunCancelled", "Skip",
    "main",
]

import os
import sys
import time

_MISSING = object()         # "no value": a parameter without default, and so on


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
    """A run ended FAILED. ``run`` is the run; ``__cause__`` the task's error."""

    def __init__(self, message, run):
        super().__init__(message)
        self.run = run


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
# States
# ---------------------------------------------------------------------------

class TaskState:
    """The states of a task; the values are plain strings."""
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"


class RunState:
    """The states of a run; the values are plain strings."""
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


# ---------------------------------------------------------------------------
# Model: tasks
# ---------------------------------------------------------------------------

# Bumped by every change to a task or a flow, so a flow knows when the plan it
# compiled (see Flow._compile) is stale. One global counter keeps the check a
# single comparison.
_generation = 0


def _touch():
    global _generation
    _generation += 1


class _Inputs(dict):
    """A task's ``inputs`` mapping; changing it makes compiled plans stale."""

    def __setitem__(self, key, value):
        _touch()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        _touch()
        dict.__delitem__(self, key)

    def _mutator(name):
        method = getattr(dict, name)

        def mutate(self, *args, **kwargs):
            _touch()
            return method(self, *args, **kwargs)
        mutate.__name__ = name
        return mutate

    update = _mutator("update")
    pop = _mutator("pop")
    popitem = _mutator("popitem")
    clear = _mutator("clear")
    setdefault = _mutator("setdefault")
    del _mutator


_FAIL_POLICIES = ("stop", "isolate")
_OPTIONS = ("name", "inputs", "retries", "retry_delay", "timeout",
            "fail_policy", "cache")


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
    - ``cache``: ``False`` makes a resumed run always run it again
    """

    name = None
    inputs = None
    retries = 0
    retry_delay = 0.0
    timeout = None
    fail_policy = "stop"
    cache = True
    max_retry_delay = 60.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def __init__(self, name=None, **options):
        if name is not None:
            self.name = name
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError("unknown task option %s; the options are %s"
                            % (", ".join(sorted(map(repr, unknown))), ", ".join(_OPTIONS)))
        self.inputs = options.pop("inputs", None) or dict(type(self).inputs or {})
        for key, value in options.items():
            setattr(self, key, value)

    def __setattr__(self, key, value):
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
        elif key in ("retries",) and (not isinstance(value, int) or value < 0):
            raise ValueError("task %r: retries must be a whole number >= 0, not %r"
                             % (getattr(self, "name", None), value))
        elif key in ("retry_delay",) and (not isinstance(value, (int, float)) or value < 0):
            raise ValueError("task %r: retry_delay must be seconds >= 0, not %r"
                             % (getattr(self, "name", None), value))
        elif key == "timeout" and value is not None and (
                not isinstance(value, (int, float)) or value <= 0):
            raise ValueError("task %r: timeout must be seconds > 0 or None, not %r"
                             % (getattr(self, "name", None), value))
        _touch()
        object.__setattr__(self, key, value)

    @property
    def task(self):
        """The node itself (decorated functions expose their node the same way)."""
        return self

    def run(self, ctx, **inputs):
        raise NotImplementedError("%s must implement run(self, ctx, **inputs)"
                                  % type(self).__name__)

    def _callable(self):
        return self.run

    def __repr__(self):
        return "<%s %r>" % (type(self).__name__, self.name)


class FunctionTask(Task):
    """The node made by ``@task``: calling it calls the plain function."""

    def __init__(self, func, **options):
        object.__setattr__(self, "func", func)
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            try:
                object.__setattr__(self, attr, getattr(func, attr))
            except AttributeError:
                pass
        object.__setattr__(self, "__wrapped__", func)
        options.setdefault("name", getattr(func, "__name__", None) or repr(func))
        super().__init__(**options)

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    def run(self, ctx, **inputs):
        return self.func(ctx, **inputs)

    def _callable(self):
        return self.func

    def __repr__(self):
        return "<task %r>" % (self.name,)


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

class Flow:
    """A named DAG of tasks.

    ``flow >> a >> [b, c] >> d`` chains and fans out/joins;
    ``flow.add(task, after=[...])`` adds a node with any set of upstreams.
    A task is one node however often it is mentioned; adding it again only
    adds the new edges. ``flow >> x`` always starts a new chain at ``x``.
    """

    def __init__(self, name="main"):
        self.name = name
        self._upstream = {}         # node -> {upstream node: None}, insertion ordered
        self._plan = None
        self._plan_generation = -1

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
        return _Chain(self, nodes)

    def add(self, task, after=()):
        """Add ``task`` to run after every task in ``after`` (a task or a list).

        Upstream tasks not yet in the flow are added too. Returns a chain, so
        ``flow.add(c, after=[a, b]) >> d`` works.
        """
        node = _as_node(task, "flow %r" % self.name)
        upstream = self._nodes_of(after) if after else []
        self._add(node, upstream)
        return _Chain(self, [node])

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
        generation = _generation
        self._plan = _Plan(self)
        self._plan_generation = generation
        return self._plan


class _Chain:
    """What ``flow >> x`` returns: remembers the last tasks to chain from."""

    __slots__ = ("flow", "tails")

    def __init__(self, flow, tails):
        self.flow, self.tails = flow, tails

    def __rshift__(self, other):
        nodes = self.flow._nodes_of(other)
        for node in nodes:
            self.flow._add(node, self.tails)
        return _Chain(self.flow, nodes)

    def __repr__(self):
        return "<chain of flow %r at %s>" % (self.flow.name, ", ".join(n.name for n in self.tails))


class _Plan:
    """A flow compiled for running: parallel lists indexed by task number.

    Fields (all lists have one entry per task):
      nodes    the Task objects           names   their names
      index    name -> task number        npred   how many upstream tasks
      free     successors whose only upstream task is this one
      joins    successors with several upstream tasks (counted under a lock)
      funcs    the callable to invoke     ctx     whether it takes ctx first
      binds    per parameter: (kind, key, path, text, pname, is_kwonly)
      flowparams  task numbers whose bindings depend on the run's params
    """

    __slots__ = ("flow_name", "nodes", "names", "index", "npred", "preds", "free", "joins",
                 "roots", "funcs", "ctx", "binds", "varkw", "flowparams", "retries",
                 "timeouts", "isolate", "param_refs")

    def __init__(self, flow):
        self.flow_name = flow.name
        nodes = self.nodes = list(flow._upstream)
        names = self.names = [node.name for node in nodes]
        index = self.index = {}
        for i, (node, name) in enumerate(zip(nodes, names)):
            if not isinstance(name, str) or not name:
                raise FlowError("flow %r: task %r needs a non-empty string name" % (flow.name, node))
            other = index.setdefault(name, i)
            if other != i:
                raise FlowError("flow %r: two different tasks are named %r (%r and %r);"
                                " give one a name=..." % (flow.name, name, nodes[other], node))
        node_index = {node: i for i, node in enumerate(nodes)}
        preds = self.preds = [[node_index[up] for up in flow._upstream[node]] for node in nodes]

        self.funcs, self.ctx, self.binds, self.varkw = [], [], [], []
        self.flowparams, self.retries, self.timeouts, self.isolate = [], [], [], []
        for i, node in enumerate(nodes):
            self._compile_node(i, node)

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
        self.param_refs = [(i, b) for i, bs in enumerate(self.binds) for b in bs
                           if b[0] == _B_PARAM]


    def _compile_node(self, i, node):
        where = "task %r" % node.name
        fn = node._callable()
        if not callable(fn):
            raise FlowError("%s: %r is not callable" % (where, fn))
        params, varkw = _parameters(fn)
        takes_ctx = bool(params) and params[0][0] == "ctx"
        if takes_ctx:
            params = params[1:]
        inputs = dict(node.inputs or {})
        upstream_names = {self.names[p]: p for p in self.preds[i]}
        extra_preds = []
        binds = []
        needs_flowparams = False
        for pname, kind, default in params:
            if pname in inputs:
                binding = self._input_binding(inputs.pop(pname), "%s input %r" % (where, pname))
            elif pname in upstream_names:
                binding = (_B_NODE, upstream_names[pname], (), "$node.%s.output" % pname)
            else:
                binding = (_B_FLOWPARAM, pname, default, None)
                needs_flowparams = True
            if binding[0] == _B_NODE and binding[1] not in self.preds[i]:
                if binding[1] == i:
                    raise FlowError("%s: input %r refers to the task itself" % (where, pname),
                                    cycle=[node.name, node.name])
                extra_preds.append(binding[1])
            binds.append(binding + (pname, kind == "kwonly"))
        for pname, value in inputs.items():
            if not varkw:
                accepted = ", ".join(p[0] for p in params) or "none"
                raise FlowError("%s has input %r but %s takes no parameter %r (parameters: %s)"
                                % (where, pname, getattr(fn, "__name__", "its function"),
                                   pname, accepted))
            binding = self._input_binding(value, "%s input %r" % (where, pname))
            if binding[0] == _B_NODE and binding[1] not in self.preds[i]:
                extra_preds.append(binding[1])
            binds.append(binding + (pname, True))
        for p in extra_preds:
            if p not in self.preds[i]:
                self.preds[i].append(p)
        self.funcs.append(fn)
        self.ctx.append(takes_ctx)
        self.binds.append(tuple(binds))
        self.varkw.append(varkw)
        if needs_flowparams:
            self.flowparams.append(i)
        self.retries.append(node.retries)
        self.timeouts.append(node.timeout)
        self.isolate.append(node.fail_policy == "isolate")

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


def _check_acyclic(flow_name, names, preds):
    """Raise FlowError naming the cycle, if the graph has one (graphlib finds it)."""
    from graphlib import TopologicalSorter, CycleError
    try:
        TopologicalSorter({i: ups for i, ups in enumerate(preds)}).prepare()
    except CycleError as exc:
        cycle = [names[i] for i in exc.args[1]]
        raise FlowError("flow %r has a cycle: %s" % (flow_name, " -> ".join(cycle)),
                        cycle=cycle) from None


# ---------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------

_STATE_OF_EVENT = {
    "task.started": TaskState.RUNNING, "task.retrying": TaskState.RUNNING,
    "task.succeeded": TaskState.SUCCEEDED, "task.failed": TaskState.FAILED,
    "task.skipped": TaskState.SKIPPED, "task.cancelled": TaskState.CANCELLED,
}


def _iso(ts):
    """A time.time() value as ISO 8601 UTC with milliseconds: 2026-11-29T05:10:11.123Z."""
    if ts is None:
        return None
    whole = int(ts)
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)),
                         int((ts - whole) * 1000))


def _new_run_id():
    return time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + os.urandom(4).hex()


def _describe(exc):
    text = str(exc)
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


class Context:
    """What a task receives as ``ctx`` when its first parameter is named ctx."""

    __slots__ = ("_run", "task_name", "attempt", "_log")

    def __init__(self, run, task_name, attempt):
        self._run = run
        self.task_name = task_name
        self.attempt = attempt
        self._log = None

    run_id = property(lambda self: self._run.run_id, doc="The run's id.")
    params = property(lambda self: self._run.params, doc="The run's parameters (a dict).")
    results = property(lambda self: self._run.results, doc="Outputs of tasks done so far.")
    scratch = property(lambda self: self._run.scratch,
                       doc="A dict the run's tasks share, for handles to big things.")
    cancelled = property(lambda self: self._run.cancel_event,
                         doc="A threading.Event set when the run is being cancelled.")

    @property
    def log(self):
        """A logging.Logger for this task."""
        if self._log is None:
            import logging
            self._log = logging.getLogger("pyoco.task." + self.task_name)
        return self._log

    def skip(self, reason="skipped"):
        """End this task as SKIPPED; tasks downstream of it are skipped too."""
        raise Skip(reason)

    def __repr__(self):
        return "<Context run_id=%s task=%r attempt=%d>" % (self.run_id, self.task_name,
                                                          self.attempt)


class TaskRecord:
    """A snapshot of one task of a run (built on demand from the run's lists)."""

    __slots__ = ("name", "state", "attempts", "started", "ended", "error", "exception",
                 "traceback", "reason", "output")

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
        self.output = run.results.get(self.name)

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
                "traceback": self.traceback, "reason": self.reason, "artifacts": {}}

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
        self.scratch = {}
        self.started_at = None
        self.ended_at = None
        self.error = None                   # the first task exception that failed the run
        self.reason = None
        self.resumed_from = None
        self.cancel_event = threading.Event()
        self._state = [TaskState.PENDING] * n
        self._attempts = [0] * n
        self._started = [None] * n
        self._ended = [None] * n
        self._errors = {}
        self._tracebacks = {}
        self._reasons = {}
        self._events = []                    # (ts, event, task number or -1, state, data)

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
        names = self._plan.names
        out = []
        for ts, event, i, state, data in list(self._events):
            item = {"ts": _iso(ts), "event": event,
                    "task": names[i] if i >= 0 else None, "state": state}
            if data:
                item.update(data)
            out.append(item)
        return out

    def failure(self):
        """Why the run failed, in one line ("task 'x' raised ValueError: ..."), or None."""
        if self.status != RunState.FAILED:
            return None
        for i, exc in self._errors.items():
            if exc is self.error:
                return "task %r raised %s" % (self._plan.names[i], _describe(exc))
        return self.reason or "unknown reason"

    def to_dict(self, events=True):
        """The run record as plain JSON-ready data (see SPEC section 4)."""
        record = {
            "run_id": self.run_id, "flow": self.flow_name, "status": self.status,
            "params": self.params, "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at), "duration_ms": self.duration_ms,
            "reason": self.reason, "resumed_from": self.resumed_from,
            "tasks": {name: TaskRecord(self, i).to_dict()
                      for i, name in enumerate(self._plan.names)},
        }
        if events:
            record["events"] = self.events
        return record

    def __repr__(self):
        return "<Run %s flow=%r %s>" % (self.run_id, self.flow_name, self.status)


class Engine:
    """Runs flows: independent tasks in parallel on up to ``workers`` threads.

    ``trace``: True (to stderr), False (silent) or a text stream.
    ``cute``: emoji trace (default, unless PYOCO_CUTE=0) or plain ASCII lines.
    ``observers``: callables ``observer(run, event)`` that see every event
    tuple ``(ts, event, task_number, state, data)``; they must be quick and
    must not raise (an observer that raises is reported once and dropped).
    """

    def __init__(self, workers=8, trace=True, cute=None, observers=()):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError("workers must be a whole number >= 1, not %r" % (workers,))
        self.workers = workers
        self.trace = trace
        self.cute = _cute_default() if cute is None else bool(cute)
        self.observers = list(observers)
        self._active = {}

    def run(self, flow, params=None, *, raise_on_failure=True, run_id=None):
        """Run ``flow`` and return its ``Run``.

        Raises FlowError before anything runs when the flow is invalid,
        RunFailed when a task failed (``__cause__`` is its exception) and
        RunCancelled when the run was cancelled, unless ``raise_on_failure``
        is False.
        """
        if not isinstance(flow, Flow):
            raise TypeError("Engine.run needs a Flow, got %r" % (flow,))
        params = dict(params or {})
        plan = flow._compile()
        binds, _ = plan.bind(params, strict=True)
        run = Run(plan, flow, params, run_id or _new_run_id())
        observers = list(self.observers)
        if self.trace:
            observers.append(_TraceWriter(self.trace, self.cute))
        logger = _logging_observer()
        if logger is not None:
            observers.append(logger)
        runner = _Runner(self, run, binds, observers)
        self._active[run.run_id] = runner
        try:
            runner.execute()
        finally:
            self._active.pop(run.run_id, None)
        if raise_on_failure:
            if run.status == RunState.FAILED:
                raise RunFailed("run %s of flow %r failed: %s"
                                % (run.run_id, run.flow_name, run.failure()), run) from run.error
            if run.status == RunState.CANCELLED:
                raise RunCancelled("run %s of flow %r was cancelled" % (run.run_id, run.flow_name),
                                   run)
        return run

    def cancel(self, run_id, reason="cancelled"):
        """Ask a run of this engine to stop: nothing new starts, ctx.cancelled is set.

        Returns False when no such run is active.
        """
        runner = self._active.get(run_id)
        if runner is None:
            return False
        runner.cancel(reason)
        return True


_STOP = None        # put on the ready queue to let a worker thread go


class _Runner:
    """Executes one run.

    No coordinator sits between tasks: a worker that finishes a task counts
    down its successors' upstream counters itself, runs a sole ready
    successor at once, and queues the rest on a SimpleQueue from which
    other workers (started only when more than one task is ready) take them.
    The calling thread just waits, so it stays free to handle signals.
    """

    def __init__(self, engine, run, binds, observers):
        import threading
        import queue
        self.engine = engine
        self.run = run
        self.plan = run._plan
        self.binds = binds
        self.observers = observers
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.ready = queue.SimpleQueue()
        self.pending = list(self.plan.npred)
        self.doomed = {}            # task number -> why it must be skipped (upstream failed)
        self.inflight = 0           # tasks queued or running; 0 means the run is over
        self.threads = 0
        self.stopping = False       # nothing new starts (a failure with "stop", or a cancel)
        self.stop_state = None
        self.stop_reason = None
        self.fatal = None           # a BaseException (SystemExit...) to re-raise at the end
        self.pool = None
        self.outputs = [None] * len(self.plan.nodes)

    # -- events

    def emit(self, ts, event, i, state, data=None):
        ev = (ts, event, i, state, data)
        self.run._events.append(ev)
        for observer in self.observers:
            try:
                observer(self.run, ev)
            except Exception as exc:
                self.observers = [o for o in self.observers if o is not observer]
                _warn("observer %r failed and was removed: %s" % (observer, _describe(exc)))

    # -- the run

    def execute(self):
        run = self.run
        run.started_at = time.time()
        run.status = RunState.RUNNING
        self.emit(run.started_at, "run.started", -1, RunState.RUNNING)
        roots = self.plan.roots
        if not roots:
            self.finish()
        else:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(self.engine.workers, thread_name_prefix="pyoco")
            self.inflight = len(roots)
            for i in roots:
                self.ready.put(i)
            self.start_workers(len(roots))
            self.done.wait()
            self.pool.shutdown(wait=False)
        if self.fatal is not None:
            raise self.fatal
        return run

    def start_workers(self, wanted):
        with self.lock:
            wanted = min(wanted, self.engine.workers - self.threads)
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
            self.work(i)

    def work(self, i):
        """Run task i, then as many of its successors as can run inline."""
        plan = self.plan
        free, joins = plan.free, plan.joins
        doomed = self.doomed
        while True:
            if self.stopping:
                self.mark(i, self.stop_state, self.stop_reason)
                ok = False
            elif i in doomed:
                self.mark(i, TaskState.SKIPPED, doomed[i])
                ok = False
            else:
                ok = self.execute_task(i)
            nxt = None
            more = None
            if not self.stopping:
                if not ok:
                    why = doomed.get(i) or "upstream %r %s" % (
                        plan.names[i],
                        "failed" if self.run._state[i] == TaskState.FAILED else "skipped")
                    for s in free[i]:
                        doomed[s] = why
                    for s in joins[i]:
                        doomed.setdefault(s, why)
                ready = free[i]
                if joins[i]:
                    ready = list(ready)
                    pending = self.pending
                    with self.lock:
                        for s in joins[i]:
                            left = pending[s] - 1
                            pending[s] = left
                            if not left:
                                ready.append(s)
                if ready:
                    nxt = ready[0]
                    if len(ready) > 1:
                        more = ready[1:]
            if more:
                with self.lock:
                    self.inflight += len(more)
                for s in more:
                    self.ready.put(s)
                self.start_workers(len(more))
            if nxt is None:
                with self.lock:
                    self.inflight -= 1
                    over = self.inflight == 0
                if over:
                    self.finish()
                return
            i = nxt

    def execute_task(self, i):
        """Run one task with its retries; return True when it succeeded."""
        run, plan = self.run, self.plan
        name = plan.names[i]
        fn = plan.funcs[i]
        retries = plan.retries[i]
        timeout = plan.timeouts[i]
        binds = self.binds[i]
        t0 = time.time()
        run._started[i] = t0
        run._state[i] = TaskState.RUNNING
        self.emit(t0, "task.started", i, TaskState.RUNNING)
        attempt = 0
        while True:
            attempt += 1
            run._attempts[i] = attempt
            try:
                if binds:
                    args, kwargs = self.arguments(i, binds)
                else:
                    args, kwargs = [], None
                if plan.ctx[i]:
                    args.insert(0, Context(run, name, attempt))
                if timeout is not None:
                    out = _call_with_deadline(fn, args, kwargs, timeout, name)
                elif kwargs:
                    out = fn(*args, **kwargs)
                else:
                    out = fn(*args)
            except Skip as skip:
                self.mark(i, TaskState.SKIPPED, skip.reason)
                return False
            except Exception as exc:
                if attempt <= retries and not self.stopping:
                    delay = min(plan.nodes[i].retry_delay * 2 ** (attempt - 1),
                                plan.nodes[i].max_retry_delay)
                    self.emit(time.time(), "task.retrying", i, TaskState.RUNNING,
                              {"attempt": attempt + 1, "of": retries + 1,
                               "delay_s": delay, "error": _describe(exc)})
                    if delay and run.cancel_event.wait(delay):
                        self.fail(i, exc)
                        return False
                    continue
                self.fail(i, exc)
                return False
            except BaseException as exc:        # SystemExit and friends: fail, then re-raise
                self.fatal = self.fatal or exc
                self.fail(i, exc)
                self.stop(TaskState.SKIPPED, "run aborted by %s" % type(exc).__name__)
                return False
            t1 = time.time()
            run._ended[i] = t1
            run._state[i] = TaskState.SUCCEEDED
            run.results[name] = out
            self.outputs[i] = out
            self.emit(t1, "task.succeeded", i, TaskState.SUCCEEDED)
            return True


    def arguments(self, i, binds):
        args, kwargs = [], None
        outputs = self.outputs
        for kind, key, path, text, pname, kwonly in binds:
            if kind == _B_CONST:
                value = key
            elif kind == _B_NODE:
                value = outputs[key]
                if path:
                    value = _step(value, path, text)
            elif kind == _B_PARAM:
                value = _step(self.run.params[key], path, text) if path else self.run.params[key]
            elif kind == _B_SCRATCH:
                try:
                    value = self.run.scratch[key]
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
                if kwargs is None:
                    kwargs = {}
                kwargs[pname] = value
            else:
                args.append(value)
        return args, kwargs

    # -- outcomes

    def fail(self, i, exc):
        import traceback
        run = self.run
        run._ended[i] = time.time()
        run._state[i] = TaskState.FAILED
        run._errors[i] = exc
        run._tracebacks[i] = "".join(traceback.format_exception(type(exc), exc,
                                                                exc.__traceback__))
        if run.error is None:
            run.error = exc
        self.emit(run._ended[i], "task.failed", i, TaskState.FAILED, {"error": _describe(exc)})
        if not self.plan.isolate[i]:
            self.stop(TaskState.SKIPPED, "run stopped after %r failed" % self.plan.names[i])

    def mark(self, i, state, reason):
        """End task i without running it (SKIPPED or CANCELLED), or after Skip."""
        run = self.run
        ts = time.time()
        run._ended[i] = ts if run._started[i] is not None else None
        run._state[i] = state
        run._reasons[i] = reason
        self.emit(ts, "task.skipped" if state == TaskState.SKIPPED else "task.cancelled",
                  i, state, {"reason": reason})

    def stop(self, state, reason):
        with self.lock:
            if self.stopping:
                return
            self.stop_state, self.stop_reason = state, reason
            self.stopping = True

    def cancel(self, reason="cancelled"):
        run = self.run
        if run.status != RunState.RUNNING:
            return
        self.stop(TaskState.CANCELLED, reason)
        if self.stop_state == TaskState.CANCELLED:
            run.status = RunState.CANCELLING
            run.cancel_event.set()
            self.emit(time.time(), "run.cancelling", -1, RunState.CANCELLING, {"reason": reason})
        else:
            run.cancel_event.set()

    def finish(self):
        """Called once, by whoever ended the last task: settle states and wake the caller."""
        run = self.run
        if self.stopping:
            for i, state in enumerate(run._state):
                if state == TaskState.PENDING:
                    self.mark(i, self.stop_state, self.stop_reason)
        states = run._state
        if self.stop_state == TaskState.CANCELLED:
            run.status = RunState.CANCELLED
            run.reason = self.stop_reason
        elif TaskState.FAILED in states or self.fatal is not None:
            run.status = RunState.FAILED
            if run.error is None and self.fatal is not None:
                run.reason = "aborted by %s" % _describe(self.fatal)
        else:
            run.status = RunState.COMPLETED
        run.ended_at = time.time()
        self.emit(run.ended_at, "run." + run.status.lower(), -1, run.status)
        for _ in range(self.threads):
            self.ready.put(_STOP)
        self.done.set()


def _call_with_deadline(fn, args, kwargs, timeout, name):
    """Call fn on a daemon thread and give up on it at the deadline.

    The abandoned thread runs on (Python cannot kill a thread) but nothing
    waits for it, and as a daemon it does not keep the process alive.
    """
    import threading
    box = []
    finished = threading.Event()

    def target():
        try:
            box.append((True, fn(*args, **(kwargs or {}))))
        except BaseException as exc:
            box.append((False, exc))
        finished.set()

    threading.Thread(target=target, name="pyoco-" + name, daemon=True).start()
    if not finished.wait(timeout):
        raise TimeoutError("task %r timed out after %gs" % (name, timeout))
    ok, value = box[0]
    if ok:
        return value
    raise value


# ---------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------

def _cute_default():
    return os.environ.get("PYOCO_CUTE", "1").strip().lower() not in ("0", "false", "no", "off")


_write_lock = None


def _write_line(stream, line):
    """Write one whole line; lines from many threads never interleave."""
    global _write_lock
    if _write_lock is None:
        import threading
        _write_lock = threading.Lock()
    stream = stream if stream is not None else sys.stderr
    if stream is None:
        return
    with _write_lock:
        try:
            stream.write(line)
            stream.flush()
        except UnicodeEncodeError:
            encoding = getattr(stream, "encoding", None) or "ascii"
            stream.write(line.encode(encoding, "backslashreplace").decode(encoding))
            stream.flush()
        except (OSError, ValueError):
            pass        # a closed or broken stream must not fail the run


def _flush_stdout():
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _warn(message):

    _write_line(None, "pyoco: warning: %s\n" % message)


def _ms(seconds):
    ms = seconds * 1000
    return "%.2f ms" % ms if ms < 1000 else "%.2f s" % seconds


def _plain_value(value):
    text = value if isinstance(value, str) else str(value)
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    if not text or any(c in text for c in ' "=\n\r\t'):
        text = '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"').replace(
            "\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return text


_PLAIN_WORDS = {
    "run.started": ("INFO", "start"), "run.cancelling": ("WARNING", "cancel"),
    "run.completed": ("INFO", "done"), "run.failed": ("ERROR", "failed"),
    "run.cancelled": ("WARNING", "cancelled"),
    "task.started": ("INFO", "start"), "task.retrying": ("WARNING", "retry"),
    "task.succeeded": ("INFO", "done"), "task.failed": ("ERROR", "error"),
    "task.skipped": ("WARNING", "skip"), "task.cancelled": ("WARNING", "cancelled"),
}


def format_event(run, ev, cute=True):
    """The trace line (without newline) for one event, or None for none."""
    ts, event, i, state, data = ev
    data = data or {}
    if cute:
        if i < 0:
            flow = run.flow_name
            if event == "run.started":
                return "🐇 pyoco > start flow=%s run_id=%s" % (flow, run.run_id)
            if event == "run.completed":
                return "🥕 done flow=%s" % flow
            if event == "run.failed":
                failed = sum(1 for s in run._state if s == TaskState.FAILED)
                return "💔 failed flow=%s (%d task%s failed)" % (flow, failed, "" if failed == 1 else "s")
            if event == "run.cancelling":
                return "🛑 cancel flow=%s" % flow
            if event == "run.cancelled":
                return "🛑 cancelled flow=%s" % flow
            return None
        node = run._plan.names[i]
        if event == "task.started":
            return "🏃 start node=%s" % node
        if event == "task.succeeded":
            return "✅ done node=%s (%s)" % (node, _ms(run._ended[i] - run._started[i]))
        if event == "task.retrying":
            return "🔁 retry node=%s attempt=%d/%d in %gs" % (node, data["attempt"], data["of"],
                                                            data["delay_s"])
        if event == "task.failed":
            return "💥 error node=%s %s" % (node, data.get("error"))
        if event == "task.skipped":
            return "⏭️ skip node=%s (%s)" % (node, data.get("reason"))
        if event == "task.cancelled":
            return "🚫 cancelled node=%s (%s)" % (node, data.get("reason"))
        return None
    level, word = _PLAIN_WORDS.get(event, ("INFO", event))
    if i < 0:
        fields = [("flow", run.flow_name)]
        if event != "run.started":
            fields.append(("status", state))
            if run.ended_at is not None and run.started_at is not None:
                fields.append(("duration_ms", "%.2f" % ((run.ended_at - run.started_at) * 1000)))
    else:
        fields = [("node", run._plan.names[i])]
        if event == "task.succeeded":
            fields.append(("duration_ms", "%.2f" % ((run._ended[i] - run._started[i]) * 1000)))
        elif event == "task.retrying":
            fields.append(("attempt", "%d/%d" % (data["attempt"], data["of"])))
            fields.append(("delay_s", "%g" % data["delay_s"]))
    for key in ("error", "reason"):
        if data.get(key) is not None:
            fields.append((key, data[key]))
    fields.append(("run_id", run.run_id))
    return "%s %s %s %s" % (_iso(ts), level, word,
                            " ".join("%s=%s" % (k, _plain_value(v)) for k, v in fields))


class _TraceWriter:
    """Observer that prints the trace, cute or plain, one line per event."""

    __slots__ = ("stream", "cute")

    def __init__(self, target, cute):
        self.stream = None if target is True else target
        self.cute = cute

    def __call__(self, run, ev):
        line = format_event(run, ev, self.cute)
        if line is not None:
            if self.stream is None:
                _flush_stdout()     # keep task prints and trace lines in order on one pipe
            _write_line(self.stream, line + "\n")


def _logging_observer():
    """An observer feeding the ``pyoco`` logger, if the application set logging up."""
    logging = sys.modules.get("logging")
    if logging is None:
        return None         # nobody imported logging, so nobody listens
    logger = logging.getLogger("pyoco")
    if not logger.hasHandlers() or not logger.isEnabledFor(logging.INFO):
        return None
    levels = {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}

    def observe(run, ev):
        level = levels[_PLAIN_WORDS.get(ev[1], ("INFO",))[0]]
        if logger.isEnabledFor(level):
            line = format_event(run, ev, cute=False)
            logger.log(level, line.split(" ", 2)[2],
                       extra={"pyoco_run_id": run.run_id, "pyoco_event": ev[1]})
    return observe


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
        module_name = "pyoco_flow_" + "".join(
            c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except SyntaxError as exc:
            sys.modules.pop(module_name, None)
            raise UsageError("%s:%s: syntax error: %s" % (exc.filename or target, exc.lineno,
                                                          exc.msg)) from None
        except FlowError as exc:
            sys.modules.pop(module_name, None)
            raise UsageError("%s:%s: %s" % (target, _failing_line(exc, path), exc)) from None
        except BaseException as exc:
            sys.modules.pop(module_name, None)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise UsageError("%s:%s: loading the flow file raised %s"
                             % (target, _failing_line(exc, path), _describe(exc))) from None
        return module
    import importlib
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise UsageError("cannot import %r: %s (a flow is FILE.py or package.module:NAME)"
                         % (target, exc)) from None
    except SyntaxError as exc:
        raise UsageError("%s:%s: syntax error: %s" % (exc.filename, exc.lineno, exc.msg)) from None
    except Exception as exc:
        raise UsageError("importing %r raised %s" % (target, _describe(exc))) from None


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
    if ":" in target and not os.path.exists(target):
        target, _, picked = target.rpartition(":")
        name = name or picked
    module = _load_target(target)
    found = {}
    for var, value in vars(module).items():
        if isinstance(value, Flow) and not var.startswith("_"):
            found.setdefault(id(value), (var, value))
    flows = list(found.values())
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


def _flow_label(var, flow):
    return var if var == flow.name else "%s (variable %s)" % (flow.name, var)


def _parse_params(pairs):
    import json
    params = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError("bad -p %r: expected KEY=VALUE, for example -p day=2026-11-29" % pair)
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params


def render_graph(flow, fmt="text"):
    """The flow's DAG as text, Mermaid or Graphviz dot (a str)."""
    plan = flow._compile()
    names = plan.names
    if fmt == "mermaid":
        ids = {name: "t%d" % i for i, name in enumerate(names)}
        lines = ["flowchart TD"]
        for i, name in enumerate(names):
            lines.append('    %s["%s"]' % (ids[name], name.replace('"', "#quot;")))
        for i, ups in enumerate(plan.preds):
            for up in ups:
                lines.append("    %s --> %s" % (ids[names[up]], ids[names[i]]))
        return "\n".join(lines) + "\n"
    if fmt == "dot":
        def q(text):
            return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')
        lines = ["digraph %s {" % q(flow.name), "    rankdir=LR;"]
        for name in names:
            lines.append("    %s;" % q(name))
        for i, ups in enumerate(plan.preds):
            for up in ups:
                lines.append("    %s -> %s;" % (q(names[up]), q(names[i])))
        return "\n".join(lines + ["}"]) + "\n"
    lines = ["flow %s (%d task%s)" % (flow.name, len(names), "" if len(names) == 1 else "s")]
    for i, name in enumerate(_topological(plan)):
        ups = plan.preds[plan.index[name]]
        lines.append("  %s%s" % (name, " <- " + ", ".join(names[u] for u in ups) if ups else ""))
    return "\n".join(lines) + "\n"


def _topological(plan):
    from graphlib import TopologicalSorter
    order = TopologicalSorter({i: ups for i, ups in enumerate(plan.preds)}).static_order()
    return [plan.names[i] for i in order]


def _build_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog="pyoco", description="Run and inspect pyoco flows.",
        epilog="Exit codes: 0 success, 1 a run failed or check found problems,"
               " 2 usage error, 130 cancelled.")
    parser.add_argument("--version", action="version", version="pyoco " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser("run", help="run a flow", description="Run a flow file's flow.")
    run.add_argument("target", metavar="FLOW", help="FLOW.py or package.module[:NAME]")
    run.add_argument("--flow", help="which flow, by Flow name or variable")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a run parameter; VALUE is JSON when it parses, else a string")
    run.add_argument("--workers", type=int, default=8, help="parallel tasks (default 8)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--cute", dest="cute", action="store_true", default=None,
                      help="emoji trace (the default)")
    mode.add_argument("--non-cute", dest="cute", action="store_false",
                      help="plain ASCII trace for CI logs")

    check = commands.add_parser("check", help="validate a flow without running it",
                                description="Validate a flow; nothing runs.")
    check.add_argument("target", metavar="FLOW")
    check.add_argument("--flow")
    check.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--json", action="store_true", help="machine-readable result")

    graph = commands.add_parser("graph", help="print a flow's DAG",
                                description="Print a flow's DAG.")
    graph.add_argument("target", metavar="FLOW")
    graph.add_argument("--flow")
    graph.add_argument("--format", choices=("text", "mermaid", "dot"), default="text")
    return parser


def _cmd_run(args):
    if args.workers < 1:
        raise UsageError("--workers must be at least 1, not %d" % args.workers)
    params = _parse_params(args.param)
    flow = load_flow(args.target, args.flow)
    engine = Engine(workers=args.workers, cute=args.cute)
    try:
        flow.validate(params)
    except FlowError as exc:
        raise UsageError("%s: %s" % (args.target, exc)) from None
    try:
        engine.run(flow, params)
    except RunFailed as exc:
        _write_line(None, "pyoco: %s\n" % exc)
        return 1
    except RunCancelled as exc:
        _write_line(None, "pyoco: %s\n" % exc)
        return 130
    return 0


def _cmd_check(args):
    import json
    params = _parse_params(args.param)
    flow = load_flow(args.target, args.flow)
    problems, needs = [], []
    try:
        needs = flow.validate(params if args.param else None)
    except FlowError as exc:
        problems.append(str(exc))
    if args.json:
        report = {"ok": not problems, "flow": flow.name, "problems": problems,
                  "tasks": [n.name for n in flow.tasks] if not problems else [],
                  "needs_params": sorted({p for _, p in needs})}
        print(json.dumps(report, indent=2))
    elif problems:
        for problem in problems:
            print("problem: %s" % problem)
    else:
        print("ok: flow %s, %d task%s" % (flow.name, len(flow), "" if len(flow) == 1 else "s"))
        for task_name, pname in needs:
            print("  needs run parameter %r (for task %r): pass -p %s=..."
                  % (pname, task_name, pname))
    return 1 if problems else 0


def _cmd_graph(args):
    flow = load_flow(args.target, args.flow)
    try:
        sys.stdout.write(render_graph(flow, args.format))
    except FlowError as exc:
        raise UsageError("%s: %s" % (args.target, exc)) from None
    return 0


def main(argv=None):
    """The command line: ``pyoco``, ``python -m pyoco`` and ``python pyoco.py``."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler = {"run": _cmd_run, "check": _cmd_check, "graph": _cmd_graph}[args.command]
    try:
        return handler(args)
    except UsageError as exc:
        _write_line(None, "pyoco %s: error: %s\n" % (args.command, exc))
        return 2
    except KeyboardInterrupt:
        return 130


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
        "models": {"Flow": Flow, "Task": Task, "FunctionTask": FunctionTask, "task": task},
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


_register_aliases()


if __name__ == "__main__":
    # Hand over to the module under its import name, so that flow files which
    # `import pyoco` share its classes with the command line.
    import pyoco
    sys.exit(pyoco.main())
