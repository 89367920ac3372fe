"""The Serve config file in deploy/ray builds the gnws application (no cluster needed to build it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("ray.serve", reason="pip install -e '.[dev]' (ray[serve])")


def test_serve_config_builds_the_two_deployments() -> None:
    from service.ray_serve import build

    config = yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "service.ray_serve:build"
    built = build(app["args"])
    ingress = built._bound_deployment
    assert ingress.name == "GnwsIngress"
    pool = ingress.init_args[0]
    pool = pool._bound_deployment
    assert pool.name == "InferenceReplica"
    autoscaling = pool._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (2, 4)
    assert pool._deployment_config.max_ongoing_requests == 1
    assert ingress.init_args[1]["offline"] is True
