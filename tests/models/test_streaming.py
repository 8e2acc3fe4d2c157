"""Streaming next-item recommendation with Mamba4Rec and Mamba2Rec on real ml-100k histories: after
every event the streamed representation is forward()'s on the whole history, and states read from
histories in one pass equal stepping through them; Hydra4Rec refuses to stream."""
import importlib

import pytest
import torch

from recbole_ssm.models.base import REPRESENTATION
from tests.streaming_setup import CPU_BACKENDS, STREAMING_MODELS, TOLERANCE, streaming_model

GRID = pytest.mark.parametrize("model,layers,backend,dtype", [
    pytest.param(model, layers, backend, dtype, id=f"{model}-{layers}layer-{backend}-{str(dtype)[6:]}")
    for model in STREAMING_MODELS for layers in (1, 2) for backend in CPU_BACKENDS for dtype in TOLERANCE])


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@GRID
def test_every_streamed_representation_equals_forward(build_model, ml100k_histories, model, layers, backend,
                                                      dtype):
    net = streaming_model(build_model, model, layers, backend, dtype)
    item_seq, item_seq_len = ml100k_histories
    state = net.empty_state(len(item_seq))
    for position in range(item_seq.shape[1]):
        advancing = position < item_seq_len  # users whose history is over stay where they are
        representation, state = net.step(state, item_seq[:, position], mask=advancing)
        lengths = item_seq_len.clamp(max=position + 1)
        history = {net.ITEM_SEQ: item_seq[:, :position + 1], net.ITEM_SEQ_LEN: lengths}
        with torch.no_grad():
            assert_close(representation, net(item_seq[:, :position + 1], lengths), dtype)
            assert_close(net.all_item_scores(representation), net.full_sort_predict(history), dtype)
            if position:  # not vacuous: the history before the new item changes the representation
                alone = net(item_seq[advancing, position:position + 1], torch.ones(int(advancing.sum()),
                                                                                 dtype=torch.long))
                assert (representation[advancing] - alone).abs().amax(1).min() > 1e-3
    assert torch.equal(state[REPRESENTATION], representation)


@GRID
def test_state_from_history_equals_stepping(build_model, ml100k_histories, model, layers, backend, dtype):
    net = streaming_model(build_model, model, layers, backend, dtype)
    item_seq, item_seq_len = ml100k_histories
    stepped = net.empty_state(len(item_seq))
    for position in range(item_seq.shape[1]):
        _, stepped = net.step(stepped, item_seq[:, position], mask=position < item_seq_len)
    from_history = net.state_from_history(item_seq, item_seq_len)
    more_padding = net.state_from_history(torch.nn.functional.pad(item_seq, (0, 9)), item_seq_len)
    empty = net.empty_state(len(item_seq))
    assert from_history.keys() == stepped.keys() == empty.keys() == set(net.state_names())
    for name in empty:
        assert from_history[name].shape == empty[name].shape and from_history[name].dtype == empty[name].dtype
        assert_close(from_history[name], stepped[name], dtype)
        assert_close(more_padding[name], from_history[name], dtype)


@pytest.mark.parametrize("model", STREAMING_MODELS)
def test_only_the_masked_users_advance(build_model, ml100k_histories, model):
    net = streaming_model(build_model, model)
    item_seq, item_seq_len = ml100k_histories
    state = net.state_from_history(item_seq[:, :-1], (item_seq_len - 1).clamp(min=0))
    before = {name: tensor.clone() for name, tensor in state.items()}
    advancing = torch.arange(len(item_seq)) % 3 == 0
    new_items = item_seq.gather(1, (item_seq_len - 1).unsqueeze(1)).squeeze(1)
    new_items[~advancing] = 0  # the others' items are ignored, even RecBole's padding id
    representation, new_state = net.step(state, new_items, mask=advancing)
    _, alone = net.step({name: tensor[advancing] for name, tensor in state.items()}, new_items[advancing])
    for name in state:
        assert torch.equal(state[name], before[name])  # the state given is not modified
        assert torch.equal(new_state[name][~advancing], before[name][~advancing])
        assert_close(new_state[name][advancing], alone[name], torch.float32)
    assert torch.equal(representation, new_state[REPRESENTATION])
    none, unchanged = net.step(state, new_items, mask=torch.zeros_like(advancing))
    assert torch.equal(none, before[REPRESENTATION]) and all(torch.equal(unchanged[n], before[n]) for n in before)


@pytest.mark.parametrize("model", STREAMING_MODELS)
def test_empty_histories_and_sizes(build_model, ml100k_histories, model):
    net = streaming_model(build_model, model)
    item_seq, item_seq_len = ml100k_histories
    empty = net.empty_state(3)
    from_nothing = net.state_from_history(item_seq[:3], torch.zeros(3, dtype=torch.long))
    for name in empty:
        assert torch.equal(from_nothing[name], empty[name]) and not empty[name].any()
    short = net.state_from_history(item_seq[:4, :2], item_seq_len[:4].clamp(max=2))
    assert all(short[name].shape[1:] == empty[name].shape[1:] for name in empty)  # fixed size, any history


@pytest.mark.parametrize("model,module,function", [
    ("Mamba4Rec", "recbole_ssm.ops.selective_scan.fused_recurrent", "selective_scan_fused"),
    ("Mamba2Rec", "recbole_ssm.ops.ssd.fused_recurrent", "ssd_scan_fused"),
])
def test_compiled_kernels_serve_the_step(build_model, record_calls, model, module, function):
    calls = record_calls(importlib.import_module(module), function)
    net = build_model(model, ssm_backend="auto").eval()
    net.step(net.empty_state(2), torch.tensor([1, 2]))
    assert len(calls) == 1 and calls[0][0].shape[0] == 2


def test_training_mode_is_refused(build_model, ml100k_histories):
    net = build_model("Mamba4Rec").train()
    item_seq, item_seq_len = ml100k_histories
    state = net.empty_state(len(item_seq))
    with pytest.raises(RuntimeError, match=r"Mamba4Rec.step\(\) runs in evaluation mode only.*model.eval\(\)"):
        net.step(state, item_seq[:, 0])
    with pytest.raises(RuntimeError, match="evaluation mode only"):
        net.state_from_history(item_seq, item_seq_len)


def test_hydra_refuses_to_stream_and_says_why(build_model, ml100k_histories):
    net = build_model("Hydra4Rec").eval()
    item_seq, item_seq_len = ml100k_histories
    calls = {"empty_state": lambda: net.empty_state(2),
             "state_from_history": lambda: net.state_from_history(item_seq, item_seq_len),
             "step": lambda: net.step({}, item_seq[:, 0])}
    for name, call in calls.items():
        with pytest.raises(NotImplementedError, match=rf"Hydra4Rec.{name}\(\) is not available: Hydra is "
                                                      r"bidirectional.*changes the representation of every"):
            call()


def test_bad_input_is_named(build_model, ml100k_histories):
    net = streaming_model(build_model, "Mamba2Rec")
    item_seq, item_seq_len = ml100k_histories
    state = net.empty_state(len(item_seq))
    with pytest.raises(ValueError, match=r"item ids must be in \[1, \d+\] \(0 is RecBole's padding\); got \[0, 0"):
        net.step(state, torch.zeros(len(item_seq), dtype=torch.long))
    with pytest.raises(ValueError, match=rf"got \[{net.n_items}, "):
        net.step(state, torch.full((len(item_seq),), net.n_items))
    with pytest.raises(ValueError, match=r"missing \['layers.1.conv', 'layers.1.ssm'\]"):
        streaming_model(build_model, "Mamba2Rec", layers=2).step(state, item_seq[:, 0])
    with pytest.raises(ValueError, match="batch sizes"):
        net.step(state, item_seq[:3, 0])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        net.step(state, item_seq[:, 0], mask=torch.ones(len(item_seq)))
    with pytest.raises(ValueError, match=r"item_seq_len must be .* values in \[0, 5\]"):
        net.state_from_history(item_seq[:, :5], item_seq_len)
