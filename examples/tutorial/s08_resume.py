"""Step 8a: the run history and --resume.

    GARDEN_FROZEN=1 python -m pyoco run examples/tutorial/s08_resume.py   # fails
    python -m pyoco runs list
    python -m pyoco run examples/tutorial/s08_resume.py --resume RUN_ID  # re-runs what failed
"""
import os

from pyoco import Engine, Flow, task


@task
def buy_seeds(ctx):
    print("🛒 buying seeds (this costs carrots, do it once!)")
    return ["nantes", "chantenay", "imperator"]


@task
def plant(ctx, buy_seeds):
    if os.environ.get("GARDEN_FROZEN") == "1":
        raise RuntimeError("the ground is frozen ❄️")
    print("🌱 planted %d kinds of carrots" % len(buy_seeds))
    ctx.log.info("planted %s", ", ".join(buy_seeds))
    return len(buy_seeds)


@task
def water(ctx, plant):
    print("💧 watered %d rows" % plant)


flow = Flow(name="spring")
flow >> buy_seeds >> plant >> water

if __name__ == "__main__":
    Engine().run(flow)
