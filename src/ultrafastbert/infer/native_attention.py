"""Self-attention of packed texts in the native CPU library (``fff/native/attention_cpu.cpp``).

At sentence widths PyTorch's CPU attention costs far more than its arithmetic: the batch is
padded to its widest text, and per-call overhead, layout copies and the padded slots dominate
(docs/precision.md, "Attention"). The native op takes the packed ``(T, 3d)`` projections as
they are and runs one task per (text, head) over that text's tokens only, in float32.

It is used when the native library is loaded (a CPU with AVX-512 or AVX2 + FMA), unless
``ULTRAFASTBERT_NATIVE_ATTENTION=0`` (or ``ULTRAFASTBERT_NATIVE=0``) turns it off. bfloat16
streams run in bfloat16 on CPUs with AVX512-BF16 (dot products in pairs, float32 softmax, its
weights rounded to bfloat16 as PyTorch's flash kernel does), elsewhere widened to float32. Under ``torch.compile`` it is called through a
``torch.library`` custom operator with a fake implementation, so the packed encoder still
compiles in one graph.
"""

from __future__ import annotations

from typing import Any

import torch

from ..utils.env import switched_off

ENV_SWITCH = "ULTRAFASTBERT_NATIVE_ATTENTION"
#: Layout codes of the op: ``[q | k | v]`` rows and ``[head][q, k, v][hd]`` rows.
LAYOUTS = {"blocks": 0, "heads": 1}
#: The op's instruction sets: ``avx512bf16`` takes bfloat16 q/k/v as they are (dot products
#: with ``_mm512_dpbf16_ps``); the others take float32 (bfloat16 streams widened around them).
ISA_CODES = {"avx512bf16": 3, "avx512": 2, "avx2": 1}
#: Widest batch (tokens) whose attention :meth:`~ultrafastbert.infer.packing.Packing.attention`
#: runs here (wider: PyTorch's): BERT's 512 positions; measured on AMD EPYC Zen 4, 2 threads
#: (docs/model.md, "Packed tokens"): the native op wins at every width up to 512.
MAX_WIDTH = 512


#: Filled by :func:`prepare` (eager, once): ``"reason"`` (None when usable) and ``"op"`` (the
#: custom operator). A plain dict that ``torch.compile`` reads as a constant.
_STATE: dict[str, Any] = {}


def unavailable_reason() -> str | None:
    """Why the native attention is not used here, or None when it is."""
    value = switched_off(ENV_SWITCH)
    if value is not None:
        return f"disabled by the environment ({ENV_SWITCH}={value}); unset it to enable"
    return prepare()


def prepare() -> str | None:
    """Load the native library and define the custom operator (first call; eager only), then
    return why the op cannot be used here, or None."""
    if "reason" not in _STATE:
        reason = _library_reason()
        _STATE["op"] = _custom_op() if reason is None else None
        _STATE["isa"] = _best_isa() if reason is None else None
        _STATE["bf16"] = reason is None and _bf16_runs()
        _STATE["reason"] = reason
    return _STATE["reason"]


def _library_reason() -> str | None:
    from ..fff.native import build

    status = build.status()
    if isinstance(status, str):
        return status
    return None


def _best_isa() -> str:
    from ..fff.native import build

    return build.cpu_isa() or "avx2"


def _bf16_runs() -> bool:
    """Whether the bfloat16 op runs here: built with it, a CPU with AVX-512 and AVX512-BF16
    (``ULTRAFASTBERT_CPU_FLAGS_OFF`` can hide the flag)."""
    from .precision import cpu_flags

    return (_best_isa() == "avx512" and "avx512_bf16" in cpu_flags()
            and bool(torch.ops.ultrafastbert.packed_attention_has_bf16()))


def usable(qkv: torch.Tensor) -> bool:
    """Whether :func:`packed_attention` can take ``qkv`` (a CPU float32/bfloat16 tensor here).

    Under ``torch.compile`` only what an eager call has already prepared counts."""
    if qkv.device.type != "cpu" or qkv.dtype not in (torch.float32, torch.bfloat16):
        return False
    if switched_off(ENV_SWITCH) is not None:
        return False
    if not torch.compiler.is_compiling():
        prepare()
    return _STATE.get("op") is not None


def packed_attention(qkv: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                     n_heads: int, layout: str = "blocks", isa: str | None = None
                     ) -> torch.Tensor:
    """Attention of each text over its own tokens: ``qkv`` ``(T, 3d)`` -> ``(T, d)``.

    ``starts`` and ``lengths`` ``(N,)`` int64 give each text's rows; ``layout`` as
    :meth:`~ultrafastbert.infer.packing.Packing.attention`; ``isa`` (a key of
    :data:`ISA_CODES`) forces an instruction set (default: ``avx512bf16`` for bfloat16 ``qkv``
    where it runs and the head width is even, else the best float32 one this CPU runs).
    Returns ``qkv``'s dtype. Call :func:`usable` first.
    """
    dtype = qkv.dtype
    head_dim = qkv.shape[1] // (3 * n_heads)
    if isa is None:
        isa = "avx512bf16" if (dtype == torch.bfloat16 and _STATE.get("bf16")
                               and head_dim % 2 == 0) else _STATE["isa"]
    native_dtype = torch.bfloat16 if isa == "avx512bf16" else torch.float32
    rows = qkv.to(native_dtype).contiguous()
    code, isa_code = LAYOUTS[layout], ISA_CODES[isa]
    if torch.compiler.is_compiling():
        out = _STATE["op"](rows, starts, lengths, n_heads, code, isa_code)
    else:
        out = torch.ops.ultrafastbert.packed_attention_cpu(rows, starts, lengths, n_heads, code,
                                                            isa_code)
    return out if out.dtype == dtype else out.to(dtype)


def describe() -> str:
    """Which attention kernel the packed encoder runs here, and why (``ultrafastbert kernels``)."""
    reason = unavailable_reason()
    if reason is not None:
        return f"PyTorch (native: {reason})"
    bf16 = "avx512bf16 (bf16 dot products)" if _STATE.get("bf16") else \
        f"{_STATE['isa']}, widened to float32"
    return (f"native up to {MAX_WIDTH} tokens wide (float32: "
            f"{_STATE['isa']}; bfloat16: {bf16}); wider batches: PyTorch")


def _custom_op() -> Any:
    """``ultrafastbert::native_packed_attention``: the C++ op with a fake (shapes only) for
    ``torch.compile`` (the C++ op itself is composite and cannot take one). Defined once."""

    @torch.library.custom_op("ultrafastbert::native_packed_attention", mutates_args=())
    def attention(qkv: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                  n_heads: int, layout: int, isa: int) -> torch.Tensor:
        """``(T, 3d)`` -> ``(T, d)``."""
        return torch.ops.ultrafastbert.packed_attention_cpu(qkv, starts, lengths, n_heads,
                                                            layout, isa)

    @attention.register_fake
    def _(qkv, starts, lengths, n_heads, layout, isa):  # noqa: ANN001, ANN202
        return qkv.new_empty((qkv.shape[0], qkv.shape[1] // 3))

    return attention
