"""bf16 speed in one process (docs/precision.md): the FFF layer and the whole encoder.

Run: .venv/bin/python benchmarks/precision_speed.py [--threads 1] [--tokens 1,128,4096]
     [--batch 8] [--seq-len 128] [--rounds 5] [--skip-model]

Layer: FFF 1x11 (d=768) in bf16 through the public API (``FFF(...).to(torch.bfloat16)``, which
the dispatcher gives the ``native-bf16`` kernel), the same layer in fp32, and dense-4095 FF in
bf16 (plain ``F.linear`` on bf16 tensors, and oneDNN on prepacked weights: the faster of the two
is the baseline). Model: UltraFastBERT-1x11 with ``set_precision(torch.bfloat16)`` and in fp32,
against Hugging Face ``BertModel`` (bert-base) in fp32, ``.to(torch.bfloat16)`` and under
``torch.autocast("cpu", dtype=torch.bfloat16)``. Every output is checked first (the bf16 FFF
against the float64 reference on unchanged routes, the bf16 models against their fp32 selves);
then the variants are timed in interleaved rounds and the medians printed, with the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def cpu_facts() -> str:
    """One line naming the CPU, its speed flags, cores and threads (bench.common's)."""
    from ultrafastbert.bench.common import environment, speed_summary

    return speed_summary(environment())


def medians(fns: dict[str, Callable[[], object]], rounds: int, calls: int = 1
            ) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds after a warm-up;
    each sample times ``calls`` calls in a row (short calls are below the clock's jitter)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(rounds):
            for name, f in fns.items():
                f()
                start = time.perf_counter()
                for _ in range(calls):
                    f()
                times[name].append((time.perf_counter() - start) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def check_fff(layer, x: torch.Tensor) -> None:
    """The bf16 layer against the float64 reference: routes (outside a 1e-3 margin), values."""
    from ultrafastbert.fff.reference import fff_reference

    with torch.inference_mode():
        y, nodes = layer.forward_with_nodes(x)
    ref = fff_reference(x.double(), layer.linear_in.weight.double(),
                        layer.linear_in.bias.double(), layer.linear_out.weight.double(),
                        layer.n_trees, layer.depth)
    near = (ref.logits[..., :-1].abs() < 1e-3).flatten(1).any(1)
    same = (nodes == ref.nodes).flatten(1).all(1)
    if (~same & ~near).any():
        raise SystemExit(f"check failed: {int((~same & ~near).sum())} tokens route differently")
    err = (y[same].double() - ref.y[same]).abs() - 2**-8 * ref.y[same].abs()
    if err.max() > 1e-5 * ref.y.abs().max():
        raise SystemExit(f"check failed: bf16 FFF values off by {err.max().item():.3g}")


def layer_bench(tokens: list[int], rounds: int) -> None:
    from ultrafastbert.fff import FFF
    from ultrafastbert.model.linear import InferenceLinear

    torch.manual_seed(0)
    fp32 = FFF(768, n_trees=1, depth=11).eval()
    bf16 = FFF(768, n_trees=1, depth=11).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    first = InferenceLinear(768, 4095, bias=False).to(torch.bfloat16).eval()
    second = InferenceLinear(4095, 768, bias=False).to(torch.bfloat16).eval()
    print(f"FFF 1x11 bf16 layer runs kernel {bf16.kernel().name!r}")
    for n in tokens:
        x = F.layer_norm(torch.randn(n, 768), (768,))
        xb = x.bfloat16()
        check_fff(bf16, xb)
        t = medians({
            "fff bf16": lambda xb=xb: bf16(xb), "fff fp32": lambda x=x: fp32(x),
            "dense bf16 F.linear": lambda xb=xb: F.linear(F.gelu(F.linear(xb, first.weight)),
                                                          second.weight),
            "dense bf16 oneDNN packed": lambda xb=xb: second(F.gelu(first(xb)))}, rounds,
            calls=max(1, 512 // n))
        dense = min(t["dense bf16 F.linear"], t["dense bf16 oneDNN packed"])
        row = ", ".join(f"{k} {v / n * 1e6:.3f}" for k, v in t.items())
        print(f"{n} tokens (us/token): {row}; bf16 FFF vs fastest bf16 dense "
              f"{dense / t['fff bf16']:.1f}x, fp32 FFF vs it {dense / t['fff fp32']:.1f}x")


def model_bench(batch: int, seq_len: int, rounds: int) -> None:
    from transformers import BertConfig, BertModel

    from ultrafastbert.model import ModelConfig, UltraFastBertModel

    torch.manual_seed(0)
    ids = torch.randint(7, 30000, (batch, seq_len))
    mask = torch.ones_like(ids)
    ufb32 = UltraFastBertModel(ModelConfig.from_preset("ultrafastbert-1x11")).eval()
    ufb16 = UltraFastBertModel(ModelConfig.from_preset("ultrafastbert-1x11")).eval()
    ufb16.load_state_dict(ufb32.state_dict())
    ufb16.set_precision(torch.bfloat16)
    hf32 = BertModel(BertConfig(), add_pooling_layer=False).eval()
    hf16 = BertModel(BertConfig(), add_pooling_layer=False).eval()
    hf16.load_state_dict(hf32.state_dict())
    hf16 = hf16.to(torch.bfloat16)

    def autocast() -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return hf32(ids, attention_mask=mask)

    with torch.inference_mode():  # check: each bf16 model against its fp32 self
        for name, low, full in (("UltraFastBERT", ufb16(ids, mask), ufb32(ids, mask)),
                                ("BertModel", hf16(ids, attention_mask=mask),
                                 hf32(ids, attention_mask=mask))):
            a, b = low.last_hidden_state.float(), full.last_hidden_state
            rel = ((a - b).norm() / b.norm()).item()
            print(f"check {name} bf16 vs fp32: relative error {rel:.3g}")
            if not rel < 0.05:
                raise SystemExit(f"check failed: {name} in bf16 is {rel:.3g} off fp32")
    t = medians({"UltraFastBERT-1x11 bf16": lambda: ufb16(ids, mask),
                 "UltraFastBERT-1x11 fp32": lambda: ufb32(ids, mask),
                 "BertModel fp32": lambda: hf32(ids, attention_mask=mask),
                 "BertModel .to(bf16)": lambda: hf16(ids, attention_mask=mask),
                 "BertModel autocast bf16": autocast}, rounds)
    for name, seconds in t.items():
        print(f"{batch}x{seq_len} {name}: {seconds * 1e3:.1f} ms")
    ours = t["UltraFastBERT-1x11 bf16"]
    print("UltraFastBERT-1x11 bf16 speedup: " + ", ".join(
        f"vs {k} {v / ours:.2f}x" for k, v in t.items() if k.startswith("BertModel")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", default="1,128,4096")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_facts()}; torch {torch.__version__}, {args.threads} thread(s)")
    layer_bench([int(t) for t in args.tokens.split(",")], args.rounds)
    if not args.skip_model:
        model_bench(args.batch, args.seq_len, args.rounds)


if __name__ == "__main__":
    main()
