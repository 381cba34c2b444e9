"""LRURec against its equations (float64, a loop per position in complex arithmetic), the chunked
scan against its loop, the streaming step against forward, the released init and settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from mlsa4rec.config import build_config, presets
from mlsa4rec.errors import ConfigError
from mlsa4rec.layers.lru import LRU
from mlsa4rec.models import available, build_model, create, get_class
from mlsa4rec.ops.linear_scan import linear_scan, linear_scan_reference

N_ITEMS = 30


def model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = create("lrurec", N_ITEMS, MAX_ITEM_LIST_LENGTH=40, **kw).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # off the init (a missing bias or sign would hide at zero)
    return m


def padded(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (len(lengths), width), generator=g)
    for b, n in enumerate(lengths):
        seq[b, n:] = 0
    return seq, torch.tensor(lengths)


def ln(mod, x):
    return F.layer_norm(x, x.shape[-1:], mod.weight, mod.bias, 1e-5)  # PyTorch's default eps, as released


def lin(mod, x):
    return x @ mod.weight.T + mod.bias


def transcription(m, seq, drop=lambda x: x, drop_lru=lambda x: x):
    """The module docstring's equations in complex128, one position at a time. The complex weights
    are read from the real layout ``layers/lru.py`` documents: in_proj rows [Re B; Im B], out_proj
    columns [Re C, -Im C]."""
    x = ln(m.layer_norm, drop(m.item_embedding.weight[seq]))
    for block in m.lru_blocks:
        lru = block.lru
        n = lru.d_state
        nu, theta, gamma = torch.exp(lru.params_log)
        lam = torch.exp(torch.complex(-nu, theta))
        w, b = lru.in_proj.weight, lru.in_proj.bias
        B, b = torch.complex(w[:n], w[n:]), torch.complex(b[:n], b[n:])
        C, c = torch.complex(lru.out_proj.weight[:, :n], -lru.out_proj.weight[:, n:]), lru.out_proj.bias
        bx = gamma * (x.to(torch.complex128) @ B.T + b)      # B x L x N, every position at once
        h = torch.zeros(seq.shape[0], n, dtype=torch.complex128)
        states = []
        for t in range(seq.shape[1]):                          # the recurrence, one position at a time
            h = lam * h + bx[:, t]
            states.append(h)
        y = (torch.stack(states, 1) @ C.T).real + c
        x = ln(block.layer_norm, drop_lru(y) + x)
        f = block.feed_forward
        x = ln(f.layer_norm, drop(lin(f.w_2, drop(F.gelu(lin(f.w_1, x))))) + x)
    return x


# --- the scan -------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, chunk", [(1, 16), (2, 2), (5, 16), (16, 16), (17, 16), (37, 1), (37, 3),
                                           (50, 7), (200, 16), (300, 4)])
def test_chunked_scan_equals_the_loop_in_values_and_gradients(length, chunk) -> None:
    g = torch.Generator().manual_seed(length * 31 + chunk)
    n = 6
    u = torch.randn(2, n, 3, length, generator=g, dtype=torch.float64)
    nu = torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + torch.tensor([0.0, 1e-3, 0.01, 0.1, 1.0, 3.0],
                                                                              dtype=torch.float64)
    theta = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    w = torch.randn(2, n, 3, length, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda *a: linear_scan(*a, chunk=chunk), linear_scan_reference):
        leaves = [t.clone().requires_grad_() for t in (u, nu, theta)]
        h = fn(*leaves)
        (h * w).sum().backward()
        results.append([h.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_chunked_scan_is_accurate_in_float32_over_long_sequences() -> None:
    """L = 3000, |lambda| from 0.9999 (long memory) to 0.05: the fp32 scan against the fp64 loop on the
    same (fp32-rounded) inputs, to ~1e-7 of each channel's scale; the fp32 loop itself drifts to
    ~3e-5 on the slowest channel (its repeated products), and float32 powers of large lags would
    give ~2e-4 (hence powers in float64)."""
    g = torch.Generator().manual_seed(0)
    n = 8
    u = torch.randn(2, n, 2, 3000, generator=g).double()
    nu = torch.tensor([1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 1.0, 3.0]).double()
    theta = (torch.rand(n, generator=g) * 2 * math.pi).double()
    want = linear_scan_reference(u, nu, theta)
    scale = want.abs().amax(dim=(0, 2, 3))  # per channel
    for chunk in (16, 64):
        got = linear_scan(u.float(), nu.float(), theta.float(), chunk=chunk).double()
        assert float(((got - want).abs().amax(dim=(0, 2, 3)) / scale).max()) < 1e-6


def test_scan_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="2 x N x B x L"):
        linear_scan(torch.zeros(2, 4, 3), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        linear_scan(torch.zeros(2, 4, 3, 5), torch.zeros(5), torch.zeros(4))


# --- the model against its equations ---------------------------------------------------------------
@pytest.mark.parametrize("num_layers", [1, 2])
def test_forward_is_the_transcription(num_layers) -> None:
    m = model(num_layers=num_layers)
    seq, lengths = padded([37, 37, 37], 37)  # three chunks of the scan
    with torch.no_grad():
        expected = transcription(m, seq)
        encoded = m.encode(seq, lengths)
        torch.testing.assert_close(encoded[..., :-1], expected, rtol=1e-10, atol=1e-10)
        assert bool((encoded[..., -1] == 1).all())  # the output bias's coordinate
        scores = expected[:, -1] @ m.item_embedding.weight.T + m.output_bias
        scores[:, 0] = float("-inf")
        torch.testing.assert_close(m.full_sort_scores(seq, lengths), scores, rtol=1e-10, atol=1e-10)


def test_without_output_bias_the_item_table_is_the_embedding() -> None:
    m = model(num_layers=1, output_bias=False)
    seq, lengths = padded([20, 9], 20)
    with torch.no_grad():
        torch.testing.assert_close(m.encode(seq, lengths), transcription(m, seq), rtol=1e-10, atol=1e-10)
    assert m.item_table() is m.item_embedding.weight


def test_dropout_sits_where_the_released_code_puts_it() -> None:
    """Training mode with every dropout replaced by a fixed scaling, different for the LRU's own
    dropout: any missing, extra or moved dropout changes the output."""
    m = model(dropout_prob=0.3, lru_dropout_prob=0.6).train()
    for module in m.modules():
        if type(module).__name__ == "Dropout":
            module.forward = lambda x, p=module.p: (1 - p) * x
    seq, lengths = padded([19, 19], 19)
    expected = transcription(m, seq, drop=lambda x: 0.7 * x, drop_lru=lambda x: 0.4 * x)
    torch.testing.assert_close(m.encode(seq, lengths)[..., :-1], expected, rtol=1e-10, atol=1e-10)


# --- the contract, on sequences longer than a chunk ------------------------------------------------
def test_causal_across_chunks() -> None:
    m = model()
    seq, lengths = padded([40, 33, 18], 40)
    for t in (3, 16, 17, 31):
        changed = seq.clone()
        changed[:, t + 1:] = torch.randint(1, N_ITEMS + 1, (3, 40 - t - 1))
        torch.testing.assert_close(m.encode(seq, lengths)[:, :t + 1], m.encode(changed, lengths)[:, :t + 1],
                                   rtol=0, atol=1e-12)


def test_padding_invariant_across_chunks() -> None:
    m = model()
    seq, lengths = padded([40, 33, 18], 40)
    longer = torch.cat([seq, torch.zeros(3, 25, dtype=torch.long)], 1)
    torch.testing.assert_close(m(longer, lengths), m(seq, lengths), rtol=1e-12, atol=1e-12)
    short = lengths.clamp(max=18)
    torch.testing.assert_close(m(seq[:, :18], short), m(seq, short), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@torch.no_grad()
def test_each_step_equals_forward_on_the_history_so_far(dtype, tol) -> None:
    m = model(dtype)
    seq, lengths = padded([1, 17, 35], 35)
    state = m.initial_state(3)
    assert [tuple(s.shape) for s in state] == [(3, 2, 128)] * 2 and all(s.dtype == dtype for s in state)
    for t in range(35):
        h, state = m.step(seq[:, t], state)
        active = lengths > t
        expected = m(seq[:, :t + 1], lengths.clamp(max=t + 1))
        torch.testing.assert_close(h[active], expected[active], rtol=tol, atol=tol)


@torch.no_grad()
def test_state_rows_split_and_merge() -> None:
    m = model()
    seq, _ = padded([12, 12, 12], 12)
    state = m.initial_state(3, device="cpu")
    for t in range(5):
        _, state = m.step(seq[:, t], state)
    order = [2, 0, 1]
    merged = pytree.tree_map(lambda leaf: torch.cat([leaf[b:b + 1] for b in order]), state)
    for t in range(5, 12):
        h, state = m.step(seq[:, t], state)
        h_merged, merged = m.step(seq[order, t], merged)
        torch.testing.assert_close(h_merged, h[order], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="holds 3 sequences but the input has 2"):
        m.step(seq[:2, 0], state)


@torch.no_grad()
def test_half_precision_keeps_the_state_in_float32() -> None:
    m = model(torch.float32).to(torch.bfloat16)
    seq, lengths = padded([9, 9], 9)
    state = m.initial_state(2)
    assert all(s.dtype == torch.float32 for s in state)
    for t in range(9):
        h, state = m.step(seq[:, t], state)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), m(seq, lengths).float(), rtol=0.05, atol=0.05)


# --- initialisation, parameters, settings ----------------------------------------------------------
@pytest.mark.parametrize("r_min, r_max, max_phase", [(0.8, 0.99, 2 * math.pi), (0.5, 0.6, math.pi / 10)])
def test_ring_initialisation(r_min, r_max, max_phase) -> None:
    torch.manual_seed(0)
    lru = LRU(4, 4096, r_min=r_min, r_max=r_max, max_phase=max_phase).double()
    nu, theta, gamma = (t.detach() for t in lru.eigen(torch.float64))
    radius = torch.exp(-nu)
    assert float(radius.min()) >= r_min - 1e-12 and float(radius.max()) <= r_max + 1e-12
    assert float(theta.min()) > 0 and float(theta.max()) <= max_phase + 1e-12
    torch.testing.assert_close(gamma, torch.sqrt(1 - radius ** 2))
    # |lambda|^2 uniform on [r_min^2, r_max^2] (uniform on the ring's area), theta uniform
    assert abs(float((radius ** 2).mean()) - (r_min ** 2 + r_max ** 2) / 2) < 0.02 * (r_max ** 2 - r_min ** 2) + 1e-3
    assert abs(float(theta.mean()) - max_phase / 2) < 0.02 * max_phase


def test_released_initialisation() -> None:
    torch.manual_seed(0)
    m = create("lrurec", 5000)
    trunc_std = 0.02 * 0.8796  # the std of N(0, 0.02) truncated to +-2 std
    tensors = {"embedding": m.item_embedding.weight[1:], "output bias": m.output_bias}
    for i, block in enumerate(m.lru_blocks):
        for name, p in [("in_proj", block.lru.in_proj.weight), ("in_proj bias", block.lru.in_proj.bias),
                        ("out_proj", block.lru.out_proj.weight), ("out_proj bias", block.lru.out_proj.bias),
                        ("w_1", block.feed_forward.w_1.weight), ("w_2 bias", block.feed_forward.w_2.bias)]:
            tensors[f"{i}.{name}"] = p
    for name, p in tensors.items():
        p = p.detach()
        assert float(p.abs().max()) <= 0.04, name
        assert abs(float(p.std()) - trunc_std) < (0.002 if p.numel() > 5000 else 0.004), name
    assert float(m.item_embedding.weight[0].detach().abs().max()) == 0.0
    norms = [m.layer_norm] + [n for b in m.lru_blocks for n in (b.layer_norm, b.feed_forward.layer_norm)]
    for mod in norms:
        assert bool((mod.weight == 1).all() and (mod.bias == 0).all()) and mod.eps == 1e-5
    radius = torch.exp(-torch.exp(m.lru_blocks[0].lru.params_log[0].detach()))
    assert 0.8 <= float(radius.min()) and float(radius.max()) <= 0.99


def test_gradients_reach_every_parameter() -> None:
    m = model(torch.float32).train()
    seq, lengths = padded([30, 12, 2], 30)
    (m(seq, lengths) @ m.item_table().T).logsumexp(-1).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        rows = p.grad[1:] if name == "item_embedding.weight" else p.grad  # row 0 is padding
        assert float(rows.abs().max()) > 0, name
    for block in m.lru_blocks:  # nu, theta and gamma each learn
        assert bool((block.lru.params_log.grad.abs().amax(dim=1) > 0).all())


def test_parameter_count() -> None:
    d, n, items = 64, 128, 100
    m = create("lrurec", items)
    lru = 3 * n + (d * 2 * n + 2 * n) + (2 * n * d + d)
    ffn = (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * d
    per_block = lru + 2 * d + ffn
    assert m.num_parameters(exclude_embeddings=True) == 2 * d + 2 * per_block == 133_760
    assert m.num_parameters() == 133_760 + (items + 1) * d + (items + 1)
    assert create("lrurec", items, output_bias=False).num_parameters() == 133_760 + (items + 1) * d


def test_registered_flags_and_bad_settings() -> None:
    assert "lrurec" in available()
    m = create("lrurec", 10)
    assert (m.causal, m.padding_invariant, m.preferred_scheme, m.streams) == (True, True, "all_positions", True)
    for bad, match in [({"r_min": 0.99, "r_max": 0.8}, "r_min <= r_max"), ({"r_max": 1.0}, "r_max < 1"),
                       ({"max_phase": 0.0}, "max_phase"), ({"num_layers": 0}, "num_layers"),
                       ({"expand": 0}, "expand")]:
        with pytest.raises(ConfigError, match=match):
            create("lrurec", 10, **bad)


def test_defaults_and_presets_hold_the_released_settings() -> None:
    released = {"hidden_size": 64, "num_layers": 2, "expand": 2, "r_min": 0.8, "r_max": 0.99,
                "max_phase": 2 * math.pi, "output_bias": True, "initializer_range": 0.02}
    defaults = build_config("lrurec")
    assert {k: defaults[k] for k in released} == released
    assert (defaults["dropout_prob"], defaults["lru_dropout_prob"], defaults["train_batch_size"]) == (0.2, 0.2, 128)
    assert {"lrurec-ml-1m", "lrurec-amazon-beauty"} <= set(presets())
    for name, length, dropout, eval_step in [("lrurec-ml-1m", 200, 0.2, 7), ("lrurec-amazon-beauty", 50, 0.6, 6)]:
        c = build_config("lrurec", [name])
        assert {k: c[k] for k in released} == released
        assert (c["MAX_ITEM_LIST_LENGTH"], c["dropout_prob"], c["lru_dropout_prob"], c["eval_step"]) == (
            length, dropout, dropout, eval_step)
        assert (c["train_scheme"], c["train_batch_size"], c["learning_rate"], c["clip_grad_norm"], c["epochs"],
                c["stopping_step"], c["valid_metric"]) == ("all_positions", 128, 1e-3, 5.0, 500, 10, "hit@10")
        assert build_model(get_class("lrurec"), 20, c.model_kwargs(), length).num_parameters() > 0
