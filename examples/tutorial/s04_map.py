"""Step 4b: dynamic fan-out with .map(): one task instance per item.

    python -m pyoco run examples/tutorial/s04_map.py
    python -m pyoco run examples/tutorial/s04_map.py -p rows=5
"""
from pyoco import Engine, Flow, task


@task
def list_rows(ctx, rows=3):
    # How many rows there are is only known when the flow runs.
    return list(range(1, rows + 1))


@task
def harvest_row(ctx, row):
    # The item arrives as the first parameter after ctx.
    carrots = 5 * row
    print("🥕 row %d gave %d carrots" % (row, carrots))
    return carrots


@task
def weigh(ctx, harvest_row):
    # Downstream, harvest_row's output is the list of all instance outputs, in order.
    print("🐇 %d rows, %d carrots in all" % (len(harvest_row), sum(harvest_row)))
    return sum(harvest_row)


flow = Flow(name="harvest")
flow >> list_rows >> harvest_row.map("$node.list_rows.output") >> weigh

if __name__ == "__main__":
    Engine().run(flow)
