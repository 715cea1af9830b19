"""``python -m loraswap`` is the ``loraswap`` command."""

from loraswap.cli import main

raise SystemExit(main())
