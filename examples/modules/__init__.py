"""Demo modules for the example servers (``examples/modules/demo.py``)."""
