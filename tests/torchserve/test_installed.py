"""``gnws archive`` from a plain (non-editable) install, run outside the source checkout.

The project is built into a wheel and installed into a fresh virtual environment that reuses the
test environment's already-installed dependencies (a ``.pth`` line naming its site-packages; the
editable install there is not picked up, because ``.pth`` files of a directory named that way are
not processed). Nothing of the checkout is on the path: the archive builder, the handler entry file
it packs and the handler module must all come from the installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import FASTER_R50

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with gnws installed from a freshly built wheel; returns its ``bin`` folder."""
    root = tmp_path_factory.mktemp("plain-install")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(REPO)], check=True, timeout=300, cwd=root)
    (wheel,) = wheels.glob("gnws-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300, cwd=root)
    return env_dir / "bin"


def test_gnws_archive_works_from_a_plain_install(installed: Path, baked_model, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GNWS_TORCHSERVE_DIR")}
    where = subprocess.run(
        [str(installed / "python"), "-c", "import gnws, gnws.torchserve.handler, models; "
         "print(gnws.__file__); print(gnws.torchserve.handler.__file__); print(models.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env=env,
    ).stdout.split()
    assert all(str(installed.parent) in path for path in where), f"imported from the checkout: {where}"

    out = tmp_path / "mar"
    result = subprocess.run(
        [str(installed / "gnws"), "archive", str(baked_model(FASTER_R50)), "-o", str(out), "--model-name", "m1"],
        capture_output=True, text=True, cwd=tmp_path, env={**env, "GNWS_HOME": str(tmp_path / "home")}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out / "m1.mar")
    with zipfile.ZipFile(out / "m1.mar") as mar:
        names = set(mar.namelist())
        shim = mar.read("gnws_handler.py").decode()
    assert {"gnws_handler.py", "model-config.yaml", f"{FASTER_R50}.safetensors"} <= names, names
    assert "from gnws.torchserve.handler import" in shim
