"""Ingest: the four input layouts into <lake>/tables/posts (jobs/ingest.py)."""
