"""gnws: serve and refresh GN+WS object detectors. The ``gnws`` command lives in :mod:`gnws.cli`."""

__version__ = "0.1.0"
