"""The native CPU FFF back end: C++ (AVX-512 / AVX2) built on first use, never at import.

``kernel`` (the registered fp32 :class:`~.kernel.NativeCPUKernel` and bfloat16
:class:`~.kernel.NativeBF16Kernel`), ``build`` (compile, cache and load the library),
``tuning`` (the walk's knobs per CPU and shape, measured on first use), and the C++ sources:
``fff_cpu_walk.h`` (the one walk, templated on element types and dot product),
``fff_cpu_kernel.h`` (what the ops share: knobs, vector operations per instruction set, checks,
the threaded driver), ``fff_cpu.cpp`` and ``fff_cpu_bf16.cpp`` (the fp32 and bf16 ops).
"""
