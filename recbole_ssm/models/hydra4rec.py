"""Hydra4Rec: the Mamba4Rec layer design on the Hydra block (Hwang, Lahoti, Dao, Gu 2024, "Hydra:
Bidirectional State Space Models Through Generalized Matrix Mixers"), a bidirectional quasiseparable
mixer. Padding is masked inside every block, so a user's representation does not depend on it."""
from recbole_ssm.models.base import SSMSequentialRecommender
from recbole_ssm.modules.hydra import HydraBlock


class Hydra4Rec(SSMSequentialRecommender):
    """Config keys: hidden_size, num_layers, dropout_prob, loss_type, d_state, d_conv (odd), expand,
    headdim (must divide expand * hidden_size), ngroups, chunk_size, ssm_backend."""

    mixer_class = HydraBlock
    mixer_config_keys = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")
    centred_conv = True
