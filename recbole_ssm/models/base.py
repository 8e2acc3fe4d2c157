"""What our sequential recommenders share: embedding, stacked mixer layers, prediction and losses."""
import torch
import torch.nn as nn
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from recbole.utils import set_color

from recbole_ssm.models.checks import check_model_config
from recbole_ssm.modules.layer import MixerLayer


class SSMSequentialRecommender(SequentialRecommender):
    """item embedding -> dropout -> LayerNorm -> ``num_layers`` x (mixer + feed-forward) -> the
    representation at each user's last real item, scored against the whole item embedding table.

    Subclasses name their block in ``mixer_class``, a module with a ``causal`` attribute, called as
    ``mixer(x, mask)`` with x: (batch, length, hidden_size) and mask: (batch, length) bool, True on real
    items (None for a causal block), and built as
    ``mixer_class(d_model=hidden_size, backend=ssm_backend, **{key: config[key] for key in
    mixer_config_keys})``; ``centred_conv``: whether the block's convolution is centred (odd
    ``d_conv``) rather than causal. Every key read is checked first (:mod:`recbole_ssm.models.checks`).

    No ``input_type``: as for RecBole's SASRec, RecBole derives it from ``loss_type`` (pointwise for CE,
    pairwise for BPR, whose batches then carry a negative item).
    """

    mixer_class = None
    mixer_config_keys = ()
    centred_conv = False

    def __init__(self, config, dataset):
        check_model_config(type(self), config)
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.dropout_prob = config["dropout_prob"]
        self.loss_type = config["loss_type"]
        self.ssm_backend = config["ssm_backend"] or "auto"

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(self.dropout_prob)
        self.layers = nn.ModuleList(
            MixerLayer(self.build_mixer(config), self.hidden_size, self.dropout_prob,
                       residual=self.num_layers > 1)
            for _ in range(self.num_layers)
        )
        if self.loss_type == "BPR":
            self.loss_fct = BPRLoss()
            negatives = config["train_neg_sample_args"]
            self.logger.info(f"BPR loss: {negatives['sample_num']} {negatives['distribution']} "
                             "negative item(s) per positive (train_neg_sample_args)")
        else:
            self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    def build_mixer(self, config):
        """The sequence-mixing block of one layer."""
        options = {key: config[key] for key in self.mixer_config_keys}
        return self.mixer_class(d_model=self.hidden_size, backend=self.ssm_backend, **options)

    @staticmethod
    def _init_weights(module):
        # Mamba4Rec's initialisation, applied to every linear and embedding layer of the model.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, item_seq, item_seq_len):
        """item_seq: (batch, length) right-padded with 0; item_seq_len: (batch,) -> (batch, hidden), the
        representation at each user's last real item.

        A causal block never lets a position see later ones, so right padding cannot reach a real
        item and needs no mask; a bidirectional one (Hydra) is given the mask of real items. The last
        layer computes its position-wise part at the last real items only."""
        mask = None
        if not self.layers[0].mixer.causal:
            mask = torch.arange(item_seq.shape[1], device=item_seq.device) < item_seq_len.unsqueeze(1)
        hidden = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))
        for layer in self.layers[:-1]:
            hidden = layer(hidden, mask)
        return self.layers[-1](hidden, mask, positions=item_seq_len - 1)

    def calculate_loss(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            pos_score = (seq_output * self.item_embedding(pos_items)).sum(-1)
            neg_score = (seq_output * self.item_embedding(interaction[self.NEG_ITEM_ID])).sum(-1)
            return self.loss_fct(pos_score, neg_score)
        logits = seq_output @ self.item_embedding.weight.T          # (b, n_items)
        return self.loss_fct(logits, pos_items)

    def predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (seq_output * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return seq_output @ self.item_embedding.weight.T            # (b, n_items)

    def count_parameters(self, embeddings=True):
        """Trainable parameters, with or without the item embedding table."""
        params = [p for p in self.parameters() if p.requires_grad]
        total = sum(p.numel() for p in params)
        return total if embeddings else total - self.item_embedding.weight.numel()

    def __str__(self):
        return (
            super().__str__()
            + set_color("\nTrainable parameters without embeddings", "blue")
            + f": {self.count_parameters(embeddings=False)}"
        )
