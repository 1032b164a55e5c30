"""@triton.jit code only: no torch autograd, no validation, no dispatch (design.md)."""
