"""Autograd helpers shared by the pure-PyTorch ops."""
import torch


def needs_grad(*tensors):
    """Whether autograd will differentiate through any of ``tensors`` (``None`` entries allowed): only
    then must an op keep its intermediates; otherwise it may update them in place."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
