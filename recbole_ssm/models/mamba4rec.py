"""Mamba4Rec (Liu, Lin, Yin, Zhang, Liu 2024, "Mamba4Rec: Towards Efficient Sequential Recommendation
with Selective State Space Models", arXiv 2403.03900): Mamba-1 layers with a feed-forward network."""
from recbole_ssm.models.base import SSMSequentialRecommender
from recbole_ssm.modules.mamba import MambaBlock


class Mamba4Rec(SSMSequentialRecommender):
    """Config keys: hidden_size, num_layers, dropout_prob, loss_type, d_state, d_conv, expand,
    ssm_backend (auto / torch / cuda)."""

    def build_mixer(self, config):
        return MambaBlock(
            d_model=self.hidden_size,
            d_state=config["d_state"],
            d_conv=config["d_conv"],
            expand=config["expand"],
            backend=self.ssm_backend,
        )
