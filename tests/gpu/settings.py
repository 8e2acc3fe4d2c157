"""What the GPU suite runs on, what it compares, and how closely.

Tolerances are norm-wise relative errors, ‖got − expected‖ / ‖expected‖, of the fused path against
our PyTorch path on the same device, weights and inputs (float32 unless stated):
  - causal convolution, gated RMSNorm: the same sums in another order (FLOAT32_ROUNDING);
  - selective scan: built with --use_fast_math, so exp and softplus are approximate; mamba-ssm's own
    float32 test allows 6e-4 per element (SELECTIVE_SCAN);
  - SSD scan: its Triton matrix products run in TF32 (10-bit mantissa) on float32 inputs (SSD);
  - under bfloat16 autocast, against the float32 PyTorch path: bfloat16 activations (8-bit
    mantissa), and under AMP mamba-ssm keeps the SSD chunk states in C's dtype (BF16_AUTOCAST).
Each check records its measured error as a test property (``record_property``), so that the junit
report of a run (benchmarks/gpu_check.py) shows how close each came to its bound.
"""
import torch

# Without CUDA, conftest.py collects test_gpu_device.py alone, which skips with this reason.
WITHOUT_CUDA = ("tests/gpu needs a CUDA device (torch.cuda.is_available() is False); run it on a GPU machine "
                "with recbole-ssm[cuda]: python -m benchmarks.gpu_check (benchmarks/README.md, 'GPU check')")

DEVICE = torch.device("cuda")
FUSED = "cuda"          # the ssm_backend of the fused kernels
REFERENCE = "torch"     # the pure-PyTorch path

FLOAT32_ROUNDING = 1e-5
SELECTIVE_SCAN = 5e-4
SSD = 3e-3
BF16_AUTOCAST = 3e-2

# Which kernels each model's layers call, hence its float32 tolerance: the largest of them.
MODEL_TOLERANCE = {"Mamba4Rec": SELECTIVE_SCAN, "Mamba2Rec": SSD, "Hydra4Rec": SSD}


def relative_error(got, expected):
    """‖got − expected‖ / ‖expected‖ in float64; inf where got is not finite or shapes differ."""
    if got.shape != expected.shape or not torch.isfinite(got).all():
        return float("inf")
    expected = expected.double()
    return ((got.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()
