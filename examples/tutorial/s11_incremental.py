"""Step 11: incremental runs: reuse what has not changed, plan, pick tasks, override.

    python -m pyoco run examples/tutorial/s11_incremental.py -p rows=3
    python -m pyoco run examples/tutorial/s11_incremental.py -p rows=3    # all reused
    python -m pyoco run examples/tutorial/s11_incremental.py -p rows=4 --plan
    python -m pyoco run examples/tutorial/s11_incremental.py --only harvest -p rows=5
    python examples/tutorial/s11_incremental.py                           # a unit test
"""
from pyoco import Engine, Flow, task


@task(cache=True)
def harvest(ctx, rows):
    print("🧺 harvesting %d rows" % rows)
    return {"carrots": 12 * rows}


@task(cache=True, version="1")
def weigh(ctx, harvest):
    kilos = round(harvest["carrots"] * 0.08, 1)
    print("⚖️ %s kg" % kilos)
    return kilos


@task(cache=False)
def announce(ctx, weigh):
    print("📣 today's harvest: %s kg of carrots" % weigh)


flow = Flow(name="harvest")
flow >> harvest >> weigh >> announce

if __name__ == "__main__":
    # Overrides make a unit test of the flow: harvest is not called, weigh gets the value.
    run = Engine(trace=False, store=False).run(flow, overrides={"harvest": {"carrots": 100}})
    assert run.results["weigh"] == 8.0
    assert run.tasks["harvest"].reason == "overridden"
    print("🧪 the flow weighs 100 carrots as 8.0 kg")
