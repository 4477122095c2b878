"""Step 8b: stopping politely. Press Ctrl+C while it digs.

    python -m pyoco run examples/tutorial/s08_ctrl_c.py          # then Ctrl+C
    python -m pyoco run examples/tutorial/s08_ctrl_c.py --resume RUN_ID -p metres=3
"""
from pyoco import Engine, Flow, task


@task
def dig_tunnel(ctx, metres=100):
    print("🐇 digging %d metres" % metres)
    for metre in range(1, metres + 1):
        # Wait 0.1 s per metre, but wake up at once when the run is cancelled.
        if ctx.cancelled.wait(0.1):
            # Raise rather than return: a task that returns normally counts as
            # SUCCEEDED, and --resume would reuse its half-dug tunnel.
            raise InterruptedError("stopped after %d metres" % (metre - 1))
    return metres


@task
def move_in(ctx, dig_tunnel):
    print("🏡 moved into a %d metre tunnel" % dig_tunnel)


flow = Flow(name="tunnel")
flow >> dig_tunnel >> move_in
