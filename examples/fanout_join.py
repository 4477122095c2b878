"""Fan out, then join: checksum eight chunks of data in parallel.

hashlib releases the GIL while it hashes a large buffer, so the eight
`checksum_*` tasks really run at the same time on eight threads.

    python examples/fanout_join.py              # or: python -m pyoco run examples/fanout_join.py
"""
import hashlib
import os

from pyoco import Engine, Flow, task

CHUNKS = 8
CHUNK_BYTES = 4 * 1024 * 1024


@task
def make_data(ctx):
    # A seed from the run parameters keeps the data (and the digest) reproducible.
    seed = str(ctx.params.get("seed", "pyoco")).encode()
    block = hashlib.sha256(seed).digest() * (CHUNK_BYTES // 32)
    ctx.scratch["chunks"] = [bytes([n]) + block[1:] for n in range(CHUNKS)]
    return CHUNKS


def checksum_task(n):
    @task(name="checksum_%d" % n)
    def checksum(ctx):
        digest = hashlib.sha256()
        for _ in range(8):                      # enough work to see the overlap
            digest.update(ctx.scratch["chunks"][n])
        return digest.hexdigest()
    return checksum


checksums = [checksum_task(n) for n in range(CHUNKS)]


@task
def combine(ctx):
    parts = [ctx.results["checksum_%d" % n] for n in range(CHUNKS)]
    total = hashlib.sha256("".join(parts).encode()).hexdigest()
    print("combined digest of %d chunks: %s" % (len(parts), total[:16]))
    return total


flow = Flow(name="fanout_join")
flow >> make_data >> checksums >> combine

if __name__ == "__main__":
    run = Engine(workers=int(os.environ.get("WORKERS", "8"))).run(flow)
    print("run %s %s in %.0f ms" % (run.run_id, run.status, run.duration_ms))
