"""Checks of the Kubernetes and KServe manifests in deploy/ that need no cluster."""
