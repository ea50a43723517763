"""Allow ``python -m meshguard``."""

from meshguard.cli import main

raise SystemExit(main())
