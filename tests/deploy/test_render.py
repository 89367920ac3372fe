"""deploy/render.py: the committed renderings match their kustomize sources, and the renderer does what kustomize does.

CI has no kubectl, so the renderer stands in for ``kubectl kustomize``. Its semantics are tested here on small
kustomizations; where a ``kubectl`` is on PATH, the last test also compares its output with kubectl's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import DEPLOY, load_all, render

KUBERNETES = DEPLOY / "kubernetes"
STANDARD_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


@pytest.mark.parametrize("stem", sorted(render.OVERLAYS))
def test_rendered_file_matches_its_sources(stem: str) -> None:
    path = render.RENDERED / f"{stem}.yaml"
    assert path.is_file(), f"{path} is missing: run python deploy/render.py"
    assert path.read_text() == render.render_text(stem), f"{path} is stale: run python deploy/render.py"


def test_every_overlay_is_rendered_and_nothing_else() -> None:
    overlays = {p.parent.name for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml")}
    assert {Path(source).name for source in render.OVERLAYS.values()} == overlays
    assert {p.stem for p in render.RENDERED.iterdir()} == set(render.OVERLAYS)
    assert render.main(["--check"]) == 0


def test_kustomizations_use_standard_fields_and_every_file_is_used() -> None:
    """Only fields real kustomize knows (and render.py implements); no patch or resource file left unreferenced."""
    for path in KUBERNETES.rglob("kustomization.yaml"):
        kustomization = yaml.safe_load(path.read_text())
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1", path
        assert kustomization["kind"] == "Kustomization", path
        assert set(kustomization) <= STANDARD_FIELDS, path
        used = {(path.parent / r).resolve() for r in kustomization.get("resources", [])}
        used |= {(path.parent / p["path"]).resolve() for p in kustomization.get("patches", [])}
        for file in path.parent.glob("*.yaml"):
            if file.name != "kustomization.yaml":
                assert file.resolve() in used, f"{file} is not referenced by {path}"
        for entry in used:
            assert entry.exists(), f"{path} refers to {entry}, which does not exist"


def write_kustomization(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  template:
    spec:
      tolerations: [{key: a, operator: Exists}]
      initContainers:
        - {name: init, image: registry.example:5000/gnws:cpu}
      containers:
        - name: main
          image: gnws:cpu
          env: [{name: A, value: "1"}, {name: B, value: "2"}]
          ports: [{name: http, containerPort: 8000}]
          volumeMounts: [{name: data, mountPath: /data}]
        - {name: side, image: other:1}
      volumes:
        - {name: data, emptyDir: {sizeLimit: 1Gi}}
"""


def test_strategic_merge_follows_kubernetes_merge_keys(tmp_path: Path) -> None:
    patch = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  template:
    spec:
      tolerations: [{key: b, operator: Exists}]
      containers:
        - name: main
          env: [{name: B, value: "3"}, {name: C, value: "4"}]
          resources: {limits: {nvidia.com/gpu: 1}}
      volumes:
        - name: data
          emptyDir: null
          persistentVolumeClaim: {claimName: pvc}
"""
    root = write_kustomization(tmp_path, {
        "base/kustomization.yaml": "resources: [deployment.yaml]\n",
        "base/deployment.yaml": DEPLOYMENT,
        "overlay/kustomization.yaml": "resources: [../base]\npatches:\n  - path: patch.yaml\n"
                                      "images:\n  - {name: gnws, newTag: cuda}\n",
        "overlay/patch.yaml": patch,
    })
    (deployment,) = render.build(root / "overlay")
    spec = deployment["spec"]["template"]["spec"]
    main, side = spec["containers"]
    assert main["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}]
    assert main["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert main["ports"] == [{"name": "http", "containerPort": 8000}]
    assert main["image"] == "gnws:cuda"
    assert side == {"name": "side", "image": "other:1"}
    # The init container's image is registry.example:5000/gnws, another name than gnws.
    assert spec["initContainers"][0]["image"] == "registry.example:5000/gnws:cpu"
    assert spec["tolerations"] == [{"key": "b", "operator": "Exists"}]  # not merged: no merge key
    assert spec["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}}]


@pytest.mark.parametrize(("image", "expected"), [
    ("gnws", ("gnws", "")),
    ("gnws:cpu", ("gnws", ":cpu")),
    ("registry.example:5000/team/gnws:cuda", ("registry.example:5000/team/gnws", ":cuda")),
    ("registry.example:5000/gnws", ("registry.example:5000/gnws", "")),
    ("gnws:cpu@sha256:abc", ("gnws", ":cpu@sha256:abc")),
])
def test_split_image(image: str, expected: tuple[str, str]) -> None:
    assert render.split_image(image) == expected


def test_images_new_name_and_digest(tmp_path: Path) -> None:
    root = write_kustomization(tmp_path, {
        "kustomization.yaml": "resources: [deployment.yaml]\nimages:\n"
                              "  - {name: gnws, newName: registry.example/gnws, digest: 'sha256:0123'}\n",
        "deployment.yaml": DEPLOYMENT,
    })
    (deployment,) = render.build(root)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/gnws@sha256:0123"


@pytest.mark.parametrize(("files", "message"), [
    ({"kustomization.yaml": "resources: [deployment.yaml]\nnamePrefix: x-\n"}, "not implemented"),
    ({"kustomization.yaml": "resources: [deployment.yaml]\npatches:\n  - path: p.yaml\n",
      "p.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nothing}\n"}, "matches no object"),
    ({"kustomization.yaml": "resources: [deployment.yaml]\npatches:\n  - path: p.yaml\n",
      "p.yaml": "- {op: add, path: /spec/replicas, value: 2}\n"}, "strategic-merge"),
    ({"kustomization.yaml": "resources: [deployment.yaml]\npatches:\n  - path: p.yaml\n",
      "p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec: {$patch: replace}\n"},
     "directives"),
    ({"kustomization.yaml": "resources: [deployment.yaml, deployment.yaml]\n"}, "two objects"),
    ({"kustomization.yaml": "resources: [missing.yaml]\n"}, "neither a file nor a directory"),
])
def test_what_is_not_implemented_is_refused(tmp_path: Path, files: dict[str, str], message: str) -> None:
    root = write_kustomization(tmp_path, {"deployment.yaml": DEPLOYMENT, **files})
    with pytest.raises(render.RenderError, match=message):
        render.build(root)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH: the renderer is not compared "
                    "with real kustomize here (CI has none; the tests above pin its semantics)")
@pytest.mark.parametrize("stem", sorted(render.OVERLAYS))
def test_renderer_agrees_with_kubectl_kustomize(stem: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    out = subprocess.run([kubectl, "kustomize", str(KUBERNETES / render.OVERLAYS[stem])],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    (tmp_path / "kubectl.yaml").write_text(out)
    assert load_all(tmp_path / "kubectl.yaml") == load_all(render.RENDERED / f"{stem}.yaml")
