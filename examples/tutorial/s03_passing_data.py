"""Step 3: passing data between tasks.

    python -m pyoco run examples/tutorial/s03_passing_data.py
    python examples/tutorial/s03_passing_data.py
"""
from pyoco import Engine, Flow, task


@task
def pick(ctx):
    return {"basket": {"carrots": 12, "radishes": 3}, "picker": "usagi"}


@task
def count(ctx, pick):
    # Wired by name: the parameter is called like the upstream task,
    # so it receives pick's whole output.
    return sum(pick["basket"].values())


@task
def report(ctx, count, carrots, who):
    # count: wired by name again. carrots and who: wired by expression,
    # reaching into pick's output with .key steps (see inputs below).
    print("🐇 %s picked %d vegetables, %d of them carrots 🥕" % (who, count, carrots))
    return {"total": count, "carrots": carrots}


report.task.inputs = {
    "carrots": "$node.pick.output.basket.carrots",
    "who": "$node.pick.output.picker",
}

flow = Flow(name="passing_data")
flow >> pick >> count >> report

if __name__ == "__main__":
    run = Engine().run(flow)
    print(run.results["report"])
