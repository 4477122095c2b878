"""Step 10: flow control: pools and rates, conditions, cleanup and alerts.

    python -m pyoco run examples/tutorial/s10_flow_control.py
    python -m pyoco run examples/tutorial/s10_flow_control.py -p flaky=true   # the alert fires
    python -m pyoco run examples/tutorial/s10_flow_control.py --pool market=1  # one call at a time
"""
from pyoco import Flow, task


@task
def carrots(ctx):
    return ["nantes", "chantenay", "danvers", "imperator"]


@task(pool="market")
def price(ctx, carrot, flaky=False):
    if flaky and carrot == "danvers":
        raise ConnectionError("the market hung up")
    return {"carrot": carrot, "cents": 10 * len(carrot)}


@task
def compare(ctx, price):
    return {"changed": any(p["cents"] > 80 for p in price)}


@task(when="$node.compare.output.changed", inputs={"prices": "$node.price.output"})
def publish(ctx, prices):
    print("🥕 new prices:", ", ".join("%(carrot)s %(cents)d¢" % p for p in prices))


@task(run_if="any_failed")
def alert(ctx):
    print("📣 something failed: telling the gardener")


@task(run_if="all_done")
def tidy(ctx):
    print("🧹 baskets put away")


flow = Flow(name="market", pools={"market": {"size": 2, "rate": "20/s"}})
priced = price.map("$node.carrots.output")
flow >> carrots >> priced >> compare >> publish >> tidy
flow.add(alert, after=[priced, compare, publish])
