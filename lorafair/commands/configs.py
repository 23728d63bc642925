"""`lorafair configs`."""

from __future__ import annotations

from lorafair.config_hub import list_configs


def configs() -> None:
    """List the configs shipped with the package, one name per line (pass one to --config)."""
    print("\n".join(list_configs()))
