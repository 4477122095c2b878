"""Step 1: a first flow. Three tasks, one after the other.

    python -m pyoco run examples/tutorial/s01_hello.py
    python examples/tutorial/s01_hello.py
"""
from pyoco import Engine, Flow, task


@task
def wake_up(ctx):
    print("🐇 yawn... good morning")


@task
def find_carrot(ctx):
    print("🥕 there is a carrot in the garden")


@task
def eat(ctx):
    print("munch munch munch")


flow = Flow(name="hello")
flow >> wake_up >> find_carrot >> eat

if __name__ == "__main__":
    Engine().run(flow)
