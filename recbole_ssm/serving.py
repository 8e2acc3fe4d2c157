"""Streaming next-item recommendation for many users: :class:`StateStore`.

The store keeps every user's streaming state (see :class:`recbole_ssm.models.base.SSMSequentialRecommender`:
a fixed-size state per user, whatever the history's length) in preallocated tensors, one row per user,
keyed by RecBole's external user tokens; items go in and out as external item tokens. It uses only
the model's streaming API (``empty_state``, ``state_from_history``, ``step``, ``all_item_scores``) and
knows nothing of training::

    model.eval()
    store = StateStore(model, dataset.field2id_token[dataset.iid_field])
    store.observe(["196", "186"], ["242", "302"])      # one event per user; new users start empty
    store.recommend(["196"], k=10, exclude_seen=True)  # -> [["...", ...]]
    store.save("states.pt"); store = StateStore.load("states.pt", model)
"""
import hashlib
import os
import tempfile
from pathlib import Path

import torch

from recbole_ssm.models.base import REPRESENTATION

FILE_FORMAT = "recbole-ssm state store"
FILE_VERSION = 1


class StateStore:
    """States of many users for one causal model (Mamba4Rec, Mamba2Rec) in evaluation mode.

    item_tokens: the external token of every item id, id 0 being RecBole's padding (a RecBole dataset's
    ``field2id_token[iid_field]``); capacity: users to allocate room for (the store grows by doubling);
    remember_seen: keep each user's seen items (one bit per item) for ``exclude_seen``.
    """

    def __init__(self, model, item_tokens, capacity=1024, remember_seen=True):
        self.model = model
        self.item_tokens = _tokens(item_tokens)
        if len(self.item_tokens) != model.n_items:
            raise ValueError(f"{len(self.item_tokens)} item tokens for a model of {model.n_items} item ids "
                             "(RecBole's padding id 0 included): not this model's dataset")
        self._item_ids = {token: index for index, token in enumerate(self.item_tokens) if index > 0}
        self._slots = {}      # user token -> row
        self._users = []      # row -> user token
        self._state = model.empty_state(max(1, capacity))
        device = self._state[REPRESENTATION].device
        self._events = torch.zeros(max(1, capacity), dtype=torch.long, device=device)
        self._seen = (torch.zeros(max(1, capacity), _bytes_for_bits(model.n_items), dtype=torch.uint8, device=device)
                      if remember_seen else None)
        self._bit_values = 2 ** torch.arange(8, dtype=torch.uint8, device=device)

    @classmethod
    def for_dataset(cls, model, dataset, **options):
        """A store for a model trained on a RecBole ``dataset`` (its item tokens)."""
        return cls(model, dataset.field2id_token[dataset.iid_field], **options)

    # ----------------------------------------------------------------------------------- queries

    def __len__(self):
        return len(self._users)

    def __contains__(self, user):
        return str(user) in self._slots

    @property
    def users(self):
        """The user tokens, in the order they arrived."""
        return list(self._users)

    @property
    def remembers_seen(self):
        return self._seen is not None

    def event_counts(self, users):
        """Items observed per user (0 for users not in the store): (len(users),) int64."""
        counts = self._events.tolist()
        return torch.tensor([counts[self._slots[user]] if user in self._slots else 0 for user in _tokens(users)],
                            dtype=torch.long)

    def memory_per_user(self):
        """Bytes held per user: ``state`` (the model's state), ``seen_items`` (the bit set, 0 without
        it), ``event_count``, and their ``total``; the token -> row dictionary is not counted."""
        state = sum(t[0].numel() * t.element_size() for t in self._state.values())
        seen = 0 if self._seen is None else self._seen.shape[1]
        count = self._events.element_size()
        return {"state": state, "seen_items": seen, "event_count": count, "total": state + seen + count}

    def scores(self, users, exclude_seen=False):
        """Scores of every item id for each user, as ``full_sort_predict`` on the user's history:
        (len(users), n_items), -inf for the padding id 0 (and the user's seen items with
        ``exclude_seen``). Every user must have observed at least one item."""
        rows = self._rows_with_history(users)
        return self._scores(rows, self._state[REPRESENTATION].index_select(0, rows), exclude_seen)

    def recommend(self, users, k=10, exclude_seen=False):
        """The top ``k`` item tokens for each user, best first (fewer where fewer items are left)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        scores = self.scores(users, exclude_seen)
        top_scores, top_items = scores.topk(min(k, scores.shape[1]), dim=1)
        return [[self.item_tokens[item] for item, score in zip(items, row_scores) if score > float("-inf")]
                for items, row_scores in zip(top_items.tolist(), top_scores.tolist())]

    # ----------------------------------------------------------------------------------- updates

    def observe(self, users, items, return_ranks=False, exclude_seen=False):
        """Append one item per event: ``users`` and ``items`` are equally long sequences of tokens, in
        the order the events happened (a user may occur several times). Users not in the store start
        with no history.

        With ``return_ranks``, returns (len(users),) int64: for each event, the rank that the user's
        state just before it gave to its item among all items (1 = top; with ``exclude_seen``, among
        the items the user had not seen), or 0 where the user had no history yet.
        """
        users = _tokens(users)
        item_ids = self._item_ids_of(items)
        if len(item_ids) != len(users):
            raise ValueError(f"observe: {len(users)} users but {len(item_ids)} items; one item per event")
        rows = torch.tensor([self._row(user, create=True) for user in users], dtype=torch.long)
        ranks = torch.zeros(len(users), dtype=torch.long) if return_ranks else None
        device = self._events.device
        for positions in _rounds(rows.tolist()):
            round_rows = rows[positions].to(device)
            round_items = item_ids[positions].to(device)
            state = {name: t.index_select(0, round_rows) for name, t in self._state.items()}
            if return_ranks:
                ranks[positions] = self._ranks(round_rows, state[REPRESENTATION], round_items, exclude_seen).cpu()
            _, state = self.model.step(state, round_items)
            for name, t in self._state.items():
                t.index_copy_(0, round_rows, state[name])
            self._events.index_add_(0, round_rows, torch.ones_like(round_rows))
            if self._seen is not None:
                columns = round_items // 8
                self._seen[round_rows, columns] |= self._bit_values[round_items % 8]
        return ranks

    def set_histories(self, users, histories):
        """Replace the users' states by those after ``histories`` (one sequence of item tokens per user,
        oldest first), computed in one pass; users not in the store are added."""
        users = _tokens(users)
        histories = [self._item_ids_of(history) for history in histories]
        if len(histories) != len(users) or len(set(users)) != len(users):
            raise ValueError(f"set_histories: {len(users)} users (each once) need as many histories, "
                             f"got {len(histories)} histories for {len(set(users))} distinct users")
        device = self._events.device
        lengths = torch.tensor([len(history) for history in histories], dtype=torch.long)
        item_seq = torch.zeros(len(users), int(lengths.max()) if len(users) else 0, dtype=torch.long)
        for row, history in enumerate(histories):
            item_seq[row, :len(history)] = history
        rows = torch.tensor([self._row(user, create=True) for user in users], dtype=torch.long, device=device)
        state = self.model.state_from_history(item_seq.to(device), lengths.to(device))
        for name, t in self._state.items():
            t.index_copy_(0, rows, state[name])
        self._events.index_copy_(0, rows, lengths.to(device))
        if self._seen is not None:
            seen = torch.zeros(len(users), self.model.n_items, dtype=torch.bool)
            seen.scatter_(1, item_seq, True)
            seen[:, 0] = False
            self._seen.index_copy_(0, rows, _pack_bits(seen, self._seen.shape[1]).to(device))

    # ----------------------------------------------------------------------------------- files

    def save(self, path):
        """Write all users' states to ``path`` atomically (a temporary file in the same folder, then a
        rename): tensors, tokens and numbers only, read back with ``torch.load(weights_only=True)``."""
        path = Path(path)
        count = len(self._users)
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model": type(self.model).__name__,
            "model_fingerprint": model_fingerprint(self.model),
            "item_tokens": self.item_tokens,
            "users": self._users,
            "state": {name: t[:count].cpu() for name, t in self._state.items()},
            "event_counts": self._events[:count].cpu(),
            "seen": None if self._seen is None else self._seen[:count].cpu(),
        }
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(payload, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        return path

    @classmethod
    def load(cls, path, model, capacity=None):
        """The store saved at ``path``, for ``model`` (the same weights it was saved with)."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:  # missing or unreadable: as it is
            raise
        except Exception as error:  # pickle.UnpicklingError for anything but tensors and plain data
            raise ValueError(f"{path} is not a state store file that loads safely ({type(error).__name__}: "
                             f"{error})") from error
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a recbole-ssm state store file")
        if payload.get("version") != FILE_VERSION:
            raise ValueError(f"{path}: state store file version {payload.get('version')}, this recbole-ssm "
                             f"reads version {FILE_VERSION}")
        if payload["model"] != type(model).__name__ or payload["model_fingerprint"] != model_fingerprint(model):
            raise ValueError(f"{path} holds states of a {payload['model']} with other weights than this "
                             f"{type(model).__name__}: states are only valid for the weights that made them")
        users = payload["users"]
        store = cls(model, payload["item_tokens"], capacity=max(capacity or 0, len(users)),
                    remember_seen=payload["seen"] is not None)
        if set(payload["state"]) != set(store._state):
            raise ValueError(f"{path}: its state entries {sorted(payload['state'])} are not this model's "
                             f"{sorted(store._state)}")
        store._users = list(users)
        store._slots = {user: row for row, user in enumerate(users)}
        for name, t in store._state.items():
            t[:len(users)] = payload["state"][name]
        store._events[:len(users)] = payload["event_counts"]
        if store._seen is not None:
            store._seen[:len(users)] = payload["seen"]
        return store

    # ----------------------------------------------------------------------------------- internals

    def _row(self, user, create=False):
        row = self._slots.get(user)
        if row is None:
            if not create:
                raise KeyError(user)
            row = len(self._users)
            if row == len(self._events):
                self._grow(2 * row)
            self._slots[user] = row
            self._users.append(user)
        return row

    def _grow(self, capacity):
        """Room for ``capacity`` users: new tensors, the rows so far copied, the rest empty."""
        used = len(self._users)
        grown = self.model.empty_state(capacity)
        for name, t in grown.items():
            t[:used] = self._state[name][:used]
        self._state = grown
        self._events = torch.cat([self._events, self._events.new_zeros(capacity - len(self._events))])
        if self._seen is not None:
            self._seen = torch.cat([self._seen, self._seen.new_zeros(capacity - len(self._seen), self._seen.shape[1])])

    def _rows_with_history(self, users):
        users = _tokens(users)
        unknown = [user for user in users if user not in self._slots]
        rows = torch.tensor([self._slots[user] for user in users if user in self._slots], dtype=torch.long,
                            device=self._events.device)
        empty = [self._users[row] for row in rows[self._events[rows] == 0].tolist()]
        if unknown or empty:
            raise ValueError(f"no history to recommend from for {len(unknown) + len(empty)} user(s): "
                             f"{(unknown + empty)[:5]}; observe at least one of their items first")
        return rows

    @torch.no_grad()
    def _scores(self, rows, representation, exclude_seen):
        scores = self.model.all_item_scores(representation)          # (b, n_items)
        scores[:, 0] = float("-inf")
        if exclude_seen:
            if self._seen is None:
                raise ValueError("exclude_seen needs a store made with remember_seen=True")
            scores.masked_fill_(_unpack_bits(self._seen.index_select(0, rows), self._bit_values,
                                             scores.shape[1]), float("-inf"))
        return scores

    def _ranks(self, rows, representation, items, exclude_seen):
        scores = self._scores(rows, representation, exclude_seen)
        target = scores.gather(1, items.unsqueeze(1))
        ranks = 1 + (scores > target).sum(1)
        return ranks.masked_fill(self._events.index_select(0, rows) == 0, 0)

    def _item_ids_of(self, items):
        items = _tokens(items)
        unknown = [item for item in items if item not in self._item_ids]
        if unknown:
            raise ValueError(f"{len(unknown)} item token(s) not in the model's items: {unknown[:5]}")
        return torch.tensor([self._item_ids[item] for item in items], dtype=torch.long)


def _tokens(values):
    """RecBole's external tokens are strings: user and item tokens given as numbers become theirs."""
    return [str(value) for value in values]


def model_fingerprint(model):
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _rounds(rows):
    """Positions of ``rows`` in rounds that hold each row at most once, keeping each row's order:
    round r has every row's (r + 1)-th occurrence."""
    occurrence, rounds = {}, []
    for position, row in enumerate(rows):
        index = occurrence.get(row, 0)
        occurrence[row] = index + 1
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(position)
    return [torch.tensor(positions, dtype=torch.long) for positions in rounds]


def _bytes_for_bits(count):
    return (count + 7) // 8


def _pack_bits(flags, width):
    """(b, n) bool -> (b, width) uint8, bit i % 8 of byte i // 8 set for flag i."""
    padded = torch.zeros(flags.shape[0], width * 8, dtype=torch.uint8)
    padded[:, :flags.shape[1]] = flags
    return (padded.view(flags.shape[0], width, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed, bit_values, count):
    """(b, width) uint8 -> (b, count) bool, the inverse of :func:`_pack_bits`."""
    return (packed.unsqueeze(-1) & bit_values).ne(0).flatten(1)[:, :count]
