"""The generated sample (jobs/make_sample.py) and the real-photo test sets."""
