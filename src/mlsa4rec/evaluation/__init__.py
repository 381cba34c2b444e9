"""Full-ranking evaluation of a model over a dataset split."""

from mlsa4rec.evaluation.evaluator import evaluate, evaluate_split, split_ranks

__all__ = ["evaluate", "evaluate_split", "split_ranks"]
