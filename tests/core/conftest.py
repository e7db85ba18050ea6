"""Triton kernels run on the CPU interpreter when there is no CUDA device.

The variable must be set before any module of ap_vllm.kernels is imported (triton.jit reads it
when the kernels are decorated).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
