"""The three models through the fused kernels against the PyTorch path, on the GPU: loss, gradients
and scores in float32, the forward under bfloat16 autocast, padding and batch invariance, and
full_sort_predict of one set of weights under every backend."""
import pytest
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction
from recbole.utils import get_model

from tests.conftest import MODELS, with_backend
from tests.gpu.settings import (BF16_AUTOCAST, DEVICE, FUSED, MODEL_TOLERANCE, REFERENCE,
                                  relative_error)

pytestmark = pytest.mark.gpu

# The packaged defaults (hidden 64, d_state 32, headdim 16, chunk 64), without dropout so that two
# runs of one model compute the same function.
SETTINGS = {"hidden_size": 64, "d_state": 32, "headdim": 16, "chunk_size": 64, "dropout_prob": 0.0}
# The scores of one checkpoint on two devices, through the same PyTorch path (float32 on both).
ACROSS_DEVICES = 1e-4


@pytest.fixture(scope="module")
def batches(ml100k):
    """Real right-padded ml-100k sequences (L = 20, one chunk), and synthetic ones over five chunks
    with lengths from 1 to 300."""
    real = next(iter(ml100k[1]))
    dataset = ml100k[0]
    config = dataset.config
    g = torch.Generator().manual_seed(0)
    users, length = 64, 300
    lengths = torch.randint(1, length + 1, (users,), generator=g)
    lengths[0] = length
    items = torch.randint(1, dataset.item_num, (users, length), generator=g)
    items[torch.arange(length) >= lengths[:, None]] = 0  # right padding, as RecBole's
    synthetic = Interaction({
        config["USER_ID_FIELD"]: torch.arange(1, users + 1),
        config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]: items,
        config["ITEM_LIST_LENGTH_FIELD"]: lengths,
        config["ITEM_ID_FIELD"]: torch.randint(1, dataset.item_num, (users,), generator=g),
    })
    return {"ml-100k L=20": real, "synthetic L=300": synthetic}


def build(make_config, ml100k, model):
    torch.manual_seed(0)
    return get_model(model)(make_config(model, **SETTINGS), ml100k[1]._dataset).to(DEVICE)


def loss_and_gradients(net, batch):
    net.zero_grad()
    loss = net.calculate_loss(batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("batch_name", ["ml-100k L=20", "synthetic L=300"])
@pytest.mark.parametrize("model", MODELS)
def test_fused_equals_pytorch_float32(make_config, ml100k, batches, model, batch_name, check_close,
                                      record_property):
    """Train-mode loss, all parameters' gradients, and scores. Every parameter's gradient is also
    compared on its own, within ten times the bound (small gradients carry more relative rounding)."""
    net = build(make_config, ml100k, model).train()
    batch = batches[batch_name].to(DEVICE)
    tolerance = MODEL_TOLERANCE[model]
    fused, reference = with_backend(net, FUSED), with_backend(net, REFERENCE)
    loss, grads = loss_and_gradients(fused, batch)
    expected_loss, expected_grads = loss_and_gradients(reference, batch)
    check_close(loss, expected_loss, tolerance, "loss")
    check_close(grads, expected_grads, tolerance, "all gradients")
    worst = max(((relative_error(p.grad, q.grad), name) for (name, p), q
                 in zip(fused.named_parameters(), reference.parameters())), key=lambda pair: pair[0])
    record_property("worst parameter gradient", f"{worst[1]}: {worst[0]:.3e}")
    assert worst[0] <= 10 * tolerance, f"gradient of {worst[1]}: relative error {worst[0]:.3e}"
    with torch.no_grad():
        check_close(fused.full_sort_predict(batch), reference.full_sort_predict(batch), tolerance, "scores")


@pytest.mark.parametrize("model", MODELS)
def test_bfloat16_autocast(make_config, ml100k, batches, model, check_close):
    """Under autocast the fused path scores close to float32, and an AMP training step has finite
    gradients for every parameter."""
    net = build(make_config, ml100k, model).train()
    batch = batches["synthetic L=300"].to(DEVICE)
    fused = with_backend(net, FUSED)
    with torch.no_grad():
        expected = with_backend(net, REFERENCE).full_sort_predict(batch)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            scores = fused.full_sort_predict(batch)
    check_close(scores.float(), expected, BF16_AUTOCAST, "scores under autocast")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fused.calculate_loss(batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())


@pytest.mark.parametrize("batch_name", ["ml-100k L=20", "synthetic L=300"])
@pytest.mark.parametrize("model", MODELS)
def test_padding_and_batch_invariance_fused(make_config, ml100k, batches, model, batch_name, check_close):
    """Under the fused path a user's representation does not depend on the padding after the
    sequence nor on the other users (Hydra4Rec: its masks hide padding from the backward scan).
    Padding moves the chunk boundaries of Hydra's reversed scan, hence the kernel's tolerance."""
    net = with_backend(build(make_config, ml100k, model), FUSED).eval()
    batch = batches[batch_name].to(DEVICE)
    item_seq, item_seq_len = batch[net.ITEM_SEQ], batch[net.ITEM_SEQ_LEN]
    tolerance = MODEL_TOLERANCE[model]
    with torch.no_grad():
        reference = net.forward(item_seq, item_seq_len)
        for extra in (3, 64):
            check_close(net.forward(F.pad(item_seq, (0, extra)), item_seq_len), reference, tolerance,
                        f"padded with {extra} more")
        for row in (0, 1, len(item_seq) // 2, len(item_seq) - 1):  # alone, without padding
            length = int(item_seq_len[row])
            alone = net.forward(item_seq[row:row + 1, :length], item_seq_len[row:row + 1])
            check_close(alone, reference[row:row + 1], tolerance, f"user {row} alone")
        half = len(item_seq) // 2
        check_close(net.forward(item_seq[half:], item_seq_len[half:]), reference[half:], tolerance,
                    "second half of the batch")


@pytest.mark.parametrize("model", MODELS)
def test_full_sort_predict_under_every_backend(make_config, ml100k, batches, model, check_close):
    """One set of weights: the fused kernels and PyTorch on the GPU, and the CPU's default (compiled
    kernels), score alike; the PyTorch path on the GPU and the CPU within ACROSS_DEVICES."""
    net = build(make_config, ml100k, model).eval()
    batch = batches["synthetic L=300"]
    with torch.no_grad():
        on_gpu = with_backend(net, REFERENCE).full_sort_predict(batch.to(DEVICE))
        fused = with_backend(net, FUSED).full_sort_predict(batch.to(DEVICE))
        on_cpu = with_backend(net, "auto").cpu().full_sort_predict(batch.to("cpu"))
    check_close(fused, on_gpu, MODEL_TOLERANCE[model], "fused vs PyTorch on the GPU")
    check_close(on_cpu, on_gpu.cpu(), ACROSS_DEVICES, "CPU default vs PyTorch on the GPU")
