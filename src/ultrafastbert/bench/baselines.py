"""Dense baselines a CPU user would pick instead, for ``bench model``.

Besides the torch models themselves (fp32 and ``.to(torch.bfloat16)``), a dense
BERT-family model is run

- under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (fp32 weights, bf16 GEMMs on oneDNN, AMX
  where the CPU has it): ``autocast:DIR`` (``hf-bert-base-autocast`` for random bert-base);
- as sentence-transformers users run it: the ``SentenceTransformer`` module pipeline
  (transformer, pooling, normalisation) on already tokenized ids: ``st:DIR`` (extra ``st``);
- on ONNX Runtime, exported with ``torch.onnx.export``, in fp32 (``onnx:DIR``) and after
  ``onnxruntime.quantization.quantize_dynamic`` to int8 weights (``onnx-int8:DIR``) (extra
  ``onnx``).

Each wrapper is called like a transformers encoder, ``wrapper(ids, attention_mask=mask)``, and
keeps the fp32 torch model it stands for (``reference``) so its output can be checked against
it before anything is timed (:func:`check_baseline`). A baseline whose extra is not installed is
a :class:`Skipped` with the reason and the command that installs it, never a crash.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError

logger = logging.getLogger(__name__)

#: Name prefix -> (what it runs, the dtype pass it belongs to).
PREFIXES = {"autocast": ("torch.autocast bfloat16", "bfloat16"),
            "st": ("sentence-transformers", "float32"),
            "onnx": ("onnxruntime fp32", "float32"),
            "onnx-int8": ("onnxruntime dynamic int8", "float32")}
#: The extra each prefix needs: (modules, install command).
EXTRAS = {"st": (("sentence_transformers",), "pip install 'ultrafastbert[st]'"),
          "onnx": (("onnxruntime", "onnx"), "pip install 'ultrafastbert[onnx]'"),
          "onnx-int8": (("onnxruntime", "onnx"), "pip install 'ultrafastbert[onnx]'")}
#: Check tolerances against the fp32 torch model: max abs error on real tokens / their RMS.
#: int8 is judged by cosines instead (see ``INT8_MIN_COSINE``); its RMS error is reported only.
TOLERANCE = {"st": 1e-4, "onnx": 1e-4, "onnx-int8": None, "autocast": None}
#: int8 (per-channel weights) against fp32, measured on all-MiniLM-L6-v2: mean token cosine
#: 0.987-0.991, mean-pooled sentence embedding cosine >= 0.982 (per-tensor weights: 0.93-0.96).
#: 0.95 for both stops a broken export or quantization, not int8 noise.
INT8_MIN_COSINE = 0.95
#: A bf16 model end to end (``.to(bfloat16)`` or autocast) against fp32 or against its own eager
#: attention: the error over the RMS is no measure there (trained models have output channels
#: 30-40x the RMS, and bf16 keeps 8 bits of each), and a converted model's hard routes may
#: legitimately change. Judged instead: mean token cosine >= 0.99 and the largest error <= 0.25
#: of the largest output. Measured on all-MiniLM-L6-v2 dense / converted 8x7: cosine 0.9999 /
#: 0.994-0.998, largest error 0.003-0.006 / 0.025-0.075 of the largest output.
BF16_RULE = {"min_mean_token_cosine": 0.99, "max_error_over_max_abs": 0.25}
ONNX_OPSET = 17


@dataclass(frozen=True)
class Skipped:
    """A baseline that cannot run here, and why (with what to do)."""

    name: str
    reason: str


def split_name(name: str) -> tuple[str | None, str]:
    """``"onnx-int8:runs/m"`` -> ``("onnx-int8", "runs/m")``; a name without a known prefix ->
    ``(None, name)``."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in PREFIXES:
        return prefix, rest
    return None, name


def applies(name: str, dtype_name: str) -> bool:
    """Whether the baseline ``name`` belongs to the ``dtype_name`` pass (autocast is a bf16
    baseline; sentence-transformers and ONNX Runtime run fp32 weights; others run in both)."""
    prefix, _ = split_name(name)
    return prefix is None or PREFIXES[prefix][1] == dtype_name


def runtime_of(name: str) -> str:
    """What runs a model row: ``torch`` or the baseline's runtime."""
    prefix, _ = split_name(name)
    return "torch" if prefix is None else PREFIXES[prefix][0]


def missing_extra(prefix: str) -> str | None:
    """Why the extra of ``prefix`` is missing (naming the install command), or None."""
    modules, install = EXTRAS.get(prefix, ((), ""))
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return f"{', '.join(absent)} not installed: {install}"
    return None


def source_of(converted_dir: Path) -> Path | None:
    """The dense source directory recorded in a converted model's ``conversion.json``, or None
    when there is none or it no longer exists."""
    import json

    report = converted_dir / "conversion.json"
    if not report.is_file():
        return None
    try:
        source = json.loads(report.read_text())["settings"]["source"]
    except (ValueError, KeyError, TypeError):
        return None
    path = Path(source)
    if not path.is_absolute() and not path.is_dir():
        path = converted_dir / source
    if not path.is_dir():
        logger.warning("%s names the dense source %s, which is not there: no dense baselines "
                       "(pass --dense-source DIR)", report, source)
        return None
    return path


def dense_baselines(source: Path) -> list[str]:
    """The baselines of one dense source directory: torch itself, autocast, sentence-transformers
    (when it is a sentence-transformers directory), ONNX Runtime fp32 and int8."""
    names = [str(source), f"autocast:{source}"]
    if (source / "modules.json").is_file():
        names.append(f"st:{source}")
    return names + [f"onnx:{source}", f"onnx-int8:{source}"]


# --------------------------------------------------------------------------------- building
def build(name: str, reference: nn.Module, seq_len: int) -> nn.Module | Skipped:
    """The baseline ``name`` (with a prefix) around ``reference``, the dense fp32 torch encoder
    it stands for (a transformers ``BertModel``-like, eval mode), or :class:`Skipped`."""
    prefix, target = split_name(name)
    if prefix is None:
        raise InputError(f"{name!r} is not an external baseline (prefixes: {sorted(PREFIXES)})")
    if prefix == "autocast":
        return AutocastEncoder(reference)
    missing = missing_extra(prefix)
    if missing is not None:
        return Skipped(name, missing)
    if prefix == "st":
        if not (Path(target) / "modules.json").is_file():
            return Skipped(name, f"{target} is not a sentence-transformers directory (no "
                                 "modules.json)")
        return SentenceTransformerEncoder(Path(target), reference)
    return OnnxEncoder(reference, seq_len, int8=prefix == "onnx-int8")


class AutocastEncoder(nn.Module):
    """``reference`` (fp32 weights) run under ``torch.autocast("cpu", dtype=torch.bfloat16)``."""

    def __init__(self, reference: nn.Module):
        super().__init__()
        self.reference = reference
        self.config = reference.config

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        """``ids (B, S)`` -> the encoder's output (``last_hidden_state (B, S, d)``, bf16)."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.reference(ids, attention_mask=attention_mask)


class _Output:
    """The one field of a transformers output the benchmark reads."""

    def __init__(self, last_hidden_state: torch.Tensor):
        self.last_hidden_state = last_hidden_state


class SentenceTransformerEncoder(nn.Module):
    """A ``SentenceTransformer`` loaded from ``directory`` (CPU, fp32), called on token ids as
    ``encode`` calls it after tokenizing: transformer, pooling, normalisation."""

    def __init__(self, directory: Path, reference: nn.Module):
        super().__init__()
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(directory), device="cpu").eval()
        self.reference = reference
        self.config = reference.config

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``ids (B, S)`` -> ``{"token_embeddings": (B, S, d), "sentence_embedding": (B, d)}``."""
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        return self.model({"input_ids": ids, "attention_mask": mask,
                           "token_type_ids": torch.zeros_like(ids)})


class OnnxEncoder:
    """``reference`` exported to ONNX (``torch.onnx.export``, dynamic batch and length) and run
    by an ONNX Runtime CPU session with torch's thread count; ``int8``: weights quantized by
    ``onnxruntime.quantization.quantize_dynamic`` (int8, activations quantized per call).

    The session's worker threads do not spin between calls
    (``session.intra_op.allow_spinning = 0``): spinning threads would steal the CPU from the
    models timed next to it in the same round.
    """

    INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, reference: nn.Module, seq_len: int, int8: bool = False):
        import onnxruntime as ort

        self.reference = reference
        self.config = reference.config
        self.int8 = int8
        self._dir = tempfile.TemporaryDirectory(prefix="ufb-onnx-")
        path = export_onnx(reference, Path(self._dir.name) / "model.onnx", seq_len)
        if int8:
            path = quantize_int8(path, Path(self._dir.name) / "model-int8.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.onnxruntime_version = ort.__version__

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> _Output:
        """``ids (B, S)`` -> ``last_hidden_state (B, S, d)`` (fp32)."""
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                "token_type_ids": torch.zeros_like(ids).numpy()}
        return _Output(torch.from_numpy(self.session.run(None, feed)[0]))


class _HiddenStates(nn.Module):
    """``(ids, mask, token types) -> last_hidden_state``: the graph the ONNX file holds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor
                ) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types
                          ).last_hidden_state


def export_onnx(model: nn.Module, path: Path, seq_len: int) -> Path:
    """Export ``model`` (a transformers encoder) to ``path`` with dynamic batch and length."""
    import warnings

    ids = torch.randint(7, int(model.config.vocab_size), (2, min(seq_len, 16)))
    names = (*OnnxEncoder.INPUTS, "last_hidden_state")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow
        torch.onnx.export(_HiddenStates(model).eval(), (ids, torch.ones_like(ids),
                                                       torch.zeros_like(ids)), str(path),
                          dynamo=False, input_names=list(names[:3]), output_names=[names[3]],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
                          opset_version=ONNX_OPSET)
    return path


def quantize_int8(path: Path, out: Path) -> Path:
    """Dynamic int8 quantization of the ONNX model at ``path`` (weights int8, one scale per
    output channel; activations quantized per call) into ``out``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel weight scales: all-MiniLM-L6-v2's pooled embeddings keep a cosine of 0.98-0.99
    # to fp32 (per-tensor: 0.93-0.96). Full int8 range: the CPUs here have VNNI (no saturation).
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=False)
    return out


# --------------------------------------------------------------------------------- checking
def check_baseline(name: str, model: Any, ids: torch.Tensor, mask: torch.Tensor
                   ) -> dict[str, Any]:
    """Compare a baseline with its fp32 torch model on ``ids``/``mask`` ``(B, S)``: max abs error
    on the real tokens over their RMS (and the sentence embedding for sentence-transformers, the
    mean token cosine and the smallest mean-pooled cosine for int8). Returns the report with
    ``ok`` and the tolerance."""
    prefix, _ = split_name(name)
    with torch.inference_mode():
        ref = model.reference(ids, attention_mask=mask).last_hidden_state.double()
        out = model(ids, attention_mask=mask)
    hidden = out["token_embeddings"] if prefix == "st" else out.last_hidden_state
    report = compare_states(hidden, ref, mask)
    report.update(reference="the fp32 torch model it runs, same inputs",
                  tolerance=TOLERANCE[prefix] if prefix != "autocast" else dict(BF16_RULE))
    tolerance = TOLERANCE[prefix]
    ok = tolerance is None or report["max_rel_error"] <= tolerance
    if prefix == "autocast":
        ok = bf16_ok(report)
    if prefix == "st":
        expected = torch.nn.functional.normalize(_mean_pool(ref, mask), dim=-1)
        emb_err = float((out["sentence_embedding"].double() - expected).abs().max())
        report["sentence_embedding_max_abs_error"] = emb_err
        ok = ok and emb_err <= TOLERANCE[prefix]
    if prefix == "onnx-int8":
        pooled = torch.nn.functional.cosine_similarity(
            _mean_pool(hidden.double(), mask), _mean_pool(ref, mask), dim=-1)
        report.update(min_pooled_cosine=float(pooled.min()), min_cosine_required=INT8_MIN_COSINE)
        ok = ok and min(report["mean_token_cosine"], float(pooled.min())) >= INT8_MIN_COSINE
    report["ok"] = ok
    return report


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, S, d)``, mask ``(B, S)`` -> the attention-masked mean ``(B, d)``."""
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def compare_states(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Hidden states ``out`` against ``ref`` ``(B, S, d)`` on the real tokens of ``mask``: the
    largest error over the RMS of ``ref`` (``max_rel_error``) and over its largest value, and
    the mean and smallest per-token cosine."""
    real = mask.bool()
    a, b = out.double()[real], ref.double()[real]
    err = float((a - b).abs().max())
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"max_rel_error": err / float(b.pow(2).mean().sqrt()),
            "max_error_over_max_abs": err / float(b.abs().max()),
            "mean_token_cosine": float(cos.mean()), "min_token_cosine": float(cos.min()),
            "rows_compared": int(real.sum()), "rows_excluded_near_zero_logit": 0}


def bf16_ok(report: dict[str, Any]) -> bool:
    """Whether a bf16 end-to-end comparison (:func:`compare_states`) passes :data:`BF16_RULE`."""
    return (report["mean_token_cosine"] >= BF16_RULE["min_mean_token_cosine"]
            and report["max_error_over_max_abs"] <= BF16_RULE["max_error_over_max_abs"])
