"""Load testing the gnws API with Locust: the locustfile and a headless runner with a summary.

Imports only the standard library and Locust (the ``loadtest`` extra), so it runs in the small
Locust-only container image too.
"""
