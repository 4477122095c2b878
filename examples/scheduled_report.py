"""A flow that `pyoco serve` starts on its own, at 06:30 on weekdays in Tokyo.

    pyoco check examples/scheduled_report.py      # the schedule and its next three times
    pyoco run examples/scheduled_report.py        # once, now, by hand
    pyoco serve examples/scheduled_report.py      # runs it at its times; the page at / shows it
"""

from pyoco import Flow, task


@task
def count_orders(ctx):
    # Stands for a query; a scheduled run gets no -p parameters, so defaults matter.
    return {"orders": 42, "refunds": 3}


@task
def write_report(ctx, count_orders):
    text = "orders: %(orders)d, refunds: %(refunds)d\n" % count_orders
    return ctx.save_artifact("report.txt", text)


flow = Flow(name="morning_report", schedule="30 6 * * mon-fri", schedule_tz="Asia/Tokyo",
            schedule_catchup="latest")      # after downtime, run once for the time missed last
flow >> count_orders >> write_report
