"""Precision modes (fp32, bf16, fp16) and the hardware that runs each.

``fp32`` is the exact mode: what the fidelity tests compare with mmdetection, and the default.
``bf16`` and ``fp16`` are faster modes whose distance from fp32 is measured
(docs/mmdetection-fidelity.md, 'Precision modes'; docs/benchmarks.md, 'Precision modes'):

- ``bf16`` runs on CPUs with AVX-512 BF16 or AMX (oneDNN's native bf16 kernels; without them
  oneDNN emulates bf16 and is slower than fp32) and on CUDA GPUs of compute capability ≥ 8.0.
- ``fp16`` runs on CUDA only. oneDNN has fp16 conv kernels only on CPUs with AVX-512 FP16 or
  AMX-FP16, on which this package has not been measured, so fp16 on a CPU is refused.

A mode the device cannot run is refused with :class:`~models.errors.UnsupportedPrecisionError`
when the model is loaded, never replaced silently by another.

How a reduced-precision model is set up once, at load (:func:`apply_precision`), following the
usual recipe for CPU inference with oneDNN (weights converted once instead of autocast's casts in
every call; channels-last activations; PyTorch's 'CPU Performance Tuning Guide'):

1. On-the-fly WS convs are baked in fp32 first (:func:`models.bake.bake`): standardising bf16
   kernels would round before subtracting the mean.
2. Every weight is converted to the target dtype once, except the fp32 islands in
   :data:`FP32_MODULES`; on CPU the tensors go channels-last.
3. The forward pass then runs in the target dtype from the stem to the heads, with no dtype
   round trip between layers, and casts to fp32 only where the code needs it
   (:mod:`models.heads`, :mod:`models.roi_extractor`): RoIAlign samples at fp32 coordinates
   with fp32 bilinear weights (on CPU as matrix products on the bf16 features, accumulated in
   fp32; elsewhere torchvision's kernel on fp32 copies of the features); the RPN objectness
   and deltas and the R-CNN class logits and deltas come out of the fp32 islands; the mask
   logits are cast to fp32; everything after them (sigmoid/softmax, top-k, box decoding, NMS,
   rescaling, mask pasting) runs in fp32 as in the exact mode.

GroupNorm statistics are computed in fp32 in every mode: PyTorch's CPU and CUDA GroupNorm kernels
accumulate the mean and variance of bf16/fp16 inputs in fp32 (``opmath``/``acc_type``) and only
round the normalised output (``tests/models/test_precision.py`` checks it on CPU).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Literal, cast, get_args

import torch
from torch import nn

from .backbone import ContiguousGroupNorm
from .bake import bake
from .detector import GNWSDetector
from .errors import PrecisionError, UnsupportedPrecisionError

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
DTYPES: dict[Precision, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")

# Submodules kept in fp32 in bf16/fp16 mode: the last layer of the RPN and of the box head, whose
# outputs are ranked (the RPN's top 1000 of up to ~180k anchors per level, class scores) or
# decoded into boxes. Measured at full scale (docs/benchmarks.md, 'Which parts stay in fp32'):
# with bf16 RPN 1x1 convs, 64-88% of the top-1000 objectness scores of P2-P5 are tied (bf16 keeps
# 8 significant bits), so the top-k cut and the NMS order become arbitrary; in fp32, 0-0.2%, as in
# the fp32 model. They cost about 2% of a bf16 forward pass. The mask logits are not kept in fp32:
# measured, it changes neither their error nor the 28x28 mask decisions.
FP32_MODULES: tuple[str, ...] = (
    "rpn.head.cls_logits",
    "rpn.head.bbox_pred",
    "roi_heads.box_predictor",
)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def parse_precision(value: str) -> Precision:
    """Validate a precision name (``fp32``, ``bf16`` or ``fp16``; case and spaces ignored).

    Raises:
        PrecisionError: any other value.
    """
    name = str(value).strip().lower()
    if name not in PRECISIONS:
        raise PrecisionError(
            f"unknown precision {value!r}: expected one of {', '.join(PRECISIONS)} "
            "(fp32 is exact; bf16 needs a CPU with AVX-512 BF16 or AMX, or a CUDA GPU; fp16 needs a CUDA GPU)"
        )
    return cast(Precision, name)


def compute_dtype(precision: Precision) -> torch.dtype:
    """The dtype the network's layers run in for ``precision``."""
    return DTYPES[parse_precision(precision)]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 instructions oneDNN uses (AVX-512 BF16 or AMX-BF16)."""
    return torch.backends.mkldnn.is_available() and any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


def unsupported_reason(precision: Precision | str, device: str | torch.device = "auto") -> str | None:
    """Why ``device`` cannot run ``precision`` (one sentence with the fix), or ``None`` if it can.

    Raises:
        PrecisionError: ``precision`` is not a precision name.
    """
    mode = parse_precision(precision)
    dev = resolve_device(device)
    if mode == "fp32":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"precision {mode} on {dev} needs a CUDA GPU, and torch sees none; run on the CPU (device cpu)"
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            return f"precision {mode} on {dev}: there are only {count} CUDA devices; use cuda:0 to cuda:{count - 1}"
        major, minor = torch.cuda.get_device_capability(index)
        if mode == "bf16" and major < 8:
            return (
                f"precision bf16 needs a CUDA GPU of compute capability 8.0 or newer (Ampere), but "
                f"{torch.cuda.get_device_name(index)} is {major}.{minor}; use precision fp16 or fp32 on it"
            )
        return None
    if dev.type == "cpu":
        if mode == "fp16":
            return "precision fp16 runs on CUDA GPUs only; on a CPU use bf16 (AVX-512 BF16 or AMX) or fp32"
        if not torch.backends.mkldnn.is_available():
            return "precision bf16 on CPU needs a torch built with oneDNN (mkldnn), and this one is not; use fp32"
        if not any(flag in cpu_flags() for flag in CPU_BF16_FLAGS):
            where = "this CPU" if cpu_flags() else f"this machine ({CPUINFO} missing or without CPU flags)"
            return (
                f"precision bf16 on CPU needs the {' or '.join(CPU_BF16_FLAGS)} instructions, which {where} "
                "does not have (oneDNN would emulate bf16, slower than fp32); use fp32, or bf16 on a CUDA GPU"
            )
        return None
    return f"precision {mode} is available on CPU and CUDA devices only, not on {dev}; use fp32"


def check_precision(precision: Precision | str, device: str | torch.device = "auto") -> None:
    """Raise if ``device`` cannot run ``precision``; returns ``None`` if it can.

    Raises:
        PrecisionError: ``precision`` is not one of ``fp32``, ``bf16``, ``fp16``.
        UnsupportedPrecisionError: the device cannot run it (the message says why and what to use).
    """
    reason = unsupported_reason(precision, device)
    if reason is not None:
        raise UnsupportedPrecisionError(reason)


def supported_precisions(device: str | torch.device = "auto") -> tuple[Precision, ...]:
    """The precision modes ``device`` can run, ``fp32`` first."""
    return tuple(p for p in PRECISIONS if unsupported_reason(p, device) is None)


def apply_precision(
    model: GNWSDetector,
    precision: Precision | str,
    device: str | torch.device = "auto",
    *,
    keep_fp32: Collection[str] = FP32_MODULES,
    channels_last: bool | None = None,
) -> GNWSDetector:
    """Move ``model`` to ``device`` and set it up for ``precision``, in place; returns it.

    ``fp32`` only moves the model (the exact path, unchanged). ``bf16``/``fp16`` bake WS convs
    in fp32 if the model is not baked, convert every parameter to the target dtype except the
    submodules named in ``keep_fp32``, and on CPU switch to channels-last. A model already set
    up for ``precision`` is only moved.

    Args:
        model: the detector, in fp32 (as loaded).
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device: where the model will run.
        keep_fp32: qualified names of submodules kept in fp32 (default :data:`FP32_MODULES`).
        channels_last: channels-last activations; ``None`` means on CPU only (CUDA's GroupNorm
            kernel would copy every channels-last input back to contiguous).

    Raises:
        PrecisionError: unknown precision name.
        UnsupportedPrecisionError: ``device`` cannot run ``precision``.
        ValueError: a ``keep_fp32`` name is not a submodule of ``model``, or the model was set up
            for another reduced precision already (weights are rounded once; reload them).
    """
    mode = parse_precision(precision)
    dev = resolve_device(device)
    check_precision(mode, dev)
    if mode == "fp32" and model.compute_dtype == torch.float32 and not model.channels_last:
        return model.to(dev)
    if mode == "fp32":
        raise ValueError(
            f"this model was already set up for {model.compute_dtype}; reload its weights to run it in fp32 again"
        )
    if model.compute_dtype == DTYPES[mode]:  # already set up (perhaps with other islands): keep it
        return model.to(dev)
    if model.compute_dtype != torch.float32:
        raise ValueError(f"this model was already set up for {model.compute_dtype}; reload its weights for {mode}")
    unknown = sorted(set(keep_fp32) - {name for name, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"keep_fp32 names {unknown}, which are not submodules of this {model.cfg.arch} model")
    if not model.is_baked:
        logger.info("baking weight standardisation in fp32 before converting to %s", mode)
        bake(model)
    modules = dict(model.named_modules())  # after baking, which replaces the WS convs
    dtype = DTYPES[mode]
    use_channels_last = dev.type == "cpu" if channels_last is None else channels_last
    model.to(device=dev, dtype=dtype)
    for name in keep_fp32:
        modules[name].float()
    if use_channels_last:
        model.to(memory_format=torch.channels_last)
        _contiguous_group_norms(model.roi_heads)
    model.compute_dtype = dtype
    model.channels_last = use_channels_last
    return model


def _contiguous_group_norms(module: nn.Module) -> None:
    """Swap every ``nn.GroupNorm`` below ``module`` for a :class:`ContiguousGroupNorm` (in place).

    The RoI heads run their convs channels-last, like the rest of the model, but their GroupNorm
    contiguous: for 1000 maps of 7x7, PyTorch's channels-last CPU GroupNorm kernel costs more than
    the copy (measured: the box head's 4 GN layers 76 vs 9.5 + 18 ms each).
    """
    for name, child in module.named_children():
        if type(child) is nn.GroupNorm:
            setattr(module, name, ContiguousGroupNorm.from_group_norm(child))
        else:
            _contiguous_group_norms(child)
