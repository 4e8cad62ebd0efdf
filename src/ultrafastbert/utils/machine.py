"""What a result needs to say about the machine it came from: CPU model, speed flags, cores,
the oneDNN and torch builds, threads. One reader of ``/proc/cpuinfo`` for the whole project
(benchmarks, the kernel tuning cache, GLUE and conversion reports)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

#: CPU flags that decide which GEMM and FFF paths are fast (AVX2/AVX-512 vector units, the
#: AVX512-BF16 dot products, Intel AMX tiles): recorded with every result.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
               "amx_int8")


#: Environment switch hiding CPU flags (comma-separated ``/proc/cpuinfo`` names, e.g.
#: ``avx512_vnni,avx512_bf16``): how the paths for CPUs without them are tested on one that has
#: them. Read on each call of :func:`flags_switched_off`.
ENV_FLAGS_OFF = "ULTRAFASTBERT_CPU_FLAGS_OFF"


def flags_switched_off() -> frozenset[str]:
    """The flags :data:`ENV_FLAGS_OFF` hides (empty when unset)."""
    return frozenset(f.strip() for f in os.environ.get(ENV_FLAGS_OFF, "").split(",")
                     if f.strip())


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""  # not Linux: the model comes from platform, the flags are unknown


def _first_processor(cpuinfo: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines of a ``/proc/cpuinfo`` text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block ends at its first blank line
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_facts(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model, the speed-relevant flags (:data:`SPEED_FLAGS`: True/False, or None each when
    the flags cannot be read), physical cores and logical CPUs, the oneDNN version and MKL of
    this torch build. ``cpuinfo``: a ``/proc/cpuinfo`` text (default: this machine's)."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    info = _first_processor(text)
    flags = set(info.get("flags", "").split())
    return {
        "cpu": _model_name(info),
        "cpu_flags": {f: (f in flags) if flags else None for f in SPEED_FLAGS},
        "cpu_logical": os.cpu_count(),
        "cpu_cores": _physical_cores(text, info),
        "onednn": _onednn_version(),
        "mkl": torch.backends.mkl.is_available(),
        "torch_cpu_capability": _torch_cpu_capability(),
    }


def _physical_cores(cpuinfo: str, info: dict[str, str]) -> int | None:
    """Physical cores: ``cpu cores`` x distinct ``physical id`` in /proc/cpuinfo, else None."""
    sockets = {line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
               if line.startswith("physical id")} or {"0"}
    try:
        return int(info["cpu cores"]) * len(sockets)
    except (KeyError, ValueError):
        return None


def _onednn_version() -> str | None:
    """oneDNN (MKL-DNN) version of this torch build, or None when it has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    match = re.search(r"(?:oneDNN|MKL-DNN)\s+v?([\w.]+)", torch.__config__.show())
    return match.group(1) if match else "available (version unknown)"


def _torch_cpu_capability() -> str | None:
    """The vector ISA torch's own CPU kernels dispatch to (e.g. ``AVX512``), where known."""
    with contextlib.suppress(Exception):
        return str(torch.backends.cpu.get_cpu_capability())
    return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU model name (``/proc/cpuinfo``), else the platform's processor string."""
    return _model_name(_first_processor(_read_cpuinfo() if cpuinfo is None else cpuinfo))


def _model_name(info: dict[str, str]) -> str:
    """``model name`` of a processor's ``/proc/cpuinfo`` fields, else the platform's."""
    return info.get("model name") or platform.processor() or platform.machine() or "unknown"


def run_facts() -> dict[str, Any]:
    """For a training or evaluation report: versions, threads and :func:`cpu_facts`."""
    return {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            **cpu_facts()}
