"""Step 7b: tasks from an installed plugin (examples/pyoco-plugin-demo).

    python -m pip install --no-deps --no-index --target /tmp/pyoco-plugins examples/pyoco-plugin-demo
    PYTHONPATH=/tmp/pyoco-plugins python -m pyoco run examples/tutorial/s07_plugin.py -p text="carrots are crunchy"
"""
import pyoco
from pyoco import Engine, Flow, task


@task
def text(ctx, text="hello carrot"):
    return text


# Plugin tasks are found by name; options work like those of @task.
shout = pyoco.plugin_task("shout", inputs={"marks": 3})
backwards = pyoco.plugin_task("reverse", name="backwards")
words = pyoco.plugin_task("word_count")     # the node is named "word_count"


@task
def show(ctx, shout, backwards, word_count):
    print("🐇 %s / %s / %d words" % (shout, backwards, word_count))


flow = Flow(name="plugins")
flow >> text >> [shout, backwards, words] >> show

if __name__ == "__main__":
    Engine().run(flow)
