"""The Triton FFF back end (CUDA; CPU tensors only through Triton's interpreter, for tests).

``kernel`` (the registered :class:`~.kernel.TritonKernel`, availability, ``torch.compile``
custom operators), ``routing`` (the fused forward: walk and output in one kernel),
``training`` (the backward over the visited nodes), ``jit`` (the ``@triton.jit`` device code,
imported only when a kernel runs: Triton is optional).
"""
