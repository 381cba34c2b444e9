"""MLSA4Rec's settings: the authors' released config, the variants and the ablations (``mlsa4rec.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from mlsa4rec.errors import check_choice
from mlsa4rec.layers.lsa import VARIANTS
from mlsa4rec.settings import ModelConfig, setting

GATE_ACTS = ("gelu", "sigmoid", "none")


@dataclass(frozen=True)
class MLSA4RecConfig(ModelConfig):
    """The authors' released config (MLSA4Rec.yaml of their RecBole plug-in), and the ablations."""

    hidden_size: int = setting(64, "D: item embedding and hidden width")
    num_layers: int = setting(2, "Mamba normalization layers")
    num_interaction_layers: int = setting(1, "Mamba-LSA interaction layers (the paper: 1)")
    dropout_prob: float = setting(0.1, "dropout on H0, on Mamba's outputs and in the fusion MLP")
    attn_dropout_prob: float = setting(0.1, "dropout on the LSA's attention weights")
    k_interests: int = setting(20, "P, latent interests of the LSA")
    n_heads: int = setting(8, "LSA heads")
    d_state: int = setting(32, "N: Mamba's SSM state size per channel")
    d_conv: int = setting(4, "K: Mamba's causal convolution width")
    expand: int = setting(2, "E: Mamba's d_inner = E * D")
    variant: str = setting("faithful", "faithful | masked | causal: what the LSA sees (padding, the future)")
    attn_softmax: str = setting("auto", "sequence | interests | auto (sequence; interests for causal)")
    gate_act: str = setting("gelu", "gelu | sigmoid | none (no gate: plain concatenation)")
    use_lsa: bool = setting(True, "false: Mamba only (ablation)")
    lsa_input: str = setting("mamba", "mamba | embedding (LSA on H0: no structural bias; ablation)")
    interaction_mamba: bool = setting(True, "false: no Mamba in the interaction layer, M = H0 (ablation)")
    layer_norm_eps: float = setting(1e-12, "LayerNorm epsilon")
    # the released training setup (L=50 on every dataset); train_scheme auto: prefix for the
    # faithful and masked variants, all_positions for the causal one
    train_defaults = {"MAX_ITEM_LIST_LENGTH": 50, "train_scheme": "auto", "train_batch_size": 8192,
                      "learning_rate": 0.001, "epochs": 100, "stopping_step": 10, "seed": 2024}

    def check(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        check_choice("gate_act", self.gate_act, GATE_ACTS)
        check_choice("lsa_input", self.lsa_input, ("mamba", "embedding"))
        if self.num_layers < 0 or self.num_interaction_layers < 0:
            raise ValueError("num_layers and num_interaction_layers must be >= 0")
        if self.num_layers + self.num_interaction_layers == 0:
            raise ValueError("the model needs at least one interaction or normalization layer")

    @property
    def softmax(self) -> str:
        """The LSA's softmax axis: the released one, except that a causal model normalises over the interests."""
        if self.attn_softmax != "auto":
            return self.attn_softmax
        return "interests" if self.variant == "causal" else "sequence"
