"""Mamba2Rec: the Mamba4Rec layer design on the Mamba-2 (SSD) block (Dao & Gu 2024, "Transformers are
SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality")."""
from recbole_ssm.models.base import SSMSequentialRecommender
from recbole_ssm.modules.mamba2 import Mamba2Block


class Mamba2Rec(SSMSequentialRecommender):
    """Config keys: hidden_size, num_layers, dropout_prob, loss_type, d_state, d_conv, expand,
    headdim (must divide expand * hidden_size), ngroups, chunk_size, ssm_backend."""

    def build_mixer(self, config):
        return Mamba2Block(
            d_model=self.hidden_size,
            d_state=config["d_state"],
            d_conv=config["d_conv"],
            expand=config["expand"],
            headdim=config["headdim"],
            ngroups=config["ngroups"],
            chunk_size=config["chunk_size"],
            backend=self.ssm_backend,
        )
