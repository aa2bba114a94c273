"""``python -m lvlmva``: the same as the ``lvlmva`` command."""

from lvlmva.cli import main

raise SystemExit(main())
