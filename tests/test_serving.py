"""The state store on real ml-100k histories: after every event its scores are full_sort_predict's on
the whole history (also across a save and restore, with only some users advancing, with one user's
events in one batch); files are atomic and load safely; memory per user is what the states hold."""
import math

import pytest
import torch

from recbole_ssm import serving
from recbole_ssm.serving import StateStore
from tests.streaming_setup import CPU_BACKENDS, STREAMING_MODELS, TOLERANCE, streaming_model

GRID = pytest.mark.parametrize("model,layers,backend", [
    pytest.param(model, layers, backend, id=f"{model}-{layers}layer-{backend}")
    for model in STREAMING_MODELS for layers in (1, 2) for backend in CPU_BACKENDS])


def item_tokens(ml100k):
    dataset = ml100k[0]
    return dataset.field2id_token[dataset.iid_field]


def expected_scores(net, item_seq, item_seq_len):
    """full_sort_predict on the histories, with RecBole's evaluation's -inf for the padding id."""
    with torch.no_grad():
        scores = net.full_sort_predict({net.ITEM_SEQ: item_seq, net.ITEM_SEQ_LEN: item_seq_len})
    scores[:, 0] = float("-inf")
    return scores


def assert_scores(actual, expected, dtype=torch.float32):
    torch.testing.assert_close(actual, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@GRID
def test_scores_after_every_event_and_across_save_and_restore(build_model, ml100k, ml100k_histories, tmp_path,
                                                              model, layers, backend, dtype):
    net = streaming_model(build_model, model, layers, backend, dtype)
    tokens = item_tokens(ml100k)
    item_seq, item_seq_len = ml100k_histories
    users = [f"user-{row}" for row in range(len(item_seq))]
    store = StateStore(net, tokens, capacity=2)  # grows as users arrive
    for position in range(item_seq.shape[1]):
        if position == item_seq.shape[1] // 2:
            store.save(tmp_path / "states.pt")
            store = StateStore.load(tmp_path / "states.pt", net)
        rows = (position < item_seq_len).nonzero().squeeze(1).tolist()  # only these users advance
        store.observe([users[row] for row in rows], [tokens[item] for item in item_seq[rows, position]])
        lengths = item_seq_len.clamp(max=position + 1)
        assert_scores(store.scores(users), expected_scores(net, item_seq[:, :position + 1], lengths), dtype)
    assert store.event_counts(users).tolist() == item_seq_len.tolist()
    assert store.users == users


@pytest.mark.parametrize("model", STREAMING_MODELS)
def test_one_batch_of_interleaved_events_and_their_ranks(build_model, ml100k, ml100k_histories, model):
    net = streaming_model(build_model, model)
    tokens = item_tokens(ml100k)
    item_seq, item_seq_len = (t[-4:] for t in ml100k_histories)  # 4 users, 17 to 20 items each
    events = [(row, position) for position in range(item_seq.shape[1]) for row in range(4)
              if position < item_seq_len[row]]
    store = StateStore(net, tokens)
    ranks = store.observe([f"u{row}" for row, _ in events], [tokens[item_seq[row, position]] for row, position in events],
                          return_ranks=True)
    for (row, position), rank in zip(events, ranks.tolist()):
        if position == 0:
            assert rank == 0  # no history, no prediction
            continue
        scores = expected_scores(net, item_seq[row:row + 1, :position], torch.tensor([position]))[0]
        assert rank == 1 + int((scores > scores[item_seq[row, position]]).sum())
    assert_scores(store.scores([f"u{row}" for row in range(4)]), expected_scores(net, item_seq, item_seq_len))


@pytest.mark.parametrize("model", STREAMING_MODELS)
def test_set_histories_and_recommend(build_model, ml100k, ml100k_histories, model):
    net = streaming_model(build_model, model)
    tokens = item_tokens(ml100k)
    item_seq, item_seq_len = ml100k_histories
    users = [f"user-{row}" for row in range(len(item_seq))]
    histories = [[tokens[item] for item in item_seq[row, :length]] for row, length in enumerate(item_seq_len)]
    store = StateStore(net, tokens)
    store.set_histories(users, histories)
    expected = expected_scores(net, item_seq, item_seq_len)
    assert_scores(store.scores(users), expected)
    top = store.recommend(users, k=7)
    assert top == [[tokens[item] for item in row] for row in expected.topk(7).indices.tolist()]
    unseen = store.recommend(users, k=7, exclude_seen=True)
    for row, history in enumerate(histories):
        assert not set(unseen[row]) & set(history)
        masked = expected[row].clone()
        masked[item_seq[row, :item_seq_len[row]]] = float("-inf")
        assert unseen[row] == [tokens[item] for item in masked.topk(7).indices.tolist()]


def test_users_without_history(build_model, ml100k):
    net = streaming_model(build_model, "Mamba4Rec")
    tokens = item_tokens(ml100k)
    store = StateStore(net, tokens)
    store.observe(["new"], [tokens[5]])  # a user not known yet starts empty
    assert_scores(store.scores(["new"]), expected_scores(net, torch.tensor([[5]]), torch.tensor([1])))
    store.set_histories(["cleared"], [[]])
    assert "cleared" in store and store.event_counts(["cleared", "never"]).tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"no history to recommend from for 2 user\(s\): \['never', 'cleared'\]"):
        store.recommend(["new", "never", "cleared"])


def test_bad_input_is_named(build_model, ml100k):
    net = streaming_model(build_model, "Mamba2Rec")
    tokens = item_tokens(ml100k)
    with pytest.raises(ValueError, match="1682 item tokens for a model of 1683 item ids"):
        StateStore(net, tokens[:-1])
    store = StateStore(net, tokens, remember_seen=False)
    with pytest.raises(ValueError, match=r"2 item token\(s\) not in the model's items: \['no-such-item', '\[PAD\]'\]"):
        store.observe(["a", "b", "c"], [tokens[1], "no-such-item", "[PAD]"])
    assert len(store) == 0  # nothing observed from a rejected batch
    with pytest.raises(ValueError, match="2 users but 1 items"):
        store.observe(["a", "b"], [tokens[1]])
    store.observe(["a"], [tokens[1]])
    with pytest.raises(ValueError, match="exclude_seen needs a store made with remember_seen=True"):
        store.recommend(["a"], exclude_seen=True)
    with pytest.raises(ValueError, match="k must be at least 1"):
        store.recommend(["a"], k=0)


class Payload:
    """Stands for code in a file: loading it would need unpickling a class."""


def test_files_are_atomic_and_load_safely(build_model, ml100k, tmp_path, monkeypatch):
    net = streaming_model(build_model, "Mamba4Rec")
    tokens = item_tokens(ml100k)
    store = StateStore(net, tokens)
    store.observe(["a", "b"], [tokens[1], tokens[2]])
    path = store.save(tmp_path / "states.pt")
    saved = path.read_bytes()

    def failing_save(obj, file):
        file.write(b"half a file")
        raise OSError("disk full")

    store.observe(["a"], [tokens[3]])
    monkeypatch.setattr(serving.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        store.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == ["states.pt"]
    assert StateStore.load(path, net).event_counts(["a", "b"]).tolist() == [1, 1]

    torch.save({"format": serving.FILE_FORMAT, "payload": Payload()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="not a state store file that loads safely.*Unpickl"):
        StateStore.load(tmp_path / "code.pt", net)
    torch.save({"states": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a recbole-ssm state store file"):
        StateStore.load(tmp_path / "other.pt", net)
    other = streaming_model(build_model, "Mamba4Rec", dtype=torch.float32)
    with torch.no_grad():
        other.item_embedding.weight[1, 0] += 1
    with pytest.raises(ValueError, match="states of a Mamba4Rec with other weights than this Mamba4Rec"):
        StateStore.load(path, other)
    with pytest.raises(FileNotFoundError):
        StateStore.load(tmp_path / "missing.pt", net)


@pytest.mark.parametrize("model,layers", [("Mamba4Rec", 1), ("Mamba4Rec", 2), ("Mamba2Rec", 1), ("Mamba2Rec", 2)])
def test_memory_per_user(build_model, make_config, ml100k, model, layers):
    net = streaming_model(build_model, model, layers)
    config = make_config(model)
    d_inner = config["expand"] * config["hidden_size"]
    conv_channels = d_inner if model == "Mamba4Rec" else d_inner + 2 * config["ngroups"] * config["d_state"]
    per_layer = conv_channels * (config["d_conv"] - 1) + d_inner * config["d_state"]  # SSM: d_inner x d_state
    state_bytes = 4 * (layers * per_layer + config["hidden_size"])                  # float32
    store = StateStore(net, item_tokens(ml100k))
    seen_bytes = math.ceil(net.n_items / 8)
    assert store.memory_per_user() == {"state": state_bytes, "seen_items": seen_bytes, "event_count": 8,
                                       "total": state_bytes + seen_bytes + 8}
    assert StateStore(net, item_tokens(ml100k), remember_seen=False).memory_per_user()["seen_items"] == 0
