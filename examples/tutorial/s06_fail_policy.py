"""Step 6b: fail policies. What happens to the rest when one task fails?

    python -m pyoco run examples/tutorial/s06_fail_policy.py                # isolate
    LETTUCE_POLICY=stop python -m pyoco run examples/tutorial/s06_fail_policy.py
"""
import os
import time

from pyoco import Engine, Flow, task


@task
def pick_lettuce(ctx):
    time.sleep(0.05)            # searches a little first
    raise ValueError("a snail ate the lettuce 🐌")


@task
def wash_lettuce(ctx, pick_lettuce):
    return "clean " + pick_lettuce


@task
def pick_carrots(ctx):
    time.sleep(0.2)             # still busy when the lettuce fails
    return 12


@task
def cook_carrots(ctx, pick_carrots):
    print("🥕 cooking %d carrots" % pick_carrots)


# "isolate": only what depends on the lettuce is skipped; "stop" (the default):
# nothing new starts anywhere once a task has failed.
pick_lettuce.task.fail_policy = os.environ.get("LETTUCE_POLICY", "isolate")

flow = Flow(name="dinner")
flow >> pick_lettuce >> wash_lettuce
flow >> pick_carrots >> cook_carrots

if __name__ == "__main__":
    Engine().run(flow)
