"""Does a Python thread that works half the time (like the server's event loop at 8x) slow the
model more than the same work in another process? And how late does that thread wake up?
(GIL contention vs CPU contention)"""
import json, multiprocessing as mp, os, sys, threading, time
import numpy as np, torch
sys.path.insert(0, "/work/wt/overload/src")
from ultrafastbert.infer import Predictor

def hog(stop, lates, duty_ms=3.0):
    vec = np.random.rand(16, 384).astype(np.float32)
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < duty_ms / 1000:
            json.dumps([v.tolist() for v in vec])
        due = time.perf_counter() + duty_ms / 1000
        time.sleep(duty_ms / 1000)
        lates.append(time.perf_counter() - due)

def proc_hog(stop, q):
    lates = []
    hog(stop, lates)
    q.put(lates)

def pct(v, q):
    v = sorted(v); return 1000 * v[min(len(v) - 1, int(len(v) * q))] if v else float("nan")

if __name__ == "__main__":
    torch.set_num_threads(2)
    pred = Predictor.from_pretrained("/work/runs/minilm-8x7")
    print("precision", pred.precision_choice.chosen)
    lines = open("/work/shared/glue/STS-B/dev.tsv").read().splitlines()[1:]
    texts = [l.split("\t")[7] for l in lines[:512]]
    rows = pred.tokenize(texts)
    batches = [rows[i:i + 64] for i in range(0, len(rows), 64)]
    tokens = sum(map(len, rows))
    def run(reps=3):
        best = 0
        for _ in range(reps):
            t = time.perf_counter()
            for b in batches:
                pred.embed_ids(*pred.pad(b))
            best = max(best, tokens / (time.perf_counter() - t))
        return best
    run(1)
    alone = run()
    stop = threading.Event(); lt = []; th = threading.Thread(target=hog, args=(stop, lt)); th.start()
    with_thread = run(); stop.set(); th.join()
    ctx = mp.get_context("spawn"); stop2 = ctx.Event(); q = ctx.Queue(); p = ctx.Process(target=proc_hog, args=(stop2, q)); p.start(); time.sleep(2.0)
    with_proc = run(); stop2.set(); lp = q.get(); p.join()
    alone2 = run()
    print(f"tokens/s: alone {alone:.0f} / {alone2:.0f}; with a 50%-busy Python thread {with_thread:.0f} "
          f"(its wake-ups late p50 {pct(lt,.5):.1f} p99 {pct(lt,.99):.1f} max {pct(lt,1):.1f} ms); "
          f"with the same work in another process {with_proc:.0f} (late p50 {pct(lp,.5):.1f} p99 {pct(lp,.99):.1f} max {pct(lp,1):.1f} ms); loadavg {os.getloadavg()[0]:.2f}")
