"""Step 9: a flow worth watching. Runs fine, unless there are no carrots.

    python -m pyoco run examples/tutorial/s09_watched.py -p carrots=5
    python -m pyoco run examples/tutorial/s09_watched.py -p carrots=0    # fails
    python -m pyoco serve --port 8080 examples/tutorial/s09_watched.py
"""
import time

from pyoco import Engine, Flow, task


@task
def count(ctx, carrots=3):
    time.sleep(0.05)
    if carrots <= 0:
        raise ValueError("the basket is empty")
    return carrots


@task
def share(ctx, count):
    print("🐇 %d carrots for %d friends" % (count, count * 2))


flow = Flow(name="snack")
flow >> count >> share

if __name__ == "__main__":
    Engine().run(flow)
