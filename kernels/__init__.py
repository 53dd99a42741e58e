"""C sources of pccfast's CPU kernels (``*.c``), shipped as package data of ``pccfast.kernels``.

Nothing here is imported for its code: ``pccfast.native`` compiles a source on first use
(see its docstring and ``kernels/README.md``).
"""
