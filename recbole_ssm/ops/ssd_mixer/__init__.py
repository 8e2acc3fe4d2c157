"""The middle of the SSD blocks (Mamba-2, Hydra) without gradients, in one call of compiled CPU kernels:
from the input projection's outputs to what ``out_proj`` takes.

    depthwise convolution + SiLU of [x, B, C]   (:func:`recbole_ssm.ops.conv.depthwise_conv1d`)
    Hydra's diagonal D + fc_D(x)
    the SSD scan(s) with the skip term          (:func:`recbole_ssm.ops.ssd.ssd_scan`,
                                                 :func:`recbole_ssm.ops.hydra.hydra_mixer`)
    gated RMSNorm                               (:func:`recbole_ssm.ops.gated_rmsnorm.gated_rmsnorm`)

The same compiled kernels that those ops run one by one, called in turn from one compiled function
(:mod:`.fused`), so that a block pays the per-call cost of PyTorch operations and of the ops' wrappers
(conversions, views, splits: about 0.3 ms per layer, more than the kernels' own work for one user at
L=200) once. With gradients to compute, or off the compiled backend, the blocks call the ops one by
one; the tests hold this path to them.
"""


def ssd_mixer_no_grad(xBC, dt, z, conv_weight, conv_bias, causal, A, D, fc_D_weight, norm_weight, eps, group_size,
                      norm_before_gate, headdim, d_state, ngroups, mask=None, positions=None):
    """Convolution + SiLU, scan(s) and gated RMSNorm of an SSD block, without gradients.

    xBC: (b, l, d_inner + directions * 2 * ngroups * d_state), [x, (B, C) per direction], before the
    depthwise convolution (conv_weight (channels, 1, width), conv_bias (channels,) or None; causal, or
    centred with an odd width); dt: (b, l, directions, heads) after softplus; z: (b, l, d_inner), or
    (b, d_inner) at ``positions`` (b,) only; A, D: (heads,); fc_D_weight: (heads, d_inner) for Hydra's
    diagonal D + fc_D(x), else None (the skip term is D). One direction is Mamba-2's causal scan; two
    are Hydra's forward and backward scans, each output moved one position on. mask: (b, l) bool or
    None, True on real positions (the scans skip the others). Gated norm: weight (d_inner,), eps,
    group_size, norm_before_gate as :func:`recbole_ssm.ops.gated_rmsnorm.gated_rmsnorm`.
    Returns the norm's output, shaped as z, in xBC's dtype.
    """
    from recbole_ssm.ops.ssd_mixer.fused import ssd_mixer_fused

    return ssd_mixer_fused(xBC, dt, z, conv_weight, conv_bias, causal, A, D, fc_D_weight, norm_weight, eps,
                           group_size, norm_before_gate, headdim, d_state, ngroups, mask, positions)
