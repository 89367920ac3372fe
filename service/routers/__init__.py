"""One router per resource: inference (detect/segment), models, health (and metrics), web page."""
