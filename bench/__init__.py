"""fastcbm's benchmarks: one script per op or job, each measured against a baseline in the same run.

Run them all with ``python -m bench`` (see ``bench/__main__.py``), or one with ``python bench/<name>.py``.
"""
