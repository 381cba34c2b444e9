"""The selective scan on a GPU: check ``cuda``, ``triton`` and ``torch`` against ``reference``, then time them.

    python benchmarks/scan_gpu.py [--device cuda] [--lengths 50 200 1000] [--repeats 5]

The scan part of the prepared GPU check, on its own (``benchmarks/gpu_check.py`` runs it with
the tests, the models and a time budget, and writes docs/results/gpu_check.md). It prints the
card, whether mamba-ssm imports, the relative error of every output and input gradient against
the float64 reference on a small problem, and, for B=256, D=64, N=32, E=2, the fwd+bwd
milliseconds and peak GPU memory of each implementation per length. ``--device cpu`` runs the
same on the CPU (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import time

import torch

from mlsa4rec.ops import resolve_impl, selective_scan

BATCH, D_MODEL, D_STATE, EXPAND = 256, 64, 32, 2


def inputs(batch: int, d_inner: int, n_state: int, length: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return [randn(batch, d_inner, length), randn(batch, d_inner, length) - 2.0, -torch.exp(randn(d_inner, n_state)),
            randn(batch, n_state, length), randn(batch, n_state, length), randn(d_inner),
            randn(batch, d_inner, length), randn(d_inner) * 0.1]


def outputs_and_grads(impl: str, leaves: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    xs = [x.detach().to(dtype).requires_grad_() for x in leaves]
    out = selective_scan(*xs, delta_softplus=True, impl=impl)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return [out.detach()] + [x.grad for x in xs]


def check(device: str) -> None:
    leaves = inputs(4, 16, 8, 37, device)
    exact = outputs_and_grads("reference", leaves, torch.float64)
    names = ["out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"]
    for impl in ("cuda", "triton", "torch", "cpu"):
        runs = resolve_impl(impl, torch.device(device))
        if impl == "cpu" and device != "cpu":
            continue
        got = outputs_and_grads(impl, leaves, torch.float32)
        errors = {n: float((a.double() - b).norm() / b.norm()) for n, a, b in zip(names, got, exact)}
        worst = max(errors, key=errors.get)
        status = "ok" if errors[worst] <= 1e-5 else "FAIL"
        print(f"check {impl:>5} (runs {runs}): worst relative error {errors[worst]:.1e} ({worst}) -> {status}")


def timing(device: str, lengths: list[int], repeats: int) -> None:
    d_inner = EXPAND * D_MODEL
    print(f"\nfwd+bwd, B={BATCH}, d_inner={d_inner}, N={D_STATE}, fp32 (median of {repeats})")
    print(f"{'impl':>6} {'runs':>6} " + " ".join(f"{f'L={n} ms':>11} {'MB':>7}" for n in lengths))
    for impl in ("cuda", "triton", "torch") if device != "cpu" else ("cpu", "torch"):
        cells = []
        for length in lengths:
            leaves = [x.requires_grad_() for x in inputs(BATCH, d_inner, D_STATE, length, device)]

            def step(leaves: list[torch.Tensor] = leaves, impl: str = impl) -> None:
                selective_scan(*leaves, delta_softplus=True, impl=impl).sum().backward()

            step()
            if device != "cpu":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            mb = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else float("nan")
            cells.append(f"{1000 * sorted(times)[len(times) // 2]:>11.1f} {mb:>7.0f}")
        print(f"{impl:>6} {resolve_impl(impl, torch.device(device)):>6} " + " ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device != "cpu":
        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible to torch; run with --device cpu for a smoke test")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    try:
        import mamba_ssm
        print(f"mamba_ssm {mamba_ssm.__version__} imports")
    except Exception as exc:  # noqa: BLE001 - report whatever stops it
        print(f"mamba_ssm does not import ({type(exc).__name__}: {exc}); `cuda` runs `triton` (or `torch`)")
    check(args.device)
    timing(args.device, args.lengths, args.repeats)


if __name__ == "__main__":
    main()
