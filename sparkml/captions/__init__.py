"""Caption topics (jobs/train_lda.py, infer_topics.py) and text-to-image retrieval (jobs/evaluate_retrieval.py, retrieve.py)."""
