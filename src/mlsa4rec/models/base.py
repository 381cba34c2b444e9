"""The interface every model implements; the trainer, evaluator and serving use only this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn

from mlsa4rec.settings import ModelConfig, setting


def gather_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row b of ``hidden`` (B x L x D) at position lengths[b] - 1, the last real item."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


def normal_init(module: nn.Module, std: float) -> None:
    """RecBole's init, for ``model.apply``: N(0, std) Linear and Embedding weights, zero Linear
    biases, LayerNorm (1, 0); any other parameter keeps its own initialisation."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, std)
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


@dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    """The Transformer stack of RecBole 1.2's SASRec (its keys and defaults), which SASRec, BERT4Rec,
    LightSANs, LinRec and Performer share; the attention's own settings are in each model's class."""

    n_layers: int = setting(2, "Transformer layers")
    n_heads: int = setting(2, "attention heads (hidden_size must be divisible by it)")
    hidden_size: int = setting(64, "D: item embedding and hidden width")
    inner_size: int = setting(256, "FFN width")
    hidden_dropout_prob: float = setting(0.5, "dropout on the embeddings, after the attention's output projection "
                                              "and the FFN")
    hidden_act: str = setting("gelu", "FFN activation: gelu | relu | swish | silu | tanh | sigmoid")
    layer_norm_eps: float = setting(1e-12, "LayerNorm epsilon")
    initializer_range: float = setting(0.02, "std of the N(0, std) init of Linear and Embedding weights")

    def check(self) -> None:
        self.at_least(1, "hidden_size", "n_layers", "n_heads", "inner_size")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})")


class SequentialRecommender(nn.Module):
    """Next-item model over right-padded item-id sequences with tied item embeddings.

    A subclass is built as ``Model(n_items, max_seq_length, config)``, ``config`` an instance of its
    ``config_class`` (a ``ModelConfig`` dataclass: hyperparameters, defaults, checks). It sets
    ``item_embedding`` (``n_items + 1`` rows, row 0 = padding) and implements ``encode`` (B x L x D,
    one vector per position). Class flags describe what the trainer may do:

    * ``causal``: the output at position t depends only on items <= t, so the model can be trained
      with the ``all_positions`` scheme.
    * ``padding_invariant``: outputs at real positions do not depend on how much padding follows,
      so batches may be trimmed to their longest sequence.
    * ``cloze``: the model has a mask token (``mask_token``, ``mask_ratio``, ``ft_ratio``) and
      trains with the ``cloze`` scheme (BERT4Rec).
    * ``forward_traces``: ``forward`` exports to ONNX as written (the faithful MLSA4Rec's grouped
      forward does not; its export reads ``encode`` at the last position: the same numbers).
    * ``streams``: ``initial_state`` and ``step`` are available, so serving can keep a
      constant-size state per user and add one event at a cost independent of the history's
      length (a property where it depends on the instance, as for MLSA4Rec's variants).

    Streaming, for models that set ``streams``::

        state = model.initial_state(batch)          # an empty history for ``batch`` users
        h, state = model.step(items, state)         # items: B ids -> h: B x D, the new state

    ``h`` after an item equals ``forward`` on the history up to and including it (in eval
    mode; with dropout on, the two draw different masks). The state is an opaque pytree
    of tensors - lists, tuples and NamedTuples whose leaves are all tensors - with the batch as
    the first dimension of every tensor. So serving can save it leaf by leaf
    (``torch.utils._pytree.tree_flatten``, ``tree_unflatten`` to rebuild it), take users out of
    it (``leaf[rows]``) and put users together (``torch.cat`` of the leaves along dim 0). Its
    leaves are on the model's device, in the model's dtype, except running sums that a model
    keeps in at least float32 under half precision and integer counters (a position).

    ``stream_limit``: how many events one state can take (None: any number). A model with learned
    positions (LinRec, Performer) ends at its position table; serving then re-encodes the last
    L events instead, which is what the batch path computes for a longer history anyway.
    """

    config_class: type[ModelConfig] = ModelConfig
    causal: bool = False
    padding_invariant: bool = False
    preferred_scheme: str = "prefix"
    cloze: bool = False
    forward_traces: bool = True
    streams: bool = False
    stream_limit: int | None = None

    n_items: int
    item_embedding: nn.Embedding

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> Any:
        """The streaming state of an empty history for ``batch`` users, on ``device`` (default:
        the model's)."""
        self._refuse_streaming()

    def step(self, items: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Add one item per user (B ids) to ``state``: (B x D representation after it, new state)."""
        self._refuse_streaming()

    def _refuse_streaming(self) -> NoReturn:
        name = getattr(self, "name", type(self).__name__)
        raise NotImplementedError(f"{name} re-encodes its history; it has no streaming state "
                                  "(check model.streams before calling initial_state/step)")

    def check_length(self, item_seq: torch.Tensor) -> None:
        """For models with learned positions: refuse inputs longer than their position table."""
        if item_seq.shape[1] > self.max_seq_length:
            raise ValueError(f"sequences of length {item_seq.shape[1]} exceed the model's "
                             f"MAX_ITEM_LIST_LENGTH={self.max_seq_length}; truncate to the most recent items")

    def forward(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """B x D user representation at the last real position of each sequence."""
        return gather_last(self.encode(item_seq, lengths), lengths)

    def item_table(self) -> torch.Tensor:
        """(n_items + 1) x D output table (tied to the input embedding)."""
        return self.item_embedding.weight

    def full_sort_scores(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """B x (n_items + 1) scores over every item; the padding column is -inf."""
        scores = self.forward(item_seq, lengths) @ self.item_table().t()
        scores[:, 0] = float("-inf")
        return scores

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        skip = {id(self.item_embedding.weight)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)
