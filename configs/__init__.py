"""ml_collections configs: ``configs/<family>.py:<method>`` (see ``common.py``)."""
