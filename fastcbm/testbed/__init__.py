"""Training and evaluation of the bundled testbed models (``fastcbm testbed ...``)."""
