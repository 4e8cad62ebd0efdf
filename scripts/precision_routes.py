"""How often the bf16 FFF kernel (``native-bf16``) takes another route than fp32, on trained
weights and real inputs (docs/precision.md).

Run: .venv/bin/python scripts/precision_routes.py MODEL_DIR [MODEL_DIR ...] --glue ../shared/glue
MODEL_DIR: a converted model (``ultrafastbert convert`` output, e.g. all-MiniLM-L6-v2 as 8x7).
Each FFF block's real inputs are captured from the fp32 model on SST-2 dev sentences; then per
block the fp32 native kernel (fp32 inputs and weights) and the bf16 kernel (both rounded to bf16)
run on the same inputs. Printed per block: tokens whose path differs in any tree, routing
decisions that differ (same node reached, other child taken), and the bf16 output's error
relative to fp32 (‖Δy‖/‖y‖ on unchanged tokens); for comparison, the tokens changed by bf16
weights alone (fp32 inputs, the fp32 kernel's ``bf16`` format). Finally the whole model in bf16
(``set_precision``) against fp32: cosine of the mean-pooled embeddings.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch


def capture_inputs(model: torch.nn.Module, ids: list[list[int]], batch: int = 64
                   ) -> list[torch.Tensor]:
    """Per FFF block, its real-token inputs ``(T, d)`` float32 (padding rows dropped)."""
    from ultrafastbert.model.converted import base_model_of, fff_blocks

    blocks = fff_blocks(model)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    mask_now: dict[str, torch.Tensor] = {}

    def hook(i: int):
        def fn(_module, args):
            x = args[0]
            keep = mask_now["mask"].reshape(-1).bool()
            seen[i].append(x.reshape(-1, x.shape[-1])[keep].detach().float())
        return fn

    handles = [b.fff.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    encoder = base_model_of(model).eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), batch):
                x, mask = _collate(ids[start:start + batch])
                mask_now["mask"] = mask
                encoder(input_ids=x, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


def _collate(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def route_change(fff, x: torch.Tensor) -> tuple[float, float, float, float]:
    """(tokens changed, decisions changed, rel err of y on unchanged tokens): bf16 kernel vs the
    fp32 native kernel on ``x`` ``(T, d)``; and tokens changed by bf16 weights alone (the fp32
    kernel's ``bf16`` weight format, fp32 inputs), for comparison."""
    from ultrafastbert.fff.native import NativeBF16Kernel, NativeCPUKernel

    args = (fff.linear_in.weight, fff.linear_in.bias, fff.linear_out.weight, fff.n_trees,
            fff.depth)
    k32, k16 = NativeCPUKernel(), NativeBF16Kernel()
    for kernel, dtype in ((k32, torch.float32), (k16, torch.bfloat16)):
        reason = kernel.unavailable_reason(torch.device("cpu"), dtype)
        if reason is not None:
            raise SystemExit(f"{kernel.name} cannot run here: {reason}")
    y32, n32 = k32.forward(x, k32.pack(*args, "fp32"), fff.n_trees, fff.depth, True)
    y16, n16 = k16.forward(x.bfloat16(), k16.pack(*args, "fp32"), fff.n_trees, fff.depth, True)
    _, n_w16 = k32.forward(x, k32.pack(*args, "bf16"), fff.n_trees, fff.depth, True)
    changed = (n32 != n16).flatten(1).any(dim=1)
    same_node = n32[..., :-1] == n16[..., :-1]
    flips = (same_node & (n32[..., 1:] != n16[..., 1:])).sum().item()
    err = ((y16.float() - y32)[~changed].norm() / y32[~changed].norm()).item()
    weights_only = (n32 != n_w16).flatten(1).any(dim=1).float().mean().item()
    return (changed.float().mean().item(), flips / max(1, same_node.sum().item()), err,
            weights_only)


def pooled_cosine(model, ids: list[list[int]]) -> float:
    """Mean cosine of mean-pooled embeddings, bf16 model vs fp32 (the model is cast)."""
    from ultrafastbert.model.converted import base_model_of

    def embed() -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, len(ids), 64):
                x, mask = _collate(ids[start:start + 64])
                h = base_model_of(model)(input_ids=x, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                out.append(((h * m).sum(1) / m.sum(1)).float())
        return torch.cat(out)

    full = embed()
    model.set_precision(torch.bfloat16)
    half = embed()
    model.set_precision(torch.float32)
    return torch.nn.functional.cosine_similarity(full, half).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--glue", type=Path, default=Path("../shared/glue"))
    parser.add_argument("--sentences", type=int, default=872)
    parser.add_argument("--out", type=Path, default=None, help="CSV file")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    import ultrafastbert

    torch.set_num_threads(1)
    lines = (args.glue / "SST-2" / "dev.tsv").read_text().splitlines()[1:args.sentences + 1]
    texts = [line.split("\t")[0] for line in lines]
    rows = []
    for directory in args.models:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.enable_truncation(128)
        tokenizer.no_padding()
        ids = [e.ids for e in tokenizer.encode_batch(texts)]
        model = ultrafastbert.from_pretrained(directory).eval()
        from ultrafastbert.model.converted import fff_blocks

        blocks = fff_blocks(model)
        for i, (block, x) in enumerate(zip(blocks, capture_inputs(model, ids), strict=True)):
            tokens, decisions, err, weights_only = route_change(block.fff, x)
            rows.append((directory.name, i, f"{block.fff.n_trees}x{block.fff.depth}", len(x),
                         tokens, decisions, err, weights_only))
            print(f"{directory.name} layer {i} ({rows[-1][2]}): {len(x)} tokens, changed "
                  f"{tokens:.2%}, decisions {decisions:.3%}, rel err y {err:.2e}; bf16 "
                  f"weights alone {weights_only:.2%}")
        print(f"{directory.name}: pooled-embedding cosine bf16 vs fp32 "
              f"{pooled_cosine(model, ids):.5f}")
    if args.out is not None:
        with args.out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["model", "layer", "config", "tokens", "tokens_changed",
                             "decisions_changed", "rel_err_y", "tokens_changed_bf16_weights"])
            writer.writerows(rows)


if __name__ == "__main__":
    main()
