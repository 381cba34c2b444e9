"""MLSA4Rec against an independent transcription of its reference equations, and its variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from equations import lin, ln, softmax

from mlsa4rec.errors import ConfigError
from mlsa4rec.layers.lsa import ItemToInterestPooling, LowRankSelfAttention
from mlsa4rec.models import create

N_ITEMS = 30


def model(variant: str = "faithful", **kw):
    torch.manual_seed(0)
    m = create("mlsa4rec", N_ITEMS, variant=variant, MAX_ITEM_LIST_LENGTH=20, **kw).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move off the init (zero biases would hide a missing term)
    return m


def padded(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (len(lengths), width), generator=g)
    for b, n in enumerate(lengths):
        seq[b, n:] = 0
    return seq, torch.tensor(lengths)


# --- the reference equations (MLSA4REC.md sections 2-3), written out independently -------------

def lsa_reference(mod, x, n_heads, drop):
    """Section 3: pooled keys/values per interest, one softmax over the sequence per head."""
    q, k, v = lin(mod.query, x), lin(mod.key, x), lin(mod.value, x)
    k_pool = torch.einsum("blp,bld->bpd", softmax(k @ mod.attpooling_key.theta, dim=1), k)
    v_pool = torch.einsum("blp,bld->bpd", softmax(v @ mod.attpooling_value.theta, dim=1), v)
    d_h = x.shape[-1] // n_heads
    context = torch.zeros_like(x)
    for h in range(n_heads):
        cols = slice(h * d_h, (h + 1) * d_h)
        scores = q[..., cols] @ k_pool[..., cols].transpose(1, 2) / math.sqrt(d_h)   # B x L x P
        context[..., cols] = drop(softmax(scores, dim=1)) @ v_pool[..., cols]
    return ln(mod.LayerNorm, drop(context) + x)


def transcription(m, seq, n_heads=8, drop=lambda x: x, lsa=lsa_reference):
    """Sections 2-3 with the released LSA, or ``lsa(mod, x, n_heads, drop)`` (another variant's)."""
    h0 = ln(m.LayerNorm, drop(m.item_embedding.weight[seq]))
    layer = m.interaction_layers[0]
    mm = ln(layer.LayerNorm1, drop(layer.mamba(h0)) + h0)
    a = lsa(layer.lsa, mm, n_heads, drop)
    g = ln(layer.LayerNorm2, F.gelu(lin(layer.gate, a)) * mm)
    o = ln(layer.LayerNorm3, drop(F.gelu(lin(layer.fuse, torch.cat([a, g], -1)))) + F.gelu(lin(layer.skip, h0)))
    for norm in m.mamba_layers:
        o = ln(norm.LayerNorm, drop(norm.mamba(o)) + o)
    return o


def test_faithful_forward_is_the_reference_including_its_padding_dependence() -> None:
    m = model()
    seq, lengths = padded([9, 4, 1], 9)
    torch.testing.assert_close(m.encode(seq, lengths), transcription(m, seq))
    # the released code reads the padding: more of it changes every output, and the reference agrees
    longer = torch.cat([seq, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(m.encode(longer, lengths), transcription(m, longer))
    assert (m(seq, lengths) - m(longer, lengths)).abs().max() > 1e-3


def test_faithful_last_position_skips_the_padding_of_the_normalization_layers_exactly() -> None:
    m = model()
    seq, lengths = padded([20, 1, 7, 3, 12, 1, 20], 20)
    expected = m.encode(seq, lengths)[torch.arange(7), lengths - 1]
    torch.testing.assert_close(m(seq, lengths), expected)

    def grouped(group: int) -> torch.Tensor:
        h = m.embed(seq)
        for layer in m.interaction_layers:
            h = layer(h, lengths)
        return m.normalize_last_grouped(h, lengths, group)

    torch.testing.assert_close(grouped(3), expected)
    m.train()  # gradients flow through the grouped path to every parameter
    (grouped(2) @ m.item_table().T).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_dropout_sits_where_the_released_code_puts_it() -> None:
    """Every dropout replaced by a fixed scaling: a missing, extra or moved one changes the output."""
    m = model().train()
    for module in m.modules():
        if type(module).__name__ == "Dropout":
            module.forward = lambda x: 0.5 * x
    seq, lengths = padded([7, 3], 7)
    torch.testing.assert_close(m.encode(seq, lengths), transcription(m, seq, drop=lambda x: 0.5 * x))


def test_released_parameter_count_and_no_unused_modules() -> None:
    m = create("mlsa4rec", 12101)
    # 3 Mamba blocks (38,784 each) + Q, K, V + 2 Theta + 3 MLPs + 7 LayerNorms = 148,864
    assert m.num_parameters(exclude_embeddings=True) == 148_864
    m.train()
    seq, lengths = padded([5, 2], 6)
    (m(seq, lengths) @ m.item_table().T).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_released_initialisation() -> None:
    torch.manual_seed(0)
    m = create("mlsa4rec", 5000)
    bound = 1 / math.sqrt(64)
    emb = m.item_embedding.weight.detach()
    assert emb.abs().max() <= bound and emb.std() > 0.9 * bound / math.sqrt(3)  # U(+-1/sqrt D), padding row too
    assert emb[0].abs().sum() > 0
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.weight.abs().max() <= 1 / math.sqrt(mod.in_features), name  # kaiming-uniform(a=sqrt 5)
            assert mod.bias is None or not mod.bias.any(), name                     # dt_proj's bias too
    theta = m.interaction_layers[0].lsa.attpooling_key.theta.detach()
    assert abs(float(theta.std()) - 1.0) < 0.15
    block = m.mamba_layers[0].mamba
    torch.testing.assert_close(block.A_log.detach(), torch.log(torch.arange(1.0, 33.0)).expand(128, 32))
    assert torch.equal(block.D.detach(), torch.ones(128))


def test_masked_ignores_padding_and_equals_faithful_without_any() -> None:
    masked, faithful = model("masked"), model("faithful")
    faithful.load_state_dict(masked.state_dict())
    seq, lengths = padded([8, 5, 2], 8)
    longer = torch.cat([seq, torch.zeros(3, 7, dtype=torch.long)], dim=1)
    real = torch.arange(8)[None, :] < lengths[:, None]
    torch.testing.assert_close(masked.encode(seq, lengths)[real], masked.encode(longer, lengths)[:, :8][real])
    full, full_len = padded([8, 8], 8)
    torch.testing.assert_close(masked(full, full_len), faithful(full, full_len))


@pytest.mark.parametrize("softmax_axis", ["interests", "sequence"])
def test_causal_outputs_ignore_the_future_and_streaming_equals_forward(softmax_axis) -> None:
    m = model("causal", attn_softmax=softmax_axis)
    assert m.causal and m.padding_invariant and m.preferred_scheme == "all_positions"
    seq, lengths = padded([12, 12], 12)
    out = m.encode(seq, lengths)
    changed = seq.clone()
    changed[:, 6:] = torch.randint(1, N_ITEMS + 1, (2, 6))
    torch.testing.assert_close(m.encode(changed, lengths)[:, :6], out[:, :6])
    state = m.initial_state(2)
    steps = []
    for t in range(12):
        h, state = m.step(seq[:, t], state)
        steps.append(h)
    torch.testing.assert_close(torch.stack(steps, 1), out)


def test_cumulative_pooling_is_the_pooling_of_each_prefix_and_stays_finite() -> None:
    torch.manual_seed(0)
    pool = ItemToInterestPooling(6, 3).double()
    x = torch.randn(2, 11, 6, dtype=torch.double)
    cumulative = pool.cumulative(x, chunk=4)  # chunks of 4: exercises the carry between chunks
    for t in range(11):
        torch.testing.assert_close(cumulative[:, t], pool(x[:, :t + 1]))
    pool = pool.float()
    with torch.no_grad():
        pool.theta.mul_(500.0)  # logits in the thousands: no overflow, no NaN in float32
    assert torch.isfinite(pool.cumulative(x.float(), chunk=4)).all()


def test_causal_lsa_with_a_sequence_softmax_follows_its_definition() -> None:
    """attn_softmax=sequence in the causal LSA: position t's weight for interest p is
    exp(s_t,p) / sum_{u<=t} exp(s_u,p), where s_u,p scores query u against the keys pooled over
    positions <= u (each position's own pooling); context_t = sum_p w_t,p V~_t,p."""
    torch.manual_seed(0)
    lsa = LowRankSelfAttention(8, 2, 3, 0.0, 0.0, variant="causal", softmax="sequence").double().eval()
    x = torch.randn(2, 6, 8, dtype=torch.double)
    q, k, v = lsa.query(x), lsa.key(x), lsa.value(x)
    d_h = 4
    scores, contexts = [], []
    for t in range(6):
        k_pool = lsa.attpooling_key(k[:, :t + 1])                      # B x P x D
        v_pool = lsa.attpooling_value(v[:, :t + 1])
        context = torch.zeros(2, 8, dtype=torch.double)
        scores.append([q[:, t, h * d_h:(h + 1) * d_h, None].mul(k_pool[:, :, h * d_h:(h + 1) * d_h].transpose(1, 2))
                       .sum(1) / math.sqrt(d_h) for h in range(2)])   # per head: B x P
        for h in range(2):
            past = torch.stack([scores[u][h] for u in range(t + 1)], 1)        # B x (t+1) x P
            w = torch.exp(past[:, -1]) / torch.exp(past).sum(1)               # B x P
            context[:, h * d_h:(h + 1) * d_h] = (w[..., None] * v_pool[:, :, h * d_h:(h + 1) * d_h]).sum(1)
        contexts.append(context)
    expected = F.layer_norm(torch.stack(contexts, 1) + x, (8,), lsa.LayerNorm.weight, lsa.LayerNorm.bias, 1e-12)
    torch.testing.assert_close(lsa(x), expected)


def test_causal_lsa_at_the_last_position_is_the_masked_lsa_over_interests() -> None:
    torch.manual_seed(0)
    causal = LowRankSelfAttention(8, 2, 3, 0.0, 0.0, variant="causal", softmax="interests").double().eval()
    masked = LowRankSelfAttention(8, 2, 3, 0.0, 0.0, variant="masked", softmax="interests").double().eval()
    masked.load_state_dict(causal.state_dict())
    x = torch.randn(2, 7, 8, dtype=torch.double)
    for t in range(7):
        lengths = torch.full((2,), t + 1)
        torch.testing.assert_close(causal(x)[:, t], masked(x, lengths)[:, t])


@pytest.mark.parametrize(
    "overrides, non_embedding",
    [
        ({}, 148_864),
        ({"use_lsa": False}, 148_864 - 12_480 - 2_560 - 128 - 4_160 - 128 - 4_096),  # no LSA, no gate, fuse D->D
        ({"gate_act": "none"}, 148_864 - 4_160 - 128),
        ({"num_layers": 0}, 148_864 - 2 * (38_784 + 128)),
        ({"interaction_mamba": False}, 148_864 - 38_784 - 128),
        ({"num_interaction_layers": 2}, 148_864 + 38_784 + 12_480 + 2_560 + 128 + 4_160 + 8_256 + 4_160 + 384),
    ],
)
def test_ablation_parameter_counts(overrides, non_embedding) -> None:
    assert create("mlsa4rec", 100, **overrides).num_parameters(exclude_embeddings=True) == non_embedding


def test_lsa_on_the_embeddings_reads_h0() -> None:
    """``lsa_input=embedding``: the LSA output does not change when the interaction Mamba does."""
    m = model(lsa_input="embedding")
    seq, lengths = padded([6, 6], 6)
    captured = []
    m.interaction_layers[0].lsa.register_forward_hook(lambda mod, args, out: captured.append(out))
    m.encode(seq, lengths)
    with torch.no_grad():
        m.interaction_layers[0].mamba.out_proj.weight.mul_(3.0)
    m.encode(seq, lengths)
    torch.testing.assert_close(captured[0], captured[1])


def test_sigmoid_gate_and_interest_softmax_change_the_output() -> None:
    seq, lengths = padded([6, 3], 6)
    base = model()(seq, lengths)
    for kw in ({"gate_act": "sigmoid"}, {"attn_softmax": "interests"}):
        assert (model(**kw)(seq, lengths) - base).abs().max() > 1e-4


def test_non_causal_variants_refuse_to_stream_and_bad_settings_are_config_errors() -> None:
    with pytest.raises(RuntimeError, match="variant=causal"):
        model("masked").initial_state(1)
    with pytest.raises(ConfigError, match="variant must be one of"):
        create("mlsa4rec", 10, variant="bidirectional")
    with pytest.raises(ConfigError, match="gate_act"):
        create("mlsa4rec", 10, gate_act="relu")
    with pytest.raises(ConfigError, match="divisible"):
        create("mlsa4rec", 10, n_heads=5)
