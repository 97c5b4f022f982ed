"""The operator layer's one command, ``backflow`` (main.py assembles it)."""
