"""What a task costs on each executor: threads, processes, a Dask LocalCluster
and a local Ray, with 8 tasks in flight, trace and store off.

    python bench/executors.py            # 200 no-op tasks, 3 repetitions
    python bench/executors.py 500 5

For each executor it prints the cost per task, (T(N) - T(1)) / (N - 1) over
runs on an executor that stays open (so cluster start-up is not in it), and
what a one-task `Engine(executor=SPEC)` run costs from nothing, start-up and
close included. Dask and Ray are measured when their packages import, and
skipped with a note otherwise.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyoco import Engine, Flow, task  # noqa: E402

WORKERS = 8


@task
def items(ctx, n):
    return list(range(n))


@task
def nothing(ctx, x):
    return x


def fan_out():
    flow = Flow("fan-out")
    flow >> items >> nothing.map("$node.items.output")
    return flow


def timed(engine, flow, n):
    began = time.perf_counter()
    run = engine.run(flow, {"n": n})
    took = time.perf_counter() - began
    assert run.status == "COMPLETED" and len(run.results["nothing"]) == n, run.status
    return took


def per_task(executor, n, reps):
    """Median seconds per task on an executor that stays open."""
    engine = Engine(workers=WORKERS, trace=False, store=False, executor=executor)
    flow = fan_out()
    timed(engine, flow, n)          # warm: worker processes started, modules imported
    costs = []
    for _ in range(reps):
        one, many = timed(engine, flow, 1), timed(engine, flow, n)
        costs.append((many - one) / (n - 1))
    return statistics.median(costs)


def from_nothing(spec):
    """Seconds for a one-task run on SPEC, opening and closing it."""
    return timed(Engine(workers=WORKERS, trace=False, store=False, executor=spec),
                 fan_out(), 1)


def held_dask():
    """A LocalCluster as pyoco's "dask" makes one for 8 workers, kept open."""
    import logging
    from distributed import Client, LocalCluster
    n = min(WORKERS, os.cpu_count() or 1)
    cluster = LocalCluster(n_workers=n, threads_per_worker=-(-WORKERS // n), processes=True,
                           host="127.0.0.1", dashboard_address=None,
                           silence_logs=logging.ERROR)
    client = Client(cluster)

    def close():
        client.close()
        cluster.close()
    return client.get_executor(pure=False), close


def held_ray():
    """A local Ray as pyoco's "ray" starts one; Engine(executor="ray") then uses it."""
    import logging
    import ray
    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.ERROR)
    return "ray", ray.shutdown


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print("executor cost, %d no-op tasks, %d workers, median of %d, Python %s, %d cores"
          % (n, WORKERS, reps, sys.version.split()[0], os.cpu_count() or 1))
    print("%-8s %14s %22s" % ("spec", "per task", "1-task run from nothing"))
    for spec, holder, package in (("thread", None, None), ("process", None, None),
                                  ("dask", held_dask, "distributed"),
                                  ("ray", held_ray, "ray")):
        if package is not None:
            try:
                __import__(package)
            except ImportError:
                print("%-8s skipped: pip install %s" % (spec, package))
                continue
        start = from_nothing(spec)
        executor, close = holder() if holder else (spec, None)
        try:
            cost = per_task(executor, n, reps)
        finally:
            if close is not None:
                close()
        print("%-8s %11.3f ms %19.2f s" % (spec, cost * 1000, start))


if __name__ == "__main__":
    main()
