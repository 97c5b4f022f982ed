"""``python -m backflow.cli``: the same as the ``backflow`` command."""

from backflow.cli.main import main

main()
