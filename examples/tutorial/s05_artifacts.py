"""Step 5: artifacts and ctx.scratch. Pass handles, not copies.

    python -m pyoco run examples/tutorial/s05_artifacts.py
    python -m pyoco run examples/tutorial/s05_artifacts.py -p rows=100000
"""
import csv
import sqlite3

from pyoco import Engine, Flow, task


@task
def measure(ctx, rows=1000):
    # Write the big data once, as an artifact file in the run's folder...
    lines = ["row,carrots"] + ["%d,%d" % (n, n % 7) for n in range(rows)]
    path = ctx.save_artifact("harvest.csv", "\n".join(lines) + "\n")
    # ...and hand on only its path (a short string), not the data.
    return path


@task(cache=False)
def open_db(ctx):
    # An in-process handle goes into ctx.scratch, shared by the run's tasks.
    # Tasks run on different threads, hence check_same_thread=False.
    # cache=False: a resumed run (step 8) must open it again, it is not saved.
    ctx.scratch["db"] = sqlite3.connect(":memory:", check_same_thread=False)


@task
def load(ctx, db, measure):
    with open(measure, newline="") as f:
        rows = [(int(r["row"]), int(r["carrots"])) for r in csv.DictReader(f)]
    db.execute("CREATE TABLE harvest (row INTEGER, carrots INTEGER)")
    db.executemany("INSERT INTO harvest VALUES (?, ?)", rows)
    return len(rows)


@task
def report(ctx, db):
    (total,) = db.execute("SELECT SUM(carrots) FROM harvest").fetchone()
    path = ctx.save_artifact("report.txt", "carrots: %d\n" % total)
    print("🥕 %d carrots; artifacts: %s" % (total, sorted(ctx.artifacts)))
    return path


load.task.inputs = {"db": "$ctx.scratch.db"}
report.task.inputs = {"db": "$ctx.scratch.db"}

flow = Flow(name="artifacts")
flow >> [measure, open_db] >> load >> report

if __name__ == "__main__":
    run = Engine().run(flow)
    print("the report is at", run.results["report"])
