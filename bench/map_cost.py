"""What a dynamic fan-out costs: task.map over N items against the same fan-out
written out statically, both with 8 workers, trace and store off.

    python bench/map_cost.py            # N = 1,000, 9 interleaved repetitions
    python bench/map_cost.py 10000 5
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyoco import Engine, Flow, task  # noqa: E402


def mapped_flow(n):
    @task
    def items(ctx):
        return list(range(n))

    @task
    def double(ctx, x):
        return 2 * x

    @task
    def total(ctx, double):
        return sum(double)

    flow = Flow("mapped")
    flow >> items >> double.map("$node.items.output") >> total
    return flow


def static_flow(n):
    @task
    def items(ctx):
        return list(range(n))

    def one(k):
        @task(name="double_%d" % k)
        def double(ctx):
            return 2 * k
        return double

    @task
    def total(ctx):
        return sum(v for name, v in ctx.results.items() if name.startswith("double_"))

    flow = Flow("static")
    flow >> items >> [one(k) for k in range(n)] >> total
    return flow


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    engine = Engine(workers=8, trace=False, store=False)
    flows = {"map": mapped_flow(n), "static": static_flow(n)}
    expected = n * (n - 1)
    times = {name: [] for name in flows}
    for name, flow in flows.items():        # compile once, as a program that runs often would
        engine.run(flow)
    for _ in range(reps):
        for name, flow in flows.items():
            t0 = time.perf_counter()
            run = engine.run(flow)
            times[name].append(time.perf_counter() - t0)
            assert run.results["total"] == expected, (name, run.results["total"])
    tasks = n + 2
    print("%d items, workers=8, median of %d interleaved runs" % (n, reps))
    for name in flows:
        median = statistics.median(times[name])
        print("  %-6s %8.2f ms  %6.2f us/task" % (name, median * 1000, median / tasks * 1e6))
    ratios = [m / s for m, s in zip(times["map"], times["static"])]
    print("  map/static (paired): %.2fx" % statistics.median(ratios))


if __name__ == "__main__":
    main()
