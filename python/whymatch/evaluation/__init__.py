"""Retrieval evaluation: Recall@K, precision@1, R-precision and MAP@R by exact kNN."""

from .retrieval import RetrievalEvaluator, faiss_gpu_device, faiss_index, knn, recall_at_k

__all__ = ["RetrievalEvaluator", "recall_at_k", "knn", "faiss_gpu_device", "faiss_index"]
