"""Build, cache and load the native CPU kernel on first use (never at import).

The C++ sources (the fp32 ops ``fff_cpu.cpp``, the bf16 ops ``fff_cpu_bf16.cpp`` and the
int8-weight ops ``fff_cpu_int8.cpp``, all over ``fff_cpu_kernel.h`` and its one templated walk
``fff_cpu_walk.h``) are compiled into one library with ``torch.utils.cpp_extension.load``
(needs ``ninja`` and a C++ compiler) into ``<cache>/native-<key>/``, where ``<cache>`` is
``$ULTRAFASTBERT_CACHE`` or ``~/.cache/ultrafastbert`` (``$XDG_CACHE_HOME/ultrafastbert`` when
that is set) and ``<key>`` hashes the source, the torch build, the Python ABI, the compiler and
the CPU's instruction set. Later processes only load the cached library (milliseconds).

Concurrent first use is safe: a build holds an exclusive file lock on ``native-<key>.lock``, builds
into a fresh temporary directory and renames it into place, so no process ever loads a
half-written library, and a crashed build leaves only a temporary directory that the next build
removes. Every outcome (loaded, toolchain missing, build failed) is remembered for the process,
so a failed build is reported and logged once, not retried on every call.

``ULTRAFASTBERT_NATIVE=0`` turns the kernel off (the dispatcher then says so and uses PyTorch);
it is read on first use.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ResourceError
from ...utils.env import switched_off
from ...utils.io import atomic_directory

logger = logging.getLogger(__name__)

LIBRARY_NAME = "ultrafastbert_fff_cpu"
SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("fff_cpu.cpp", "fff_cpu_bf16.cpp", "fff_cpu_int8.cpp", "fff_cpu_kernel.h",
           "fff_cpu_walk.h", "fff_cpu_train.cpp", "fff_cpu_train_walk.h",  # training: training.py
           "attention_cpu.cpp", "attention_cpu_walk.h")  # packed attention: infer/native_attention.py
#: Instruction sets the kernel is compiled for, best first, with the op's numeric code.
ISA_CODES = {"avx512": 2, "avx2": 1}
#: CPU flags (``/proc/cpuinfo`` spelling) each instruction set needs.
ISA_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512vl"), "avx2": ("avx2", "fma")}
#: How long to leave a temporary build directory alone before treating it as a crashed build's.
STALE_BUILD_S = 3600.0


@dataclass(frozen=True)
class NativeLibrary:
    """The loaded kernel: the op to call and the best instruction set of this CPU."""

    forward: torch._ops.OpOverload  # fff_cpu_forward_tuned (with a knobs table)
    forward_nodes: torch._ops.OpOverload  # fff_cpu_forward_tuned_nodes
    isa: str
    path: Path


def disabled_reason() -> str | None:
    """The reason when ``ULTRAFASTBERT_NATIVE=0`` (or ``false``/``off``/``no``) turns it off."""
    value = switched_off("ULTRAFASTBERT_NATIVE")
    if value is not None:
        return f"disabled by the environment (ULTRAFASTBERT_NATIVE={value}); unset it to enable"
    return None


@functools.cache
def cpu_isa() -> str | None:
    """The best instruction set the kernel has for this CPU (``avx512``/``avx2``) or None."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return None
    flags = _cpu_flags()
    if flags is None:  # no /proc/cpuinfo: trust torch's own detection
        capability = torch.backends.cpu.get_cpu_capability().lower()
        return "avx512" if capability.startswith("avx512") else (
            "avx2" if capability.startswith("avx2") else None)
    for isa, needed in ISA_FLAGS.items():
        if all(f in flags for f in needed):
            return isa
    return None


def _cpu_flags() -> set[str] | None:
    """CPU flags from ``/proc/cpuinfo`` (Linux), or None where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def toolchain_reason() -> str | None:
    """What is missing to build the kernel (ninja, a C++ compiler), or None."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    missing = []
    if not cpp_extension.is_ninja_available():
        missing.append("the ninja build tool (pip install ninja, or ultrafastbert[cpu])")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ('{compiler}' is not on PATH; install g++ or clang, or "
                       "set CXX)")
    if not missing:
        return None
    return ("building it on first use needs " + " and ".join(missing)
            + "; until then the PyTorch path is used")


def cache_root() -> Path:
    """Where built kernels live: ``$ULTRAFASTBERT_CACHE`` or the user's cache directory."""
    explicit = os.environ.get("ULTRAFASTBERT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ultrafastbert"


def build_key() -> str:
    """Hash of everything the compiled library depends on (16 hex digits)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    parts = [torch.__version__, str(torch.version.git_version), sys.implementation.cache_tag,
             platform.machine(), str(torch.compiled_with_cxx11_abi()),
             os.environ.get("CXX", "c++"), str(cpu_isa()), " ".join(_compile_flags())]
    digest.update("\0".join(parts).encode())
    return digest.hexdigest()[:16]


def _openmp_flags() -> list[str]:
    """``-fopenmp`` when torch's thread pool is OpenMP, else nothing.

    With that backend at::parallel_for is an inline OpenMP region in torch's headers, so it only
    runs in parallel when compiled with ``-fopenmp``; the library then links ``libgomp.so.1``,
    which the loader resolves to the copy torch has already loaded (same soname), so the process
    still has one thread pool.
    """
    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


def _compile_flags() -> list[str]:
    """C++ flags: optimised, no fast-math (NaN routing and exact GELU must hold)."""
    return ["-O3", *_openmp_flags()]


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (released by the OS if this process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: the temp-dir-then-rename build below is still safe
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_builds(root: Path, prefix: str) -> None:
    """Delete temporary build directories older than ``STALE_BUILD_S`` (crashed builds)."""
    for tmp in root.glob(prefix + ".tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(tmp, ignore_errors=True)


def _compile_into(build_dir: Path) -> Path:
    """Compile the library into ``build_dir`` (which must exist) and return its path.

    ``cpp_extension.load`` also loads it from there; loading it again from its final place is
    then a no-op (the dynamic loader recognises the same file).
    """
    from torch.utils import cpp_extension

    sources = [str(SOURCE_DIR / name) for name in SOURCES if name.endswith(".cpp")]
    cpp_extension.load(name=LIBRARY_NAME, sources=sources,
                       extra_cflags=_compile_flags(), extra_ldflags=_openmp_flags(),
                       build_directory=str(build_dir), is_python_module=False, verbose=False)
    return build_dir / f"{LIBRARY_NAME}.so"


#: Build keys (``native-<key>`` directory names) whose library this process has loaded. A second
#: copy of the same library (the same key in another cache root, e.g. after ``reset()`` with
#: ``ULTRAFASTBERT_CACHE`` changed) would register its operators twice, which aborts the process.
_LOADED_KEYS: set[str] = set()


def build_and_load(final_dir: Path) -> None:
    """Load the library from ``final_dir``, building it there first when it is missing (nothing
    to do when this process already loaded the same build from anywhere)."""
    if final_dir.name in _LOADED_KEYS:
        return
    library = final_dir / f"{LIBRARY_NAME}.so"
    if not library.exists():
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(final_dir.parent / f"{final_dir.name}.lock"):
            if not library.exists():  # else another process built it while we waited
                _build_into_place(final_dir)
    torch.ops.load_library(str(library))
    _LOADED_KEYS.add(final_dir.name)


def _build_into_place(final_dir: Path) -> None:
    """Build in a fresh temporary directory beside ``final_dir``, then rename it into place."""
    _remove_stale_builds(final_dir.parent, final_dir.name)
    try:
        with atomic_directory(final_dir, prefix=final_dir.name + ".tmp-", suffix="") as tmp:
            logger.info("building the native FFF kernel in %s (first use; takes a while)", tmp)
            start = time.perf_counter()
            _compile_into(tmp)
            logger.info("built the native FFF kernel in %.1f s", time.perf_counter() - start)
    except OSError as err:
        if not (final_dir / f"{LIBRARY_NAME}.so").exists():  # lock-free platforms may lose
            raise ResourceError(f"could not move the built kernel into {final_dir}: {err}"
                                ) from err


def _summarise_failure(err: BaseException) -> str:
    """The tail of a build error (the compiler's message), on one paragraph."""
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    tail = (errors or lines)[-6:]
    return " | ".join(ln.strip() for ln in tail)[-1500:]


@functools.cache
def load() -> NativeLibrary | str:
    """The loaded library, or a sentence saying why it cannot be had (remembered per process).

    Does not look at ``ULTRAFASTBERT_NATIVE``; see :func:`status`.
    """
    isa = cpu_isa()
    if isa is None:
        return ("needs an x86-64 CPU with AVX-512 (F, BW, VL) or AVX2 and FMA; this CPU has "
                "neither, so the PyTorch path is used")
    final_dir = cache_root() / f"native-{build_key()}"
    if not (final_dir / f"{LIBRARY_NAME}.so").exists():
        missing = toolchain_reason()
        if missing is not None:
            return missing
    try:
        build_and_load(final_dir)
    except Exception as err:  # noqa: BLE001 - any build/load failure is reported, not raised
        message = _summarise_failure(err)
        logger.error("the native FFF kernel could not be built or loaded (using the PyTorch "
                     "path instead): %s", err)
        return f"failed to build or load ({message}); see the log for the full compiler output"
    ops = torch.ops.ultrafastbert
    return NativeLibrary(ops.fff_cpu_forward_tuned.default,
                         ops.fff_cpu_forward_tuned_nodes.default, ops.fff_cpu_isa(), final_dir)


@functools.cache
def status() -> NativeLibrary | str:
    """The loaded library, or why it cannot be used; decided on first call, then remembered.

    ``ULTRAFASTBERT_NATIVE`` is read here, on first use (reading the environment on every layer
    call would cost more than the 1-token kernel); :func:`reset` makes the next call look again.
    """
    reason = disabled_reason()
    return reason if reason is not None else load()


def unavailable_reason() -> str | None:
    """None when the kernel is loaded and usable, else why not (builds it on first call)."""
    loaded = status()
    return loaded if isinstance(loaded, str) else None


def reset() -> None:
    """Forget remembered outcomes (after changing the environment or installing a compiler).

    A library already loaded into this process stays loaded; a failed build is retried.
    """
    status.cache_clear()
    load.cache_clear()
