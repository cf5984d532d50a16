"""The forms' Triton kernels (the 'triton' entry of kernels.py, selected on CUDA).

plan.py lays out a step's tokens once for every layer (plain torch); kernels.py holds the @triton.jit
kernels, each with its Semantics; ops.py keeps each layer's slot table and launches them. On CPU they
run only under Triton's interpreter (TRITON_INTERPRET=1), where tests/adapters proves them equal to the
torch reference.
"""
