"""gnws HTTP service: FastAPI ``/v1/detect`` and ``/v1/segment`` with dynamic batching, limits,
metrics, hot model reloads and a web page. Imports :mod:`models`, never ``training``.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
