"""The depth-0 FFF back end: two dense GEMMs (``kernel``: the registered
:class:`~.kernel.GemmKernel`); no routing (every node is on the path) and no training path."""
