"""Sub-commands of the ``fastcbm`` CLI (see fastcbm/cli.py)."""
