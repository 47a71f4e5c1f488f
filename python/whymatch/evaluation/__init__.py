"""Retrieval evaluation: Recall@K, precision@1, R-precision and MAP@R by exact kNN."""

from .retrieval import RetrievalEvaluator, knn, recall_at_k

__all__ = ["RetrievalEvaluator", "recall_at_k", "knn"]
