"""Step 6d: async tasks. One task, many waits at once.

    python -m pyoco run examples/tutorial/s06_async.py
    python -m pyoco run examples/tutorial/s06_async.py -p delay=5     # times out at 1 s
"""
import asyncio

from pyoco import Engine, Flow, task


@task(timeout=1.0)
async def ask_neighbours(ctx, delay=0.2):
    async def ask(name):
        try:
            await asyncio.sleep(delay)          # pretend: an HTTP call
            return "%s says sunny" % name
        except asyncio.CancelledError:
            print("🦔 %s was interrupted" % name)
            raise

    # Three questions at once: about `delay` seconds in all, not three times that.
    return await asyncio.gather(*(ask(n) for n in ("owl", "fox", "hedgehog")))


@task
def decide(ctx, ask_neighbours):
    for answer in ask_neighbours:
        print("🐇 " + answer)


flow = Flow(name="neighbours")
flow >> ask_neighbours >> decide

if __name__ == "__main__":
    Engine().run(flow)
