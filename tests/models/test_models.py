"""The three models through RecBole's API, on real ml-100k batches."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from recbole.config import Config
from recbole.data.interaction import Interaction
from recbole.utils import get_model

import recbole_ssm
from recbole_ssm.models.base import SSMSequentialRecommender
from recbole_ssm.modules.hydra import HydraBlock
from tests.conftest import CPU_BACKENDS, MODELS

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def batch(ml100k):
    """One training batch of real sequences (right-padded, varied lengths)."""
    return next(iter(ml100k[1]))


def build(make_config, ml100k, model, **overrides):
    torch.manual_seed(0)
    config = make_config(model, **overrides)
    return get_model(model)(config, ml100k[1]._dataset)


@pytest.mark.parametrize("model", MODELS)
def test_registered_with_recbole(model):
    cls = get_model(model)
    assert cls is getattr(recbole_ssm, model)
    assert issubclass(cls, SSMSequentialRecommender)


@pytest.mark.parametrize("model", MODELS)
def test_packaged_defaults(model):
    config = Config(model=model, dataset="ml-100k")
    assert (config["hidden_size"], config["num_layers"], config["dropout_prob"]) == (64, 1, 0.2)
    assert (config["loss_type"], config["d_state"], config["expand"]) == ("CE", 32, 2)
    assert config["d_conv"] == (7 if model == "Hydra4Rec" else 4)
    assert config["ssm_backend"] == "auto"


def test_config_precedence(tmp_path, monkeypatch):
    """RecBole's order: packaged defaults < config files < config dict < command line."""
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("d_state: 12\nd_conv: 3\nexpand: 3\n")
    monkeypatch.setattr("sys.argv", ["run_recbole", "--d_conv=5"])
    config = Config(model="Mamba4Rec", dataset="ml-100k", config_file_list=[str(config_file)],
                    config_dict={"d_state": 10, "d_conv": 6})
    assert config["d_state"] == 10     # dict over file
    assert config["d_conv"] == 5       # command line over dict
    assert config["expand"] == 3       # file over packaged default
    assert config["hidden_size"] == 64  # packaged default


@pytest.mark.parametrize("model", MODELS)
def test_scores_and_ce_loss(make_config, ml100k, batch, model):
    net = build(make_config, ml100k, model).eval()  # no dropout: scores and loss are comparable
    scores = net.full_sort_predict(batch)
    assert scores.shape == (len(batch), ml100k[0].item_num)
    rows = torch.arange(len(batch))
    items = batch[net.POS_ITEM_ID]
    single = net.predict(Interaction({**{k: batch[k] for k in batch.columns}, net.ITEM_ID: items}))
    torch.testing.assert_close(single, scores[rows, items], rtol=1e-5, atol=1e-5)

    loss = net.calculate_loss(batch)
    torch.testing.assert_close(loss, F.cross_entropy(net.full_sort_predict(batch), items))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_bpr_loss(make_config, ml100k, batch):
    net = build(make_config, ml100k, "Hydra4Rec", loss_type="BPR",
                train_neg_sample_args={"distribution": "uniform", "sample_num": 1}).eval()
    negatives = torch.randint(1, ml100k[0].item_num, (len(batch),))
    data = Interaction({**{k: batch[k] for k in batch.columns}, net.NEG_ITEM_ID: negatives})
    scores = net.full_sort_predict(batch)
    rows = torch.arange(len(batch))
    margin = scores[rows, batch[net.POS_ITEM_ID]] - scores[rows, negatives]
    torch.testing.assert_close(net.calculate_loss(data), -torch.log(1e-10 + torch.sigmoid(margin)).mean())


@pytest.mark.parametrize("num_layers,residual", [(1, False), (2, True)])
def test_residual_only_when_stacked(make_config, ml100k, batch, num_layers, residual):
    """Each layer computes FFN(LayerNorm(mixer(x) + x)) when layers are stacked, FFN(LayerNorm(mixer(x)))
    for a single layer (dropout off in eval mode); the last layer at each user's last item only."""
    net = build(make_config, ml100k, "Mamba4Rec", num_layers=num_layers).eval()
    assert len(net.layers) == num_layers
    assert all(layer.ffn.w_1.out_features == 4 * 16 for layer in net.layers)
    calls = []
    for layer in net.layers:
        layer.register_forward_hook(lambda layer, inputs, output: calls.append((layer, inputs, output)))
    item_seq_len = batch[net.ITEM_SEQ_LEN]
    with torch.no_grad():
        net.forward(batch[net.ITEM_SEQ], item_seq_len)
        assert [layer for layer, _, _ in calls] == list(net.layers)
        for layer, (x, mask), output in calls:  # positions, a keyword, are not in inputs
            mixed = layer.mixer(x, mask)
            expected = layer.ffn(layer.LayerNorm(mixed + x if residual else mixed))  # (b, l, d) all positions
            if layer is net.layers[-1]:
                expected = expected[torch.arange(len(item_seq_len)), item_seq_len - 1]  # (b, d)
            torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_parameter_counts_printed(make_config, ml100k, model):
    net = build(make_config, ml100k, model)
    total = sum(p.numel() for p in net.parameters())
    without = total - ml100k[0].item_num * 16
    assert net.count_parameters() == total and net.count_parameters(embeddings=False) == without
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(net))  # without RecBole's colour codes
    assert f"Trainable parameters: {total}" in text
    assert f"Trainable parameters without embeddings: {without}" in text


def readme_parameter_counts():
    """{model: (parameters, parameters without the item embedding)} from the README's table."""
    rows = re.findall(r"^\| (\w+)[^|]* \| ([\d,]+) \| ([\d,]+) \|$", README.read_text(), re.MULTILINE)
    return {model: (int(total.replace(",", "")), int(without.replace(",", ""))) for model, total, without in rows}


@pytest.mark.parametrize("model", [*MODELS, "SASRec"])
def test_parameter_counts_in_readme(ml100k, model):
    """The README's parameter counts: packaged (or RecBole's) defaults, ml-100k's 1,683 item ids."""
    counts = readme_parameter_counts()
    assert set(counts) == {*MODELS, "SASRec"}
    config = Config(model=model, dataset="ml-100k", config_dict={"train_neg_sample_args": None})  # CE
    net = get_model(model)(config, ml100k[1]._dataset)
    total = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert net.item_embedding.num_embeddings == 1683
    assert counts[model] == (total, total - net.item_embedding.weight.numel())


@pytest.mark.parametrize("model", MODELS)
def test_cpu_backends_agree(make_config, ml100k, batch, model):
    """The compiled kernels (numba) and the pure-PyTorch reference give one model the same scores,
    loss and gradients, with the same parameters."""
    nets = {backend: build(make_config, ml100k, model, ssm_backend=backend, dropout_prob=0.0)
            for backend in ("torch", "numba")}
    assert list(nets["torch"].state_dict()) == list(nets["numba"].state_dict())
    nets["numba"].load_state_dict(nets["torch"].state_dict())
    scores, grads = {}, {}
    for backend, net in nets.items():
        net.train()  # the training path (chunked scans, autograd); dropout is off
        scores[backend] = net.full_sort_predict(batch)
        net.calculate_loss(batch).backward()
        grads[backend] = {name: p.grad for name, p in net.named_parameters()}
    torch.testing.assert_close(scores["numba"], scores["torch"], rtol=1e-5, atol=1e-5)
    for name, grad in grads["torch"].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads["numba"][name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["no_grad", "training"])
def test_padding_and_batch_invariance(make_config, ml100k, batch, model, backend, training):
    """Train mode with dropout off, without autograd and with it (training: the chunked scans, whose
    chunks change with the padded length): a user's representation does not depend on how much
    padding follows the sequence, nor on the other users in the batch; in training, the gradients
    of the parameters do not depend on the padding either. In float64, so that any dependence shows
    above rounding."""
    net = build(make_config, ml100k, model, dropout_prob=0.0, ssm_backend=backend).double().train()
    item_seq, item_seq_len = batch[net.ITEM_SEQ][:256], batch[net.ITEM_SEQ_LEN][:256]
    assert item_seq_len.min() < item_seq.shape[1]  # the batch really has padding
    weights = torch.randn(len(item_seq), net.hidden_size, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)

    def assert_same_representations(item_seq, item_seq_len, rows=slice(None)):
        torch.testing.assert_close(net.forward(item_seq, item_seq_len), reference[rows], rtol=0, atol=1e-10)

    def gradients(item_seq):
        return torch.autograd.grad((net.forward(item_seq, item_seq_len) * weights).sum(), list(net.parameters()))

    with torch.set_grad_enabled(training):
        reference = net.forward(item_seq, item_seq_len)
        for extra in (3, 17):
            assert_same_representations(F.pad(item_seq, (0, extra)), item_seq_len)
        for row in range(0, len(item_seq), 37):  # each user alone, with no padding at all
            length = int(item_seq_len[row])
            assert_same_representations(item_seq[row:row + 1, :length], item_seq_len[row:row + 1],
                                        slice(row, row + 1))
        half = len(item_seq) // 2
        assert_same_representations(item_seq[half:], item_seq_len[half:], slice(half, None))
        if training:
            expected = gradients(item_seq)
            for name, grad, expected_grad in zip(dict(net.named_parameters()), gradients(F.pad(item_seq, (0, 17))),
                                                 expected):
                torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10,
                                           msg=lambda message: f"gradient of {name}: {message}")


@pytest.mark.parametrize("model", MODELS)
def test_one_user_on_two_threads_scores_as_in_the_batch(make_config, ml100k, batch, model, record_calls):
    """float32 inference for one user at a time on two threads (each row's work shared out over
    torch's OpenMP team): the scores of the same users in the batch on one thread, with and without
    the padding after their sequences."""
    from recbole_ssm.ops import compiled

    launches = record_calls(compiled, "_launch_team")
    net = build(make_config, ml100k, model).eval()
    item_seq, item_seq_len = batch[net.ITEM_SEQ][:40:8], batch[net.ITEM_SEQ_LEN][:40:8]
    with torch.no_grad():
        expected = net.all_item_scores(net.forward(item_seq, item_seq_len))
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            for row in range(len(item_seq)):
                length = int(item_seq_len[row])
                for sequence in (item_seq[row:row + 1], item_seq[row:row + 1, :length]):
                    scores = net.all_item_scores(net.forward(sequence, item_seq_len[row:row + 1]))
                    torch.testing.assert_close(scores, expected[row:row + 1], rtol=1e-5, atol=1e-5)
        finally:
            torch.set_num_threads(previous)
    assert len(launches) == 2 * len(item_seq) * net.num_layers


def test_padding_would_leak_into_hydra_without_the_mask():
    """The invariance above is not vacuous: Hydra's block does see padding when it is not masked."""
    torch.manual_seed(0)
    block = HydraBlock(16, d_state=8, headdim=8)
    hidden = torch.randn(4, 12, 16)
    hidden[:, 8:] = torch.randn(16)  # padding embeds to one constant vector (LayerNorm's bias)
    mask = (torch.arange(12) < 8).expand(4, 12)
    with torch.no_grad():
        masked, unmasked = block(hidden, mask), block(hidden)
        shorter = block(hidden[:, :8])
    torch.testing.assert_close(masked[:, :8], shorter, rtol=1e-5, atol=1e-5)
    leak = (unmasked[:, :8] - shorter).abs().max() / shorter.abs().max()
    assert leak > 1e-2


@pytest.mark.parametrize("model", MODELS)
def test_forward_equals_every_position_then_gathering(make_config, ml100k, batch, model):
    """forward() computes the last layer's position-wise part at the last real items only, and
    gives causal blocks no mask: the same as running every layer over every position, with the mask,
    and taking each user's last real item."""
    net = build(make_config, ml100k, model, num_layers=2).eval()
    item_seq, item_seq_len = batch[net.ITEM_SEQ], batch[net.ITEM_SEQ_LEN]
    with torch.no_grad():
        mask = torch.arange(item_seq.shape[1]) < item_seq_len.unsqueeze(1)
        hidden = net.LayerNorm(net.item_embedding(item_seq))
        for layer in net.layers:
            hidden = layer(hidden, mask)
        expected = hidden[torch.arange(len(item_seq)), item_seq_len - 1]
        torch.testing.assert_close(net.forward(item_seq, item_seq_len), expected, rtol=1e-5, atol=1e-5)
