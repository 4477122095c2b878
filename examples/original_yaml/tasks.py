"""The tasks of flow.yaml, a flow file in the original pyoco's YAML format.

Run it from this folder (PyYAML must be installed: pip install pyyaml):

    pyoco run --config flow.yaml --flow harvest -p rows=4
    pyoco check flow.yaml
    pyoco graph flow.yaml

The end of this file builds the same flow in Python, for comparison (no PyYAML
needed): pyoco run tasks.py -p rows=4
"""

from pyoco import Flow, Task, task


@task
def plant(ctx, rows):
    print("planting %d rows" % rows)
    return ["carrot"] * rows


@task
def water(ctx):
    return "damp"


def count(ctx, seeds, soil):
    """A plain function: flow.yaml names it with callable: "tasks:count"."""
    return {"carrots": len(seeds), "soil": soil}


@task
def sell(ctx, crop):
    if crop["carrots"] > 10:
        raise ValueError("the stall holds 10 carrots, not %d" % crop["carrots"])
    return "sold %d carrots" % crop["carrots"]


@task
def pickle_them(ctx, crop):
    return "pickled %d carrots" % crop["carrots"]


@task
def report(ctx):
    done = [ctx.results[name] for name in ("sell", "pickle_them") if name in ctx.results]
    print("report: " + "; ".join(done))
    return done


# The flow of flow.yaml, written in Python.
counted = Task(func=count, name="count", outputs=["scratch.harvest"],
               inputs={"seeds": "$node.plant.output", "soil": "$node.water.output"})
sell.task.inputs = {"crop": "$ctx.scratch.harvest"}
sell.task.fail_policy = "isolate"
pickle_them.task.inputs = {"crop": "$ctx.scratch.harvest"}

harvest = Flow("harvest")
harvest >> (plant & water) >> counted >> (sell | pickle_them) >> report
