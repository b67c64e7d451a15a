import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported. Set it before any test module imports
# bridge_kernels (model.py does), so that the kernel tests run under the interpreter on machines without
# a GPU, whatever the order of the test files. The model itself stays on the PyTorch path on the CPU
# ("auto" picks Triton only on CUDA).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
