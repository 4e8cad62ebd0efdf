"""The vectorised PyTorch FFF back end (every device and floating dtype, no compiler).

``kernel`` (the registered :class:`~.kernel.TorchKernel` and its packed weights), ``routing``
(the level-by-level tree walk), ``sparse`` (the CSR products over the visited nodes that
inference and training share), ``training`` (the differentiable hard-routed forward and its
backward, and the original masked form).
"""
