import gc, time, sys, os
sys.path.insert(0, "/work/wt/overload/src")
from ultrafastbert.infer import Predictor
from ultrafastbert.serve import ServeConfig, create_app
pred = Predictor.from_pretrained("/work/runs/minilm-8x7")
app = create_app(pred, ServeConfig(model_name="m"))
pred.embed(["warm up"] * 4)
def full():
    best = []
    for _ in range(5):
        t = time.perf_counter(); gc.collect(); best.append(time.perf_counter() - t)
    return 1000 * min(best), 1000 * max(best)
print("objects tracked", len(gc.get_objects()))
print("full collection ms (min, max of 5) before freeze: %.1f, %.1f" % full())
gc.freeze()
print("after gc.freeze (%d frozen): %.1f, %.1f" % ((gc.get_freeze_count(),) + full()))
print("loadavg", os.getloadavg()[0])
