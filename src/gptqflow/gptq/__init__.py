"""Pure GPTQ numerics: Hessians, quantization grids, the solver and the work plan.

Nothing in this package does I/O, reads configs or talks to other ranks.
"""
