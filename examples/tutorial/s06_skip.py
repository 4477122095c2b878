"""Step 6c: ctx.skip for branches that only sometimes apply.

    python -m pyoco run examples/tutorial/s06_skip.py
    python -m pyoco run examples/tutorial/s06_skip.py -p weather=rainy
"""
from pyoco import Engine, Flow, task


@task
def forecast(ctx, weather="sunny"):
    return weather


@task
def water_garden(ctx, forecast):
    if forecast == "rainy":
        ctx.skip("it rained, the garden is wet already")
    print("💧 watering the carrots")
    return 20


@task
def log_watering(ctx, water_garden):
    print("📒 used %d litres" % water_garden)


@task
def pick_carrots(ctx, forecast):
    print("🥕 picking carrots on a %s day" % forecast)


flow = Flow(name="weather")
flow >> forecast >> water_garden >> log_watering
flow >> forecast >> pick_carrots

if __name__ == "__main__":
    Engine().run(flow, params={"weather": "rainy"})
