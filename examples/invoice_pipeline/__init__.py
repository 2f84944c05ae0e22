"""The invoice pipeline example: see README.md."""
