"""``python -m pqnet``: the command line (see :mod:`pqnet.cli`)."""

from .cli import main

raise SystemExit(main())
