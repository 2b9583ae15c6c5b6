"""udquant: UD-style mixed-precision GGUF quants of distills, with the distill's own imatrix."""

__version__ = "0.1.0"
