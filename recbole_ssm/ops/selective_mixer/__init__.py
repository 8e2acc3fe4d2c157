"""The middle of the Mamba-1 block without gradients, in two calls of compiled CPU kernels: from the
input projection's outputs to what ``out_proj`` takes.

    depthwise causal convolution + SiLU of x    (:func:`recbole_ssm.ops.conv.depthwise_conv1d`)
    x_proj: the step sizes' low-rank input, B, C  (one PyTorch matrix product, between the two calls)
    dt_proj, softplus and the selective scan with the skip term and the gate silu(z)
                                                (:func:`recbole_ssm.ops.selective_scan.selective_scan`)

The kernels the ops run one by one, with dt_proj (rank dt_rank, 4 at d_model 64) computed per position
inside the scan rather than as a product of its own, so that a block pays the per-call cost of
PyTorch operations and of the ops' wrappers (conversions, transposes, copies of B and C, dt_proj and
-exp(A_log): 0.3-0.4 ms per layer for one user at L=200, as much as the scan's own loop) once. With
``positions``, the scan stops at each row's position and gates its output there only. With gradients
to compute, with a streaming state, or off the compiled backend, the block calls the ops one by one;
the tests hold this path to them.
"""


def selective_mixer_no_grad(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                            positions=None):
    """Convolution + SiLU, x_proj, dt_proj and the gated selective scan of a Mamba-1 block, without
    gradients.

    x: (b, d_inner, l), in_proj's x half before the causal depthwise convolution (conv_weight
    (d_inner, 1, width), conv_bias (d_inner,) or None); z: (b, d_inner, l), or (b, d_inner) at
    ``positions`` (b,) only; x_proj_weight (dt_rank + 2 d_state, d_inner); dt_proj_weight
    (d_inner, dt_rank), dt_proj_bias (d_inner,); A_log (d_inner, d_state), A = -exp(A_log); D (d_inner,).
    Returns what out_proj takes: (b, l, d_inner), or (b, d_inner) at ``positions``, in x's dtype.
    """
    from recbole_ssm.ops.selective_mixer.fused import selective_mixer_fused

    return selective_mixer_fused(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log,
                                 D, positions)
