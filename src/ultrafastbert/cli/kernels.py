"""``ultrafastbert kernels``: which FFF implementations can run here, and why not."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``kernels`` subcommand."""
    p = sub.add_parser("kernels", help="list FFF implementations and whether each can run",
                       description="List every FFF implementation in priority order, for "
                                   "inference and for training, with the reason it cannot run "
                                   "on the given device/dtype.")
    p.add_argument("--device", default="cpu", help="device to check (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16",
                                                          "float64"])
    p.add_argument("--weight-format", default="fp32", choices=["fp32", "bf16", "bf16-out", "int8"])
    p.add_argument("--config", default=None, metavar="KxD",
                   help="also show what 'auto' chooses for this tree shape, with reasons")
    p.add_argument("--d-model", type=int, default=768, help="width for --config (default 768)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per call for --config")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="also show the encoder precision 'auto' picks for this model here "
                        "(measured once per CPU and cached), with the measurements")
    p.add_argument("--clear-tuning", action="store_true",
                   help="delete this CPU's cached native-kernel knobs and kernel timings "
                        "(remeasured on next use)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print the dispatcher's table (and the choice for ``--config``)."""
    from ..fff.dispatch import Workload, describe

    if args.clear_tuning:
        from ..fff.native import tuning

        path = tuning.cache_path()
        print(f"{'removed' if tuning.clear() else 'no cached knobs at'} {path}")
    shape = None
    if args.config:
        try:
            n_trees, depth = (int(v) for v in args.config.lower().split("x"))
        except ValueError:
            print(f"--config must look like 8x7 (trees x depth), got {args.config!r}")
            return 2
        shape = Workload(n_trees, depth, args.d_model, args.tokens)
    print(describe(args.device, getattr(torch, args.dtype), args.weight_format, shape=shape))
    if torch.device(args.device).type == "cpu" or args.model:
        print(_precisions(args.device, args.model))
    if torch.device(args.device).type == "cpu":
        from ..infer import native_attention

        print("\npacked attention (Predictor / serve): " + native_attention.describe())
    if args.model:
        print(_structures(args.model))
    return 0


def _structures(model: str) -> str:
    """Where each feed-forward block of a converted ``model`` runs (empty for other models)."""
    from ..model.converted import _read_model_type, fff_blocks, load_converted
    from ..model.ffn_structures import describe_block
    from ..model.layouts import sentence_transformers_layout

    model_dir = sentence_transformers_layout(Path(model)).model_dir
    if not _read_model_type(model_dir).startswith("ultrafastbert-"):
        return ""
    blocks = fff_blocks(load_converted(model_dir))
    lines = [f"\nfeed-forward blocks of {model} (float32):"]
    lines += [f"  layer {i}: {describe_block(b)}" for i, b in enumerate(blocks)]
    return "\n".join(lines)


def _precisions(device: str, model: str | None) -> str:
    """Which encoder precisions can run here, and ``auto``'s choice for ``model``."""
    from ..infer.autoprecision import candidates

    ok, refused = candidates(device)
    lines = ["\nencoder precisions (Predictor / serve / predict --precision):"]
    lines += [f"  {p}: runs here" for p in ok]
    lines += [f"  {p}: falls back to float32 -- {why}" for p, why in refused.items()]
    if model is None:
        return "\n".join(lines + ["  (--model DIR shows what 'auto' picks for a model)"])
    from ..infer import Predictor

    predictor = Predictor.from_pretrained(model, device=device)
    choice = predictor.precision_choice
    lines.append(f"auto for {model} ({torch.get_num_threads()} threads):")
    lines.append(choice.describe())
    for p in choice.cosine:
        lines.append(f"  {p}: cosine to float32 {choice.cosine[p]:.4f}; ms short "
                     f"{choice.ms['short'][p]:.1f}, long {choice.ms['long'][p]:.1f}")
    for low in ("int8", "bfloat16"):
        if low in ok:
            lines += _low_fff_blocks(predictor.model, low)
    return "\n".join(lines)


def _low_fff_blocks(model: torch.nn.Module, precision: str) -> list[str]:
    """Which weights each FFF layer shape of ``model`` runs at ``precision`` (int8 or
    bfloat16), and why."""
    from ..fff import FFF
    from ..infer.precision import fff_weight_format

    shapes: dict[tuple[int, int, int], FFF] = {}
    for m in model.modules():
        if isinstance(m, FFF):
            shapes.setdefault((m.n_trees, m.depth, m.d_model), m)
    if not shapes:
        return []
    low = {"int8": "int8", "bfloat16": "bf16"}[precision]
    lines = [f"FFF blocks at precision {precision} ({low} weights where measured faster):"]
    for (k, d, width), fff in shapes.items():
        fmt, why = fff_weight_format(fff, precision)
        lines.append(f"  {k}x{d} at d={width}: {fmt} weights -- {why}")
    return lines
