"""One resolver from a model reference to its weights.

A model reference is what users type: a zoo key (``faster_rcnn_r50_fpn_gn_ws-all_1x_coco``), a
model-store name (a training export, ``coco-ft``), a path to a gnws ``.safetensors`` file, or a
path to an mmdetection ``.pth`` together with the zoo architecture it belongs to.
:func:`resolve_model` turns it into a :class:`ModelRef` without reading any tensor; every caller
(:meth:`models.Predictor.load`, the service's startup and reloads, ``gnws archive``, ``gnws eval``)
says which kinds it accepts and none re-implements the lookup.

Rules, in order:

1. a zoo key is :attr:`RefKind.ZOO`: its baked file in the model store, made from the cached zoo
   checkpoint on first use (:meth:`ModelRef.materialize`);
2. a reference ending in ``.safetensors`` or ``.pth``, holding a path separator, or naming an
   existing file is a file: :attr:`RefKind.FILE` (gnws) or :attr:`RefKind.MMDET` (mmdetection);
3. any other name is a model-store name, :attr:`RefKind.STORE`: the newest version of a versioned
   model (``<store>/<name>/<version>.safetensors``), else ``<store>/<name>.safetensors``.

With ``within_store=True`` (service reloads) rules 1-2 give way to the store: every reference is
a model-store name (its newest version, for a versioned model) or a file name inside the model
store (``.safetensors`` added when missing, sub-folders allowed: ``coco-ft/2`` is version 2 of
``coco-ft``), and a path that leaves the store is refused.
"""

from __future__ import annotations

import difflib
import enum
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .bake import ModelInfo, baked, load_model, read_model_info
from .detector import GNWSDetector
from .errors import CheckpointError, ModelReferenceError, UnknownModelNameError, WeightsNotFoundError
from .store import (
    MODEL_SUFFIX,
    checkpoint_path,
    convert_checkpoint,
    ensure_baked_zoo_model,
    latest_version,
    missing_weights_message,
    model_store,
    version_path,
)
from .zoo import ZOO, get_entry

MMDET_SUFFIX = ".pth"
MAX_REFERENCE_LENGTH = 1024


class RefKind(enum.StrEnum):
    """What a model reference names."""

    ZOO = "zoo"
    STORE = "store"
    FILE = "file"
    MMDET = "mmdet"


ALL_KINDS: frozenset[RefKind] = frozenset(RefKind)
BAKED_KINDS: frozenset[RefKind] = frozenset({RefKind.ZOO, RefKind.STORE, RefKind.FILE})

_DESCRIPTIONS = {
    RefKind.ZOO: "a zoo key",
    RefKind.STORE: "a model-store name",
    RefKind.FILE: "a gnws .safetensors file",
    RefKind.MMDET: "an mmdetection .pth checkpoint",
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference.

    Attributes:
        kind: what the reference named.
        name: the model's default name: the zoo key, the store name or the file stem.
        path: the file holding the weights; for a zoo key, its baked file in the model store,
            which :meth:`materialize` makes when it is missing.
        zoo_key: the zoo key (:attr:`RefKind.ZOO`) or the architecture of an mmdetection
            checkpoint (:attr:`RefKind.MMDET`).
        version: the version of a versioned model-store model (``name`` is then the model's name).
    """

    kind: RefKind
    name: str
    path: Path
    zoo_key: str | None = None
    version: int | None = None

    def materialize(self) -> Path:
        """The weights file, converting and baking a cached zoo checkpoint into the store if needed."""
        if self.kind is RefKind.ZOO and not self.path.is_file():
            return ensure_baked_zoo_model(self.zoo_key or self.name, store=self.path.parent)
        return self.path

    def read_info(self) -> ModelInfo | None:
        """The gnws metadata of the file (no tensors read); ``None`` where it does not exist yet
        (a zoo key not baked yet) or is an mmdetection checkpoint.

        Raises:
            CheckpointError: the file is not a gnws model.
        """
        if self.kind is RefKind.MMDET or not self.path.is_file():
            return None
        return read_model_info(self.path)

    def load(self) -> tuple[GNWSDetector, ModelInfo]:
        """The network (on CPU) and its metadata; mmdetection checkpoints are converted and baked."""
        if self.kind is RefKind.MMDET:
            return baked(*convert_checkpoint(self.path, self.zoo_key or ""))
        return load_model(self.materialize())


def resolve_model(
    ref: str | os.PathLike[str] | ModelRef,
    *,
    accept: Collection[RefKind] = ALL_KINDS,
    zoo_key: str | None = None,
    store: Path | None = None,
    within_store: bool = False,
) -> ModelRef:
    """Resolve ``ref`` (see the module docstring for the rules); no tensor is read.

    Args:
        accept: the kinds the caller can use; others are refused with a sentence saying what to do.
        zoo_key: the architecture of an mmdetection ``.pth`` (required for those).
        store: the model store (default: :func:`models.store.model_store`).
        within_store: only files inside the store (service reloads).

    Raises:
        WeightsNotFoundError: the file, or the zoo checkpoint behind a zoo key, is not on disk.
        UnknownModelNameError: a name that is no zoo key and not in the store (close matches named).
        ModelReferenceError: a kind not in ``accept``, a path outside the store, an unusable name.
        CheckpointError: an mmdetection ``.pth`` without ``zoo_key``.
    """
    if isinstance(ref, ModelRef):
        return _accepted(ref, accept, str(ref.path))
    text = str(ref).strip()
    if not text:
        raise ModelReferenceError("the model reference is empty: give a zoo key, a model-store name or a file")
    if len(text) > MAX_REFERENCE_LENGTH or "\0" in text:
        raise ModelReferenceError(f"{text[:100]!r}... is not a usable model reference (too long or a NUL byte)")
    root = (store or model_store()).expanduser()
    if within_store:
        return _accepted(_in_store(text, root), accept, text)
    if text in ZOO:
        resolved = _zoo(text, root)
    elif _looks_like_path(text):
        resolved = _file(Path(text).expanduser(), zoo_key)
    else:
        resolved = _store_name(text, root)
    return _accepted(resolved, accept, text)


def _looks_like_path(text: str) -> bool:
    path = Path(text)
    return path.suffix in (MODEL_SUFFIX, MMDET_SUFFIX) or os.sep in text or "/" in text or path.is_file()


def _zoo(key: str, store: Path) -> ModelRef:
    entry = get_entry(key)
    path = store / f"{entry.key}{MODEL_SUFFIX}"
    if not path.is_file() and not checkpoint_path(entry).is_file():
        raise WeightsNotFoundError(missing_weights_message(entry))
    return ModelRef(kind=RefKind.ZOO, name=entry.key, path=path, zoo_key=entry.key)


def _file(path: Path, zoo_key: str | None) -> ModelRef:
    if not path.is_file():
        raise WeightsNotFoundError(f"no model file at {path}; check the path (`gnws bake` and `gnws export` make them)")
    if path.suffix == MMDET_SUFFIX:
        if zoo_key is None:
            raise CheckpointError(
                f"{path} is an mmdetection checkpoint: say which zoo architecture it is (--model NAME)"
            )
        return ModelRef(kind=RefKind.MMDET, name=path.stem, path=path, zoo_key=get_entry(zoo_key).key)
    if path.suffix != MODEL_SUFFIX:
        raise ModelReferenceError(
            f"{path} is neither a gnws model ({MODEL_SUFFIX}) nor an mmdetection checkpoint ({MMDET_SUFFIX})"
        )
    return ModelRef(kind=RefKind.FILE, name=path.stem, path=path)


def _store_name(name: str, store: Path) -> ModelRef:
    version = latest_version(name, store)
    if version is not None:
        return ModelRef(kind=RefKind.STORE, name=name, path=version_path(name, version, store), version=version)
    path = store / f"{name}{MODEL_SUFFIX}"
    if path.is_file():
        return ModelRef(kind=RefKind.STORE, name=name, path=path)
    known = [*ZOO, *(p.stem for p in store.glob(f"*{MODEL_SUFFIX}"))] if store.is_dir() else list(ZOO)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownModelNameError(
        f"{name!r} is neither a zoo key{hint}, a model in the model store ({store}) nor a {MODEL_SUFFIX} file; "
        "see `gnws zoo`, or export a trained model with `gnws export`"
    )


def _in_store(text: str, store: Path) -> ModelRef:
    # Containment is checked on the reference as written (no "..", nothing outside the store), not on
    # where links inside the store lead: clients write references, only operators place files and links.
    root = Path(os.path.abspath(store))
    try:
        candidate = Path(text)
        if ".." in candidate.parts:
            raise ModelReferenceError(f"{text[:200]!r} is outside the model store; only files in the store can be used")
        if "/" not in text and latest_version(text, root) is not None:
            return _store_name(text, root)  # a versioned model: its newest version
        if candidate.suffix != MODEL_SUFFIX:
            candidate = candidate.with_name(candidate.name + MODEL_SUFFIX)
        path = Path(os.path.normpath(candidate if candidate.is_absolute() else root / candidate))
        inside = path.is_relative_to(root) and path != root
        exists = inside and path.is_file()
    except (ValueError, OSError) as exc:  # ".", "/", a name too long for the file system, ...
        raise ModelReferenceError(f"{text[:200]!r} is not a usable file name in the model store ({exc})") from None
    if not inside:
        raise ModelReferenceError(f"{text[:200]!r} is outside the model store; only files in the store can be used")
    relative = path.relative_to(root)
    if not exists:
        raise WeightsNotFoundError(
            f"no model file {relative} in the model store; export or bake one there first (`gnws export`, `gnws bake`)"
        )
    if len(relative.parts) == 2 and relative.stem.isdigit():  # <name>/<version>.safetensors
        return ModelRef(kind=RefKind.STORE, name=relative.parts[0], path=path, version=int(relative.stem))
    return ModelRef(kind=RefKind.STORE, name=relative.with_suffix("").as_posix(), path=path)


def _accepted(ref: ModelRef, accept: Collection[RefKind], text: str) -> ModelRef:
    if ref.kind in accept:
        return ref
    wanted = " or ".join(_DESCRIPTIONS[k] for k in RefKind if k in accept)
    fix = " (convert it first: `gnws bake SRC.pth --model NAME`)" if ref.kind is RefKind.MMDET else ""
    raise ModelReferenceError(f"{text} is {_DESCRIPTIONS[ref.kind]}{fix}; expected {wanted}")
