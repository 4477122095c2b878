"""Load on `pyoco serve`: many concurrent clients scraping /metrics.

    python bench/serve_load.py                       # 1,000 runs, 16 clients, 10,000 requests
    python bench/serve_load.py --runs 200 --requests 2000 --clients 8

It fills a temporary run store with finished runs (completed, failed and
skipped tasks, over a few flows), starts the real server on 127.0.0.1 in this
process, and lets client threads send keep-alive requests over
http.client. It prints the latency percentiles, the throughput and the
number of errors, and exits 1 if any request failed.

The client threads share the interpreter (and its GIL) with the server, so
their own work inflates the latencies. For the server alone, serve the same
store and load it from another process, for example with wrk (Debian
package `wrk`):

    python bench/serve_load.py --serve-only &        # prints the URL
    wrk -t2 -c16 -d10s --latency http://127.0.0.1:PORT/metrics
"""
import argparse
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyoco  # noqa: E402
from pyoco import Engine, Flow, task  # noqa: E402


def fill_store(path, runs):
    flows = []
    for n in range(4):
        @task(name="extract")
        def extract(ctx):
            return list(range(3))

        @task(name="transform", fail_policy="isolate")
        def transform(ctx, extract):
            if ctx.params.get("fail"):
                raise ValueError("bad row")
            return sum(extract)

        @task(name="load")
        def load(ctx, transform):
            if ctx.params.get("skip"):
                ctx.skip("nothing to load")
            return transform

        flow = Flow("flow_%d" % n)
        flow >> extract >> transform >> load
        flows.append(flow)
    engine = Engine(trace=False, store=path)
    for k in range(runs):
        params = {"fail": k % 7 == 0, "skip": k % 11 == 0}
        engine.run(flows[k % len(flows)], params, raise_on_failure=False)


def client(host, port, count, latencies, errors):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for _ in range(count):
        start = time.perf_counter()
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200 or b"pyoco_runs_total" not in body:
                errors.append(response.status)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
        latencies.append(time.perf_counter() - start)
    conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--serve-only", action="store_true",
                        help="fill the store, print the URL and serve until Ctrl+C")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyoco-load-") as folder:
        t0 = time.perf_counter()
        fill_store(folder, args.runs)
        print("store: %d runs written in %.1f s" % (args.runs, time.perf_counter() - t0))
        server = pyoco.Server(folder, port=0).start()
        if args.serve_only:
            print(server.url + "/metrics", flush=True)
            try:
                server.thread.join()
            except KeyboardInterrupt:
                server.close()
            return 0
        t0 = time.perf_counter()
        server.view.refresh(force=True)
        print("first scan of the store: %.0f ms" % ((time.perf_counter() - t0) * 1000))
        latencies, errors = [], []
        per_client = args.requests // args.clients
        threads = [threading.Thread(target=client, args=("127.0.0.1", server.port, per_client,
                                                          latencies, errors))
                   for _ in range(args.clients)]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t0
        server.close()
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000
    print("%d requests from %d clients in %.1f s: %.0f requests/s" % (
        len(latencies), args.clients, elapsed, len(latencies) / elapsed))
    print("latency ms: p50 %.2f  p90 %.2f  p99 %.2f  max %.2f  mean %.2f" % (
        pct(50), pct(90), pct(99), latencies[-1] * 1000, statistics.mean(latencies) * 1000))
    print("errors: %d" % len(errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
