"""Step 6a: retries and timeouts.

    python -m pyoco run examples/tutorial/s06_retries.py
    python -m pyoco run examples/tutorial/s06_retries.py -p nap=2      # too long: times out
"""
import time

from pyoco import Engine, Flow, task


@task(retries=2, retry_delay=0.1)
def dig(ctx):
    # Fails twice, then works: like a flaky network call.
    if ctx.attempt < 3:
        raise ConnectionError("the ground is frozen (attempt %d)" % ctx.attempt)
    return "a cosy burrow"


@task(timeout=1.0)
def nap(ctx, dig, nap=0.1):
    time.sleep(nap)
    print("🐇 napped %gs in %s" % (nap, dig))


flow = Flow(name="burrow")
flow >> dig >> nap

if __name__ == "__main__":
    Engine().run(flow)
