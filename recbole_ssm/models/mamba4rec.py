"""Mamba4Rec (Liu, Lin, Yin, Zhang, Liu 2024, "Mamba4Rec: Towards Efficient Sequential Recommendation
with Selective State Space Models", arXiv 2403.03900): Mamba-1 layers with a feed-forward network."""
from recbole_ssm.models.base import SSMSequentialRecommender
from recbole_ssm.modules.mamba import MambaBlock


class Mamba4Rec(SSMSequentialRecommender):
    """Config keys: hidden_size, num_layers, dropout_prob, loss_type, d_state, d_conv, expand,
    ssm_backend (auto / torch / cuda)."""

    mixer_class = MambaBlock
    mixer_config_keys = ("d_state", "d_conv", "expand")
