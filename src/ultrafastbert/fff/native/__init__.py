"""The native CPU FFF back end: C++ (AVX-512 / AVX2) built on first use, never at import.

``kernel`` (the registered fp32 :class:`~.kernel.NativeCPUKernel` and bfloat16
:class:`~.kernel.NativeBF16Kernel`), ``build`` (compile, cache and load the library),
``tuning`` (the walk's knobs per CPU and shape, measured on first use), and the C++ sources:
``fff_cpu.cpp`` + ``fff_cpu_walk.h`` (fp32), ``fff_cpu_bf16.cpp`` + ``fff_cpu_bf16_walk.h``
(bfloat16).
"""
