"""Baselines behind the same interface as VPTQ (`vptq.methods.Method`): the unquantized
reference, round-to-nearest, and (later) GPTQ, GPTVQ-style and AQLM-style."""
