"""The namespace lab for tests; it lives in ``meshguard.netlab`` so the demo shares it."""

from meshguard.netlab import *  # noqa: F403
