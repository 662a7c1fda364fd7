"""The contracts and plumbing every job uses: config (the profiles), storage (URIs and bytes),
schemas (the tables), lake (where outputs live, the summary contract: open_input / close_output),
session, cli (the shared command line and run), progress, splits, jars, figures.

config, storage and figures import no Spark: they are what the torch side (dl) may import
(tests/test_layout.py). Nothing here imports sparkml or dl.
"""
