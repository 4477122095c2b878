"""Use tasks from an installed plugin (pip install ./examples/pyoco-plugin-demo).

    python -m pyoco run examples/plugin_flow.py -p text="hello plugins"
"""
import pyoco
from pyoco import Flow, task


@task
def text(ctx):
    return ctx.params.get("text", "hello from a plugin")


shout = pyoco.plugin_task("shout", inputs={"text": "$node.text.output", "marks": 3})
count = pyoco.plugin_task("word_count", name="count", inputs={"text": "$node.text.output"})


@task
def report(ctx, shout, count):
    print("%s (%d words)" % (shout, count))
    return {"shout": shout, "words": count}


flow = Flow(name="plugin_demo")
flow >> text >> [shout, count] >> report

if __name__ == "__main__":
    pyoco.Engine().run(flow)
