"""How much a trained non-masked model's predictions depend on the padding after each history.

Scores the users of a split with their (at most L) history padded to different widths: none
(users grouped by exact history length), the trained L, and wider. For an MLSA4Rec model it also
reports how much of the LSA's item-to-interest pooling weight falls on padded positions at L.

    python benchmarks/padding_dependence.py --run-dir runs/mlsa4rec-faithful-beauty --widths 50 100 200

``--run-dir`` may also be the staging directory of a run still training (``.NAME.partial``),
whose weights are the best so far.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from common import command, machine, write_json
from mlsa4rec.data.sampling import gather, history_bounds
from mlsa4rec.metrics import metrics_from_ranks, target_ranks
from mlsa4rec.runs.loading import load_run


@torch.inference_mode()
def ranks_at_width(model, data, split: str, max_len: int, width: int | None, batch: int = 1024) -> np.ndarray:
    """Target ranks with histories padded to ``width`` (None: no padding at all)."""
    targets = data.eval_targets(split)
    start, end = history_bounds(data, targets, max_len)
    lengths = end - start
    out = np.empty(len(targets), dtype=np.int64)
    groups = [np.flatnonzero(lengths == n) for n in np.unique(lengths)] if width is None else [np.arange(len(targets))]
    for rows in groups:
        for lo in range(0, len(rows), batch):
            r = rows[lo:lo + batch]
            seq, n = gather(data.items, start[r], end[r], int(lengths[r].max()) if width is None else width)
            scores = model.full_sort_scores(torch.from_numpy(seq), torch.from_numpy(n))
            out[r] = target_ranks(scores, torch.from_numpy(data.items[end[r]])).numpy()
    return out


@torch.inference_mode()
def pooling_mass_on_padding(model, data, split: str, max_len: int, batch: int = 1024) -> dict[str, float]:
    """Mean share of the key-pooling softmax weight (over interests and users) on padded positions."""
    targets = data.eval_targets(split)
    start, end = history_bounds(data, targets, max_len)
    shares, current = [], {}

    def hook(module, args, _out):
        x = args[0]
        weights = (x @ module.theta).softmax(dim=1)                         # B x L x P
        padded = torch.arange(x.shape[1])[None, :] >= current["lengths"][:, None]
        shares.append((weights * padded[..., None]).sum(1).mean(1))        # B
    handle = model.interaction_layers[0].lsa.attpooling_key.register_forward_hook(hook)
    try:
        for lo in range(0, len(targets), batch):
            seq, n = gather(data.items, start[lo:lo + batch], end[lo:lo + batch], max_len)
            current["lengths"] = torch.from_numpy(n)
            model.encode(torch.from_numpy(seq), torch.from_numpy(n))
    finally:
        handle.remove()
    share = torch.cat(shares).numpy()
    lengths = end - start
    return {"mean": float(share.mean()), "median": float(np.median(share)),
            "mean_for_length_le_5": float(share[lengths <= 5].mean()),
            "mean_for_length_ge_40": float(share[lengths >= 40].mean()) if (lengths >= 40).any() else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--widths", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = Path(args.run_dir)
    loaded = load_run(run, args.data_dir)
    config, data, model = loaded.config, loaded.data, loaded.model.cpu()  # inputs are built on the CPU
    max_len = config["MAX_ITEM_LIST_LENGTH"]
    widths = [None, *sorted(set(args.widths) | {max_len})]
    ranks = {w: ranks_at_width(model, data, args.split, max_len, w) for w in widths}
    trained = ranks[max_len]
    rows = []
    print(f"{config['model']} ({config.to_dict().get('variant', '-')}) on {config['dataset']}, {args.split}: "
          f"histories truncated to L={max_len}, padded to")
    print(f"{'width':<20} {'hit@10':>7} {'ndcg@10':>8} {'mrr@10':>7} {'rank changed':>13} {'top-10 flips':>13}")
    for w in widths:
        m = metrics_from_ranks(ranks[w], [10], ["hit", "ndcg", "mrr"])
        changed = float((ranks[w] != trained).mean())
        flips = float(((ranks[w] <= 10) != (trained <= 10)).mean())
        label = "none (exact length)" if w is None else f"{w}{' (trained)' if w == max_len else ''}"
        rows.append({"width": w, **m, "rank_changed": changed, "top10_flips": flips})
        print(f"{label:<20} {m['hit@10']:>7.4f} {m['ndcg@10']:>8.4f} {m['mrr@10']:>7.4f} "
              f"{changed:>13.1%} {flips:>13.1%}")
    result = {"run": str(run), "model": config["model"], "variant": config.to_dict().get("variant"),
              "split": args.split, "L": max_len, "widths": rows}
    if config["model"] == "mlsa4rec" and config["variant"] == "faithful":  # the others mask the padding
        result["pooling_mass_on_padding"] = pooling_mass_on_padding(model, data, args.split, max_len)
        print("share of the key-pooling weight on padding at the trained width:",
              json.dumps({k: round(v, 3) for k, v in result["pooling_mass_on_padding"].items()}))
    if args.json:
        write_json(args.json, {**result, "command": command(__file__), "machine": machine()})


if __name__ == "__main__":
    main()
