"""Step 4a: fan out, then join. Three slow errands run at the same time.

    python -m pyoco run examples/tutorial/s04_fanout.py
    python examples/tutorial/s04_fanout.py
"""
import time

from pyoco import Engine, Flow, task


@task
def wake_up(ctx):
    print("🐇 three errands before planting")


@task
def check_weather(ctx):
    time.sleep(0.3)             # pretend this is a slow web request
    return "sunny"


@task
def check_soil(ctx):
    time.sleep(0.3)
    return "moist"


@task
def count_seeds(ctx):
    time.sleep(0.3)
    return 24


@task
def plant(ctx, check_weather, check_soil, count_seeds):
    # A join: runs once all three errands are done, and gets their outputs by name.
    print("🥕 %s sky, %s soil: planting %d seeds" % (check_weather, check_soil, count_seeds))
    return count_seeds


flow = Flow(name="fanout")
flow >> wake_up >> [check_weather, check_soil, count_seeds] >> plant

if __name__ == "__main__":
    run = Engine().run(flow)
    print("all done in %.1f s" % run.duration)
