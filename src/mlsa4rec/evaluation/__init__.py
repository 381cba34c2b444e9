"""Full-ranking evaluation of a model over a dataset split."""

from mlsa4rec.evaluation.evaluator import evaluate, split_ranks

__all__ = ["evaluate", "split_ranks"]
