"""Interpreter start-up hook (placeholder until the integration lands)."""


def install_import_hook() -> None:
    """Install nothing yet."""
