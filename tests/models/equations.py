"""Plain-tensor building blocks for the reference transcriptions in the model tests: each test
writes its model's equations with these, reading the weights of the modules it is given. Also the
transcriptions of the two RecBole baselines (SASRec, GRU4Rec), and the recording and replay of the
model's dropout masks, so that a transcription can be checked in training mode."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


def ln(mod, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with ``mod``'s weight and bias, eps 1e-12 as in every released model here."""
    return F.layer_norm(x, x.shape[-1:], mod.weight, mod.bias, 1e-12)


def lin(mod, x: torch.Tensor) -> torch.Tensor:
    return x @ mod.weight.T + mod.bias


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = torch.exp(x - x.max(dim=dim, keepdim=True).values)
    return e / e.sum(dim=dim, keepdim=True)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU as RecBole writes it (``x * 0.5 * (1 + erf(x / sqrt 2))``)."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _keep(x: torch.Tensor) -> torch.Tensor:
    return x


# --- dropout masks, recorded from the model and replayed in a transcription ----------------------

@contextlib.contextmanager
def recorded_dropout() -> Iterator[list[tuple[torch.Tensor, float]]]:
    """Record every mask the project's dropout (``mlsa4rec.layers.dropout.dropout``, which every
    ``Dropout`` module and the Transformer's attention dropout call) draws while the block runs:
    a list of (keep mask, p) in call order. The model's own dropout still draws its mask; the
    recorder draws it again from the same random state and checks that it reproduces the output
    bit for bit, so a replayed mask is exactly the one the model used."""
    from mlsa4rec.layers import dropout as dropout_module

    original = dropout_module.dropout
    masks: list[tuple[torch.Tensor, float]] = []

    def recording(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        if not training or p == 0.0:
            return original(x, p, training)
        before = torch.get_rng_state()
        out = original(x, p, training)
        after = torch.get_rng_state()
        torch.set_rng_state(before)
        keep = torch.rand_like(x) >= p
        torch.set_rng_state(after)
        assert torch.equal(out, x * keep * (1.0 / (1.0 - p))), "the recorded mask is not the one dropout used"
        masks.append((keep, p))
        return out

    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("mlsa4rec") and getattr(m, "dropout", None) is original]
    for module in patched:
        module.dropout = recording
    try:
        yield masks
    finally:
        for module in patched:
            module.dropout = original


class Replay:
    """``drop(x)`` for a transcription: the next recorded mask applied as the model's dropout
    applies it, ``x * keep * (1 / (1 - p))``, strictly in the order the model drew them.

    A transcription that loops over attention heads passes one head at a time: a mask of the
    model's B x H x ... attention weights is then taken head by head (H calls, in head order).
    ``row(b)`` replays the masks of batch row ``b`` alone, for a transcription that runs one
    row at a time. ``expect(p)`` is ``drop`` that also checks the mask was drawn with rate ``p``
    (a dropout whose rate is not the setting it should read fails). ``exhausted``: every mask
    was used (a model with an extra dropout leaves one over; one with a missing dropout runs out)."""

    def __init__(self, masks: list[tuple[torch.Tensor, float]], index: tuple[int, ...] = ()) -> None:
        self.masks = masks
        self.index = index
        self.position = 0
        self.head = 0
        self.rows: list[Replay] = []

    def __call__(self, x: torch.Tensor, p: float | None = None) -> torch.Tensor:
        assert self.position < len(self.masks), "the transcription drops more often than the model did"
        keep, rate = self.masks[self.position]
        if p is not None:
            assert rate == p, f"mask {self.position} was drawn with p={rate}, the transcription expects p={p}"
        keep = keep[self.index] if self.index else keep
        if keep.shape == x.shape:
            self.position += 1
        else:
            heads = 1 - len(self.index)  # the head dimension follows the batch dimension
            assert keep.shape[:heads] + keep.shape[heads + 1:] == x.shape, \
                f"mask {self.position} has shape {tuple(keep.shape)}, the transcription drops {tuple(x.shape)}"
            n_heads = keep.shape[heads]
            keep = keep.select(heads, self.head)
            self.head += 1
            if self.head == n_heads:
                self.head, self.position = 0, self.position + 1
        return x * keep * (1.0 / (1.0 - rate))

    def expect(self, p: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: self(x, p)

    def row(self, b: int) -> Replay:
        self.rows.append(Replay(self.masks, (b,)))
        return self.rows[-1]

    @property
    def exhausted(self) -> bool:
        if self.rows:  # replayed row by row: every row used every mask
            return all(r.exhausted for r in self.rows)
        return self.position == len(self.masks) and self.head == 0


# --- SASRec and GRU4Rec as RecBole 1.2.1 writes them ------------------------------------------

def sasrec(m, seq: torch.Tensor, drop=_keep, drop_attn=None) -> torch.Tensor:
    """RecBole 1.2.1's SASRec.forward before its gather, B x L x D, one head at a time
    (recbole/model/sequential_recommender/sasrec.py and recbole/model/layers.py):

        E = Drop(LN(ItemEmb(s) + PosEmb(0..L-1)))
        per layer (TransformerLayer = MultiHeadAttention, then FeedForward):
            P_h = Drop_attn(softmax(Q_h K_h^T / sqrt(d_h) + M))      M = 0 where the key is an item
                                                                      at or before the query, -10000 else
            A   = LN(Drop(Dense(concat_h P_h V_h)) + H)
            H   = LN(Drop(W2 gelu(W1 A)) + A)
        user = H[len - 1]

    ``drop`` stands for the hidden dropouts, ``drop_attn`` (default: ``drop``) for the attention's.
    RecBole masks padded keys and we do not; with right padding the two agree at every real
    position (a padded key comes after every real query), which is all that is read."""
    drop_attn = drop if drop_attn is None else drop_attn
    width = seq.shape[1]
    allowed = (seq > 0)[:, None, :] & torch.ones(width, width, dtype=torch.bool).tril()   # B x query x key
    additive = torch.where(allowed, 0.0, -10000.0)

    def head(att, q, k, v):
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]) + additive.to(q.dtype)
        return drop_attn(softmax(scores, dim=-1)) @ v

    return sasrec_blocks(m, seq, drop, head)


def sasrec_blocks(m, seq: torch.Tensor, drop, head) -> torch.Tensor:
    """SASRec's embedding and layer stack, B x L x D, around one head's attention
    ``head(attention_module, Q_h, K_h, V_h) -> context_h`` (B x L x d_h): the block LinRec and
    Performer keep, with their own attention in it.

        E = Drop(LN(ItemEmb(s) + PosEmb(0..L-1)))
        per layer:  A = LN(Drop(Dense(concat_h head(Q_h, K_h, V_h))) + H);  H = LN(Drop(W2 gelu(W1 A)) + A)"""
    x = drop(ln(m.layer_norm, m.item_embedding.weight[seq] + m.position_embedding.weight[:seq.shape[1]]))
    for layer in m.layers:
        att = layer.attention
        d = x.shape[-1] // att.n_heads
        q, k, v = lin(att.query, x), lin(att.key, x), lin(att.value, x)
        context = torch.cat([head(att, q[..., c], k[..., c], v[..., c])
                             for c in (slice(h * d, (h + 1) * d) for h in range(att.n_heads))], dim=-1)
        a = ln(att.layer_norm, drop(lin(att.dense, context)) + x)
        ff = layer.feed_forward
        x = ln(ff.layer_norm, drop(lin(ff.dense_2, gelu(lin(ff.dense_1, a)))) + a)
    return x


def gather_last(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """RecBole's gather_indexes(output, item_seq_len - 1), as a loop."""
    return torch.stack([h[b, int(n) - 1] for b, n in enumerate(lengths)])


def gru4rec(m, seq: torch.Tensor, drop=_keep) -> torch.Tensor:
    """RecBole 1.2.1's GRU4Rec.forward before its gather, B x L x D: Dense(GRU(Drop(Emb(s)))),
    the GRU written out (PyTorch's equations, no biases, as RecBole builds it), layer by layer."""
    gru = m.gru_layers
    n = gru.hidden_size
    x = drop(m.item_embedding.weight[seq])
    for layer in range(gru.num_layers):
        w_ih, w_hh = getattr(gru, f"weight_ih_l{layer}"), getattr(gru, f"weight_hh_l{layer}")
        h = x.new_zeros(seq.shape[0], n)
        outs = []
        for t in range(seq.shape[1]):
            xt = x[:, t]
            r = torch.sigmoid(xt @ w_ih[:n].T + h @ w_hh[:n].T)
            z = torch.sigmoid(xt @ w_ih[n:2 * n].T + h @ w_hh[n:2 * n].T)
            cand = torch.tanh(xt @ w_ih[2 * n:].T + r * (h @ w_hh[2 * n:].T))
            h = (1 - z) * cand + z * h
            outs.append(h)
        x = torch.stack(outs, 1)
    return lin(m.dense, x)
