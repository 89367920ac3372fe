"""Extract the OpenAPI v3 schema of one version of a CustomResourceDefinition into a JSON file.

Used once per KServe upgrade to refresh ``inferenceservice-v1beta1.json`` beside this file, which the tests
validate ``deploy/kserve/inferenceservice.yaml`` against (CI has neither a cluster nor network access)::

    CRD=config/crd/full/serving.kserve.io_inferenceservices.yaml
    git -C kserve show "v0.20.0:$CRD" > /tmp/isvc-crd.yaml
    COMMIT=$(git -C kserve rev-parse "v0.20.0^{commit}")
    python deploy/kserve/schema/extract_crd_schema.py /tmp/isvc-crd.yaml --version v1beta1 \\
        --source "github.com/kserve/kserve release v0.20.0 (commit $COMMIT), file $CRD" \\
        -o deploy/kserve/schema/inferenceservice-v1beta1.json

(``tests/deploy/test_manifests.py`` expects that form of ``--source``; update deploy/kserve/schema/README.md too.)

The schema is copied unchanged (KServe generates its CRDs without description texts), as compact JSON, with
the source in a top-level ``$comment``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def crd_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of ``version`` in a CustomResourceDefinition.

    Raises:
        ValueError: the document is no CustomResourceDefinition or has no such version.
    """
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"expected a CustomResourceDefinition, got kind {crd.get('kind')!r}")
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise ValueError(f"{crd['metadata']['name']} has versions {sorted(versions)}, not {version!r}")
    schema: dict[str, Any] = versions[version]["schema"]["openAPIV3Schema"]
    return schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="CustomResourceDefinition YAML")
    parser.add_argument("--version", required=True, help="CRD version, e.g. v1beta1")
    parser.add_argument("--source", required=True, help="repository, release, commit and path of the CRD")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    schema = {
        "$comment": f"openAPIV3Schema of {crd['metadata']['name']} {args.version}, from {args.source}; "
        "regenerate with deploy/kserve/schema/extract_crd_schema.py.",
        **crd_schema(crd, args.version),
    }
    args.output.write_text(json.dumps(schema, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
