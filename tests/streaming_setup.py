"""What the streaming tests share: the models that stream, the CPU backends, the tolerances, and a
tiny model with weights away from their small initialisation (so that states matter)."""
import torch

from recbole_ssm.ops.backend import BACKENDS

STREAMING_MODELS = ("Mamba4Rec", "Mamba2Rec")
# Every CPU implementation: "auto" picks one of them, "cuda" needs a GPU.
CPU_BACKENDS = [backend for backend in BACKENDS if backend not in ("auto", "cuda")]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def streaming_model(build_model, model, layers=1, backend="auto", dtype=torch.float32):
    """``build_model``'s model (conftest) in evaluation mode, every weight moved by 0.1 N(0, 1)."""
    net = build_model(model, num_layers=layers, ssm_backend=backend).to(dtype).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=dtype))
    return net
