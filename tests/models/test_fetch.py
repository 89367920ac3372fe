"""``gnws fetch`` against a real local HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import models.fetch
from models.errors import CheckpointError, DownloadError
from models.fetch import download, fetch
from models.store import checkpoint_path, ensure_baked_zoo_model
from models.zoo import ZOO

NAME = "faster_rcnn_r50_fpn_gn_ws-all_1x_coco"


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A threaded HTTP server on 127.0.0.1 serving ``root``; yields (base URL, root)."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):  # keep test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_good_file_is_cached_with_verified_hash(http_root, tmp_path: Path) -> None:
    base, root = http_root
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (root / "w.pth").write_bytes(payload)
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    dest = tmp_path / "cache" / "w.pth"
    download(f"{base}/w.pth", dest, sha256_prefix=prefix, progress=False)
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["w.pth"]  # no partial file left


def test_corrupted_file_is_rejected_and_deleted(http_root, tmp_path: Path) -> None:
    base, root = http_root
    (root / "w.pth").write_bytes(b"corrupted" * 1000)
    dest = tmp_path / "cache" / "w.pth"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(f"{base}/w.pth", dest, sha256_prefix="613d9fe2", progress=False)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_http_error_is_a_download_error(http_root, tmp_path: Path) -> None:
    base, _ = http_root
    with pytest.raises(DownloadError, match="could not download"):
        download(f"{base}/missing.pth", tmp_path / "x.pth", sha256_prefix=None, progress=False)


def test_fetch_zoo_name_through_mirror(http_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo path layout is kept under a mirror; a wrong file fails the published hash."""
    base, root = http_root
    entry = ZOO[NAME]
    rel = Path(entry.url.split("download.openmmlab.com/", 1)[1].replace("%2B", "+"))
    (root / rel).parent.mkdir(parents=True)
    (root / rel).write_bytes(b"not the published checkpoint")
    monkeypatch.setenv("GNWS_HOME", str(tmp_path / "home"))
    with pytest.raises(DownloadError, match=f"expected {entry.sha256_prefix}"):
        fetch(NAME, mirror=base, progress=False)
    assert not any((tmp_path / "home").rglob("*.pth"))


def test_fetch_by_name_caches_verifies_and_replaces(
    http_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fetch(NAME)`` end to end, with a zoo entry whose published hash is that of a local payload:
    download into GNWS_HOME, stale partials of killed downloads removed, the cached copy verified
    on the next call (no download), a wrong cached file refused, ``force`` downloading it again."""
    base, root = http_root
    payload = os.urandom(2 * 1024 * 1024 + 5)
    digest = hashlib.sha256(payload).hexdigest()
    entry = dataclasses.replace(ZOO[NAME], date_hash=f"20200130-{digest[:8]}")
    monkeypatch.setattr(models.fetch, "get_entry", lambda name: entry)
    monkeypatch.setenv("GNWS_HOME", str(tmp_path / "home"))
    served = root / entry.url.split("download.openmmlab.com/", 1)[1].replace("%2B", "+")
    served.parent.mkdir(parents=True)
    served.write_bytes(payload)
    dest = checkpoint_path(entry)
    dest.parent.mkdir(parents=True)
    stale = dest.parent / f".{dest.name}.x1y2.part"
    stale.write_bytes(b"half a download")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = dest.parent / f".{dest.name}.z3w4.part"  # another process downloading right now
    fresh.write_bytes(b"in progress")

    assert fetch(NAME, mirror=base, progress=False) == dest
    assert dest.read_bytes() == payload
    assert not stale.exists()
    assert fresh.exists()

    served.unlink()  # a second call must not download
    assert fetch(NAME, mirror=base, progress=False) == dest

    dest.write_bytes(b"a different file under the published name")
    with pytest.raises(CheckpointError, match=f"expected {digest[:8]}.*--force"):
        fetch(NAME, mirror=base, progress=False)
    served.write_bytes(payload)
    fetch(NAME, mirror=base, progress=False, force=True)
    assert dest.read_bytes() == payload


def test_a_hand_placed_wrong_checkpoint_is_not_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNWS_HOME", str(tmp_path))
    placed = checkpoint_path(ZOO[NAME])
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"the 2x checkpoint, say, copied under the 1x name")
    expected = f"not the published {NAME} checkpoint.*expected {ZOO[NAME].sha256_prefix}"
    with pytest.raises(CheckpointError, match=expected):
        ensure_baked_zoo_model(NAME)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing was baked from it


def _gnws(*args: str, env_home: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GNWS_HOME": str(env_home), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "gnws.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_offline_failure_is_one_clear_sentence(tmp_path: Path) -> None:
    mirror = f"http://127.0.0.1:{_closed_port()}"
    proc = _gnws("fetch", NAME, "--mirror", mirror, env_home=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(f"gnws fetch: error: could not download {mirror}/mmdetection/v2.0/gn%2Bws/{NAME}/")
    assert "offline" in err
    assert "by hand" in err
    assert str(tmp_path / "checkpoints" / ZOO[NAME].filename) in err


def test_cli_checksum_mismatch_exits_nonzero(http_root, tmp_path: Path) -> None:
    base, root = http_root
    rel = Path(ZOO[NAME].url.split("download.openmmlab.com/", 1)[1].replace("%2B", "+"))
    (root / rel).parent.mkdir(parents=True)
    (root / rel).write_bytes(b"tampered")
    proc = _gnws("fetch", NAME, env_home=tmp_path, extra_env={"GNWS_ZOO_MIRROR": base})
    assert proc.returncode == 2
    assert "checksum mismatch" in proc.stderr
    assert not (tmp_path / "checkpoints" / ZOO[NAME].filename).exists()


def test_cli_unknown_name_suggests_close_matches(tmp_path: Path) -> None:
    proc = _gnws("fetch", "faster_rcnn_r50_fpn_gn_ws_1x", env_home=tmp_path)
    assert proc.returncode == 2
    assert "Did you mean faster_rcnn_r50_fpn_gn_ws-all_1x_coco" in proc.stderr


def test_missing_weights_message_is_shared_by_predict(tmp_path: Path) -> None:
    image = Path(__file__).parents[1] / "fixtures/images/000000020992.jpg"
    proc = _gnws("predict", str(image), "--model", NAME, env_home=tmp_path)
    assert proc.returncode == 2
    assert f"run `gnws fetch {NAME}`" in proc.stderr
    assert ZOO[NAME].url in proc.stderr
