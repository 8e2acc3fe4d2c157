"""Mamba2Rec: the Mamba4Rec layer design on the Mamba-2 (SSD) block (Dao & Gu 2024, "Transformers are
SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality")."""
from recbole_ssm.models.base import SSMSequentialRecommender
from recbole_ssm.modules.mamba2 import Mamba2Block


class Mamba2Rec(SSMSequentialRecommender):
    """Config keys: hidden_size, num_layers, dropout_prob, loss_type, d_state, d_conv, expand,
    headdim (must divide expand * hidden_size), ngroups, chunk_size, ssm_backend."""

    mixer_class = Mamba2Block
    mixer_config_keys = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")
