"""MLSA4Rec (Su & Huang, arXiv 2407.13135): Mamba combined with low-rank decomposed self-attention.

    H0 = LN0(Drop(Emb(s)))                                      no positional embedding
    Mamba-LSA interaction layer (num_interaction_layers, 1 in the paper):
        M = LN1(Drop(Mamba(H0)) + H0)                           structural bias from Mamba
        A = LSA(M)                                              item-to-interest attention over M
        G = LN2(GELU(W1 A) * M)                                 the LSA output gates the Mamba branch
        O = LN3(Drop(GELU(W2 [A ; G])) + GELU(W3 H0))           fusion MLP plus an MLP skip
    Mamba normalization layers (num_layers):  O = LN(Drop(Mamba(O)) + O)
    h = O[len - 1];  scores = h . Emb^T;  full-softmax cross-entropy

``variant`` says how the LSA treats padding and the future (``layers/lsa.py``):

* ``faithful`` - the authors' code exactly: no mask, so the padding after a sequence takes part in
  both softmaxes of the LSA and the output depends on how much of it there is. Trains on
  prefix samples right-padded to L, as released.
* ``masked`` - padding is left out of the LSA's softmaxes. Outputs at real positions no longer
  depend on the padding, so batches are length-bucketed and trimmed: on Amazon data (mean
  length ~9, L=50) most of the faithful model's compute is padding.
* ``causal`` - the LSA at t sees only positions <= t (running pooling, attention over the
  interests), which makes the whole model causal: it trains on all positions of a sequence in one
  pass, and ``step`` serves a user by updating a constant-size state per event. Linear in L.

The other settings (``MLSA4RecConfig``, in ``mlsa4rec_config.py``) are the ones the paper never
varied and the ablations, which the packaged presets ``mlsa4rec-ablation-*`` name.

The released code also builds modules it never calls (a spare Mamba block, LightSANs' position
branch, an output projection, a feed-forward block); they are left out, and
``mlsa4rec.convert.from_recbole`` drops their weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map_only

from mlsa4rec.layers import Dropout, Mamba, MambaResidual, MambaState
from mlsa4rec.layers.absent import NoLSA, NoMamba, Ungated
from mlsa4rec.layers.lsa import LowRankSelfAttention, LSAState
from mlsa4rec.models.base import SequentialRecommender, gather_last
from mlsa4rec.models.mlsa4rec_config import MLSA4RecConfig
from mlsa4rec.models.registry import register

GATES = {"gelu": F.gelu, "sigmoid": torch.sigmoid}


class InteractionState(NamedTuple):
    mamba: MambaState | tuple   # () where an ablation drops the block: a state's leaves are all tensors
    lsa: LSAState | tuple


class Gate(nn.Linear):
    """W1 with its activation: (A, M) -> act(W1 A) * M, the LSA modulating the Mamba branch."""

    def __init__(self, d_model: int, act: str) -> None:
        super().__init__(d_model, d_model)
        self.act = GATES[act]

    def forward(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.act(super().forward(a)) * m


def _reads_m(h0: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return m


def _reads_h0(h0: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return h0


class MambaLSAInteraction(nn.Module):
    """One Mamba-LSA interaction layer: H0 (B x L x D) -> O (B x L x D).

    Paper symbols in code: W1 = ``gate``, W2 = ``fuse``, W3 = ``skip``, P = ``k_interests``,
    Theta = ``lsa.attpooling_key.theta`` / ``lsa.attpooling_value.theta``. The ablations are
    settled here, when the layer is built (``NoMamba``, ``NoLSA``, ``Ungated``, identity norms, which
    input the LSA reads), so ``forward`` and ``step`` are the paper's equations without a branch.
    """

    def __init__(self, c: MLSA4RecConfig) -> None:
        super().__init__()
        d, eps = c.hidden_size, c.layer_norm_eps
        gated = c.use_lsa and c.gate_act != "none"
        self.dropout = Dropout(c.dropout_prob)
        # a dropout of its own for Mamba's output: without the block it is off, so M = H0 exactly
        # and the random stream of the other dropouts is the one the layer had before
        self.mamba_dropout = Dropout(c.dropout_prob if c.interaction_mamba else 0.0)
        self.mamba = Mamba(d, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand) if c.interaction_mamba \
            else NoMamba()
        self.LayerNorm1 = nn.LayerNorm(d, eps=eps) if c.interaction_mamba else nn.Identity()
        self.lsa_reads = _reads_m if c.lsa_input == "mamba" else _reads_h0
        self.lsa = LowRankSelfAttention(d, c.n_heads, c.k_interests, c.attn_dropout_prob, c.dropout_prob, c.variant,
                                        c.softmax, eps) if c.use_lsa else NoLSA()
        self.gate = Gate(d, c.gate_act) if gated else Ungated()
        self.LayerNorm2 = nn.LayerNorm(d, eps=eps) if gated else nn.Identity()
        self.fuse = nn.Linear(2 * d if c.use_lsa else d, d)
        self.skip = nn.Linear(d, d)
        self.LayerNorm3 = nn.LayerNorm(d, eps=eps)

    def forward(self, h0: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        m = self.LayerNorm1(self.mamba_dropout(self.mamba(h0)) + h0)     # M = LN1(Drop(Mamba(H0)) + H0): B x L x D
        a = self.lsa(self.lsa_reads(h0, m), lengths)                      # A = LSA(M): B x L x D
        g = self.LayerNorm2(self.gate(a, m))                              # G = LN2(GELU(W1 A) * M): B x L x D
        return self.fusion(a, g, h0)                                      # O: B x L x D

    def step(self, h0_t: torch.Tensor, state: InteractionState) -> tuple[torch.Tensor, InteractionState]:
        """The same four equations at one position (B x D), carrying the Mamba and LSA states."""
        y, mamba_state = self.mamba.step(h0_t, state.mamba)
        m = self.LayerNorm1(self.mamba_dropout(y) + h0_t)
        a, lsa_state = self.lsa.step(self.lsa_reads(h0_t, m), state.lsa)
        g = self.LayerNorm2(self.gate(a, m))
        return self.fusion(a, g, h0_t), InteractionState(mamba_state, lsa_state)

    def fusion(self, a: torch.Tensor, g: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """O = LN3(Drop(GELU(W2 [A ; G])) + GELU(W3 H0)): the fusion MLP plus an MLP skip."""
        return self.LayerNorm3(self.dropout(F.gelu(self.fuse(torch.cat([a, g], dim=-1)))) + F.gelu(self.skip(h0)))

    def initial_state(self, batch: int) -> InteractionState:
        return InteractionState(self.mamba.initial_state(batch), self.lsa.initial_state(batch))


@register("mlsa4rec")
class MLSA4Rec(SequentialRecommender):
    forward_traces = False  # the grouped forward below; export reads encode at the last position
    config_class = MLSA4RecConfig

    def __init__(self, n_items: int, max_seq_length: int, config: MLSA4RecConfig) -> None:
        super().__init__()
        c = self.config = config
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.variant = c.variant
        # without any LSA the model is a stack of Mamba blocks, padding-invariant whatever the
        # variant; it keeps the variant's training scheme so that an ablation changes one thing
        no_lsa = not c.use_lsa or c.num_interaction_layers == 0
        self.causal = c.variant == "causal"
        self.padding_invariant = c.variant != "faithful" or no_lsa
        self.preferred_scheme = "all_positions" if self.causal else "prefix"
        self.item_embedding = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.dropout = Dropout(c.dropout_prob)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.interaction_layers = nn.ModuleList(MambaLSAInteraction(c) for _ in range(c.num_interaction_layers))
        self.mamba_layers = nn.ModuleList(
            MambaResidual(c.hidden_size, c.d_state, c.d_conv, c.expand, c.dropout_prob, c.layer_norm_eps)
            for _ in range(c.num_layers)
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The released init: kaiming-uniform(a=sqrt 5) Linear and Embedding weights (U(+-1/sqrt D)
        for the embedding, the padding row included), every Linear bias 0 - the Mamba blocks'
        dt_proj too, so Delta starts at softplus(0) = ln 2 - and LayerNorm (1, 0). conv1d, A_log,
        D and the interest matrices Theta (N(0, 1)) keep their own initialisation."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """H0 = LN0(Drop(Emb(s))), for a sequence (B x L) or one event (B)."""
        return self.LayerNorm(self.dropout(self.item_embedding(items)))

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.embed(item_seq)                                          # H0: B x L x D
        for layer in self.interaction_layers:
            h = layer(h, lengths)                                         # O: B x L x D
        for layer in self.mamba_layers:
            h = layer(h)                                                  # O = LN(Drop(Mamba(O)) + O)
        return h

    def forward(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The representation at each row's last item. The faithful model's interaction layer must
        run over all L positions (the padding takes part in its LSA), but the normalization layers
        after it are causal, so ``normalize_last_grouped`` skips their share of the padding: on CPU
        in groups of 128 rows, on a GPU in one group (there, many small launches cost more than the
        padding)."""
        if self.padding_invariant or not self.mamba_layers:  # batches are trimmed already
            return super().forward(item_seq, lengths)
        h = self.embed(item_seq)
        for layer in self.interaction_layers:
            h = layer(h, lengths)
        group = 128 if item_seq.device.type == "cpu" else item_seq.shape[0]
        return self.normalize_last_grouped(h, lengths, group)

    def normalize_last_grouped(self, h: torch.Tensor, lengths: torch.Tensor, group: int) -> torch.Tensor:
        """The normalization layers on the interaction output ``h`` (B x L x D), read at each row's
        last item (B x D): rows taken ``group`` at a time in length order, each group trimmed to its
        longest row. The same numbers as running them on all of ``h`` (tested), with most of the
        padding skipped when a batch holds mostly short prefixes (Amazon: mean 8 of 50)."""
        out = h.new_empty(h.shape[0], h.shape[2])
        host_lengths = lengths.cpu()  # one device sync, not one per group
        for rows in torch.argsort(host_lengths).split(group):
            width = max(int(host_lengths[rows].max()), 1)
            rows_here = rows.to(h.device)
            hg = h[rows_here, :width]
            for layer in self.mamba_layers:
                hg = layer(hg)
            out[rows_here] = gather_last(hg, lengths[rows_here])
        return out

    # --- streaming: one event at a time (causal models only) -----------------------------------
    @property
    def streams(self) -> bool:
        """Only the causal variant has a constant-size state to carry from event to event."""
        return self.causal

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> list:
        """The state of an empty history for ``batch`` users, on ``device`` (default: the model's):
        an ``InteractionState`` (``MambaState``, ``LSAState``; ``()`` where an ablation drops the
        block) per interaction layer, then a ``MambaState`` per normalization layer."""
        self._check_streamable()
        state = ([layer.initial_state(batch) for layer in self.interaction_layers]
                 + [layer.mamba.initial_state(batch) for layer in self.mamba_layers])
        return state if device is None else tree_map_only(torch.Tensor, lambda t: t.to(device), state)

    def step(self, items: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """Feed one item per user (B ids); returns the B x D representation after it and the new state.

        Equal to ``forward`` on the whole history (tested), at a cost independent of its length.
        """
        self._check_streamable()
        h = self.embed(items)
        new_state = []
        for layer, s in zip([*self.interaction_layers, *self.mamba_layers], state, strict=True):
            h, s = layer.step(h, s)
            new_state.append(s)
        return h, new_state

    def _check_streamable(self) -> None:
        if not self.streams:
            raise NotImplementedError(f"mlsa4rec re-encodes its history: the {self.variant!r} variant is not "
                                      "causal, so it has no streaming state; use variant=causal")
