"""Step 7a: tasks as classes. One class, several configured nodes.

    python -m pyoco run examples/tutorial/s07_task_class.py
    python examples/tutorial/s07_task_class.py
"""
from pyoco import Engine, Flow, Task, task


@task
def basket(ctx):
    return ["carrot", "radish", "carrot", "leek", "carrot", "radish"]


class Count(Task):
    """Count one kind of vegetable in the basket."""

    retries = 1                     # options are class attributes...

    def __init__(self, vegetable, **options):
        # ...or constructor arguments; each node needs its own name.
        super().__init__(name="count_" + vegetable, **options)
        self.vegetable = vegetable

    def run(self, ctx, basket):
        return basket.count(self.vegetable)


count_carrots = Count("carrot")
count_radishes = Count("radish", timeout=5)


@task
def tally(ctx, count_carrot, count_radish):
    print("🥕 carrots: %d, radishes: %d" % (count_carrot, count_radish))


flow = Flow(name="tally")
flow >> basket >> [count_carrots, count_radishes] >> tally

if __name__ == "__main__":
    Engine().run(flow)
