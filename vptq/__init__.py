"""vq-bench's VPTQ package: the algorithm (arXiv 2409.17066) and what a quantized model needs
at run time, plus the pieces every method shares (the quantized-weight interface, the method
registry, Hessian accumulation and the one second-order error-feedback solver).

Not Microsoft's inference package of the same import name: the two must not share an
environment. Our exported models load in theirs (see `vptq.format`).
"""
__version__ = "0.1.0"
