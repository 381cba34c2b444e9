"""Using a trained run: recommendations for new histories, streaming sessions, the HTTP service."""

from mlsa4rec.serving.recommender import Recommendation, Recommender, Session

__all__ = ["Recommendation", "Recommender", "Session"]
