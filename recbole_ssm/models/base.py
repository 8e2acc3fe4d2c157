"""What our sequential recommenders share: embedding, stacked mixer layers, prediction and losses."""
import torch
import torch.nn as nn
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from recbole.utils import set_color

from recbole_ssm.models.checks import check_model_config
from recbole_ssm.modules.layer import MixerLayer
from recbole_ssm.modules.streaming import CausalStreaming

# The entry of a streaming state that holds each user's current sequence representation.
REPRESENTATION = "representation"


class SSMSequentialRecommender(SequentialRecommender):
    """item embedding -> dropout -> LayerNorm -> ``num_layers`` x (mixer + feed-forward) -> the
    representation at each user's last real item, scored against the whole item embedding table.

    Subclasses name their block in ``mixer_class``, a module with a ``causal`` attribute, called as
    ``mixer(x, mask, positions=None)`` with x: (batch, length, hidden_size), mask: (batch, length) bool,
    True on real items (None for a causal block), and positions: (batch,) or None (then the output at
    those positions only, (batch, hidden_size)), and built as
    ``mixer_class(d_model=hidden_size, backend=ssm_backend, **{key: config[key] for key in
    mixer_config_keys})``; ``centred_conv``: whether the block's convolution is centred (odd
    ``d_conv``) rather than causal. Every key read is checked first (:mod:`recbole_ssm.models.checks`).

    No ``input_type``: as for RecBole's SASRec, RecBole derives it from ``loss_type`` (pointwise for CE,
    pairwise for BPR, whose batches then carry a negative item).

    Streaming (models with a causal block, :class:`~recbole_ssm.modules.streaming.CausalStreaming`;
    evaluation mode): a user's state is a dict of tensors with the batch first, fixed in size whatever
    the history's length: each layer's block state (``layers.<i>.conv``, ``layers.<i>.ssm``) and the
    current representation (``representation``, zeros before any item).
    :meth:`empty_state` starts users with no history, :meth:`state_from_history` reads histories in
    one pass, :meth:`step` appends one item per user, and :meth:`all_item_scores` turns
    representations into the scores of :meth:`full_sort_predict`.
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

    def embed(self, items):
        """Item embedding, dropout, LayerNorm: item ids (...) -> (..., hidden)."""
        return self.LayerNorm(self.dropout(self.item_embedding(items)))

    def forward(self, item_seq, item_seq_len):
        """item_seq: (batch, length) right-padded with 0; item_seq_len: (batch,) -> (batch, hidden), the
        representation at each user's last real item.

        A causal block never lets a position see later ones, so right padding cannot reach a real
        item and needs no mask; a bidirectional one (Hydra) is given the mask of real items. The last
        layer computes its position-wise part at the last real items only."""
        mask = None
        if not self.layers[0].mixer.causal:
            mask = torch.arange(item_seq.shape[1], device=item_seq.device) < item_seq_len.unsqueeze(1)
        hidden = self.embed(item_seq)
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
        return self.all_item_scores(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]))

    def all_item_scores(self, representation):
        """Scores of every item id (padding 0 included): (batch, hidden) -> (batch, n_items)."""
        return representation @ self.item_embedding.weight.T

    # ----------------------------------------------------------------------------------- streaming

    @torch.no_grad()
    def empty_state(self, batch_size):
        """The streaming state of ``batch_size`` users with no history (zeros)."""
        self._require_streaming("empty_state", eval_only=False)
        state = {}
        for index, layer in enumerate(self.layers):
            state.update(_prefixed(index, layer.mixer.empty_state(batch_size)))
        state[REPRESENTATION] = self.item_embedding.weight.new_zeros(batch_size, self.hidden_size)
        return state

    @torch.no_grad()
    def state_from_history(self, item_seq, item_seq_len):
        """The streaming state after each user's history, in one pass of the scans (their final states)
        and convolutions; item_seq (batch, length) right-padded with 0, item_seq_len (batch,), 0 allowed.
        Its representation is :meth:`forward`'s."""
        self._require_streaming("state_from_history")
        batch, length = item_seq.shape
        if item_seq_len.shape != (batch,) or bool(((item_seq_len < 0) | (item_seq_len > length)).any()):
            raise ValueError(f"state_from_history: item_seq_len must be ({batch},) with values in [0, {length}] "
                             f"(the width of item_seq); got shape {tuple(item_seq_len.shape)}, values "
                             f"{item_seq_len.min().item()}..{item_seq_len.max().item()}")
        if length == 0:
            return self.empty_state(batch)
        mask = torch.arange(length, device=item_seq.device) < item_seq_len.unsqueeze(1)  # (b, l)
        self._check_items(item_seq[mask], "state_from_history")
        # The blocks take their states at each row's last real item, which the mask tells them (forward()
        # needs no mask: right padding never reaches a real item of a causal block).
        hidden = self.embed(item_seq)
        last_positions = (item_seq_len - 1).clamp(min=0)
        state = {}
        for index, layer in enumerate(self.layers):
            positions = last_positions if index == len(self.layers) - 1 else None
            hidden, layer_state = layer(hidden, mask, positions=positions, return_state=True)
            state.update(_prefixed(index, layer_state))
        state[REPRESENTATION] = hidden.masked_fill((item_seq_len == 0).unsqueeze(1), 0)  # (b, hidden)
        return state

    @torch.no_grad()
    def step(self, state, items, mask=None):
        """Append one item per user, in O(1) of the history's length.

        state: from :meth:`empty_state`, :meth:`state_from_history` or an earlier step (not modified);
        items: (batch,) item ids; mask: (batch,) bool or None, True for the users that advance (the
        others keep their state, and their items are ignored). Returns (representation (batch, hidden),
        new state); the representation is what :meth:`forward` gives on the whole history.
        """
        self._require_streaming("step")
        self._check_state(state, items)
        if mask is not None:
            if mask.shape != items.shape or mask.dtype != torch.bool:
                raise ValueError(f"step: mask must be a bool tensor of the items' shape {tuple(items.shape)}; "
                                 f"got {mask.dtype} of shape {tuple(mask.shape)}")
            rows = mask.nonzero().squeeze(1)
            if len(rows) < len(items):
                if len(rows) == 0:
                    return state[REPRESENTATION], dict(state)
                _, advanced = self.step({name: t.index_select(0, rows) for name, t in state.items()},
                                        items.index_select(0, rows))
                state = {name: t.index_copy(0, rows, advanced[name]) for name, t in state.items()}
                return state[REPRESENTATION], state
        self._check_items(items, "step")
        hidden = self.embed(items)                                  # (b, hidden)
        new_state = {}
        for index, layer in enumerate(self.layers):
            prefix = f"layers.{index}."
            hidden, layer_state = layer.step(
                hidden, {name: state[prefix + name] for name in layer.mixer.state_names})
            new_state.update(_prefixed(index, layer_state))
        new_state[REPRESENTATION] = hidden
        return hidden, new_state

    def state_names(self):
        """The entries of a streaming state."""
        return [f"layers.{index}.{name}" for index, layer in enumerate(self.layers)
                for name in layer.mixer.state_names] + [REPRESENTATION]

    def _require_streaming(self, call, eval_only=True):
        name = type(self).__name__
        if not issubclass(self.mixer_class, CausalStreaming):
            reason = getattr(self.mixer_class, "streaming_unsupported", None) or (
                f"its block {self.mixer_class.__name__} keeps no streaming state")
            raise NotImplementedError(f"{name}.{call}() is not available: {reason}")
        if eval_only and self.training:
            raise RuntimeError(f"{name}.{call}() runs in evaluation mode only (dropout off, as in "
                               "full_sort_predict); call model.eval() first")

    def _check_state(self, state, items):
        if items.dim() != 1:
            raise ValueError(f"step: items must be (batch,), one item id per user; got shape {tuple(items.shape)}")
        expected = self.state_names()
        if set(state) != set(expected):
            raise ValueError(f"step: not a streaming state of this {type(self).__name__}: missing "
                             f"{sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}")
        sizes = {name: t.shape[0] for name, t in state.items() if t.shape[0] != len(items)}
        if sizes:
            raise ValueError(f"step: {len(items)} items but state entries of batch sizes {sizes}")

    def _check_items(self, items, call):
        if not len(items):
            return
        low, high = torch.aminmax(items)
        if low < 1 or high >= self.n_items:
            bad = items[(items < 1) | (items >= self.n_items)]
            raise ValueError(f"{call}: item ids must be in [1, {self.n_items - 1}] (0 is RecBole's padding); "
                             f"got {bad[:5].tolist()}")

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


def _prefixed(index, layer_state):
    """A layer's block state as entries of the model's state."""
    return {f"layers.{index}.{name}": tensor for name, tensor in layer_state.items()}
