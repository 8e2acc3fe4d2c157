"""Hydra4Rec: the Mamba4Rec layer design on the Hydra block (Hwang, Lahoti, Dao, Gu 2024, "Hydra:
Bidirectional State Space Models Through Generalized Matrix Mixers"), a bidirectional quasiseparable
mixer. Padding is masked inside every block, so a user's representation does not depend on it."""
from recbole_ssm.models.base import SSMSequentialRecommender
from recbole_ssm.modules.hydra import HydraBlock


class Hydra4Rec(SSMSequentialRecommender):
    """Config keys: hidden_size, num_layers, dropout_prob, loss_type, d_state, d_conv (odd), expand,
    headdim (must divide expand * hidden_size), ngroups, chunk_size, ssm_backend."""

    def build_mixer(self, config):
        return HydraBlock(
            d_model=self.hidden_size,
            d_state=config["d_state"],
            d_conv=config["d_conv"],
            expand=config["expand"],
            headdim=config["headdim"],
            ngroups=config["ngroups"],
            chunk_size=config["chunk_size"],
            backend=self.ssm_backend,
        )
