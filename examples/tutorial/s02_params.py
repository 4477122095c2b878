"""Step 2: run parameters. The same flow, different gardens.

    python -m pyoco run examples/tutorial/s02_params.py -p garden=north
    python -m pyoco run examples/tutorial/s02_params.py -p garden=south -p rows=5
"""
from pyoco import Engine, Flow, task


@task
def plan(ctx, garden, rows=3):
    # `garden` has no default, so the run must pass it: -p garden=...
    # `rows` falls back to 3 when nobody passes -p rows=...
    print("🐇 planning %d rows in the %s garden" % (rows, garden))
    return rows


@task
def harvest(ctx, plan):
    # Everything passed with -p is also in ctx.params, defaults are not.
    print("🥕 harvested %d carrots (params: %s)" % (plan * 10, ctx.params))


flow = Flow(name="garden")
flow >> plan >> harvest

if __name__ == "__main__":
    Engine().run(flow, params={"garden": "north"})
