"""Clients of the public API: the Python client, the ``chitu`` CLI and the local-stack launcher."""
