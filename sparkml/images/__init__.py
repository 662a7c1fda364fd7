"""Image preparation (jobs/prepare_images.py) and near-duplicate search (jobs/dedup.py)."""
