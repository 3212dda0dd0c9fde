"""The HDF5 run layout (schema version 2), shared by writer and reader.

Nothing here imports Keras: the layout is described with plain dataclasses so
that the store, the app and the plots can use it on a machine without
TensorFlow. docs/schema.md documents every dataset this module names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "QUANTILES",
    "MOMENT_NAMES",
    "CAPTURE_KINDS",
    "STATUSES",
    "LayerSpec",
    "VariableSpec",
    "BatchLayerSpec",
    "RunLayout",
    "safe_id",
    "is_per_capture",
    "is_per_batch",
    "decode_status",
    "encode_text",
    "decode_text",
]

# 2: adds /batches, statistics of the training batches measured inside the training step.
SCHEMA_VERSION = 2

# Ioffe & Szegedy's 15/50/85 plus TensorBoard's normal bands (7..93) and the tails.
QUANTILES: tuple[float, ...] = (
    0.001,
    0.01,
    0.07,
    0.15,
    0.16,
    0.31,
    0.50,
    0.69,
    0.84,
    0.85,
    0.93,
    0.99,
    0.999,
)
MOMENT_NAMES: tuple[str, ...] = ("mean", "std", "min", "max")

# Why a capture was taken (stored per capture in /captures/kind).
CAPTURE_KINDS: dict[str, int] = {"start": 0, "epoch": 1, "step": 2}

# Values of /status: "training" while the writer is open, then one of the others.
STATUSES: tuple[str, ...] = ("training", "complete", "interrupted")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_id(index: int, name: str) -> str:
    """A stable HDF5-safe group name: zero-padded index plus the sanitized name.

    The index keeps ids unique and ordered even when two names sanitize alike;
    the original name is kept as an attribute, never used as a path.
    """
    clean = _UNSAFE.sub("_", name).strip("._") or "unnamed"
    return f"{index:03d}_{clean[:80]}"


def is_per_capture(path: str, maxshape: tuple[int | None, ...]) -> bool:
    """True for a dataset with one row per probe capture (everything that grows, but the
    history and the training-batch rows)."""
    return maxshape[:1] == (None,) and not path.lstrip("/").startswith(("history/", "batches/"))


def is_per_batch(path: str, maxshape: tuple[int | None, ...]) -> bool:
    """True for a dataset with one row per recorded training step (under /batches)."""
    return maxshape[:1] == (None,) and path.lstrip("/").startswith("batches/")


def encode_text(value: str) -> np.bytes_:
    """A text attribute as fixed-length UTF-8 bytes.

    h5py stores a Python str as a variable-length string, whose bytes live in
    HDF5's global heap: the one structure without checksums, and a zeroed block
    there sends the library into an endless loop. Fixed-length bytes live in the
    (checksummed) object header or dense attribute storage instead.
    """
    return np.bytes_(value.encode("utf-8"))


def decode_text(value: Any) -> Any:
    """The str of a text attribute (fixed-length bytes now, variable-length str in older files)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def decode_status(raw: bytes) -> str:
    """The value of /status; ValueError for anything but a known status (a damaged byte in old files)."""
    value = bytes(raw).decode("utf-8", "replace")
    if value not in STATUSES:
        raise ValueError(f"unknown status {value!r}")
    return value


@dataclass(frozen=True)
class LayerSpec:
    """One captured tensor: a layer output (or a fused layer's pre-activation)."""

    name: str  # original Keras name, with the nested path ("block/conv") if nested
    class_name: str
    kind: str  # "linear", "preactivation", "normalization", "activation", "merge", "other"
    output_shape: tuple[int, ...]  # without the batch axis
    n_units: int  # Dense units or conv channels
    tracked_units: tuple[int, ...]  # units whose own quantiles are recorded
    n_values: int  # values counted per capture in histogram and moments
    samples: int  # the probe samples they come from
    quantile_sample: int  # values the layer quantiles are computed from
    # How n_values were chosen: "all", "rows" (a fixed random sample of (sample, position)
    # rows, since 2026-11-26) or "first samples" (the first `samples` whole, before). Not part
    # of a layout's identity: a layer measured whole then and now still resumes.
    value_sample: str = field(default="first samples", compare=False)
    # Captured tensors that feed this one (model graph, through uncaptured layers); not part
    # of a layout's identity, so runs recorded before it was kept still resume.
    inputs: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class VariableSpec:
    """One trainable variable, for gradient and weight statistics."""

    name: str  # the variable path ("conv2d/kernel")
    layer: str  # the owning layer's name (same naming as LayerSpec.name)
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BatchLayerSpec:
    """A layer whose training-batch statistics are recorded at every step (per-step mode).

    `index` is the layer's index in `RunLayout.layers` (same group id under /batches/layers).
    """

    name: str
    index: int
    n_units: int
    tracked_units: tuple[int, ...]
    sample: int  # values sampled per step for the histogram, quantiles and zero fraction
    unit_sample: int  # values sampled per tracked unit for its quantiles


@dataclass(frozen=True)
class RunLayout:
    """Everything that fixes a run file's datasets and their shapes.

    Two runs can be appended to one file only when their layouts are equal.
    """

    layers: tuple[LayerSpec, ...]
    variables: tuple[VariableSpec, ...]
    ics_layers: tuple[str, ...] = ()  # layers whose gradient shift is recorded
    hist_bins: int = 64
    quantiles: tuple[float, ...] = QUANTILES
    moment_names: tuple[str, ...] = MOMENT_NAMES
    tracked_quantiles: tuple[float, ...] = field(default=QUANTILES)
    batch_layers: tuple[BatchLayerSpec, ...] = ()  # per-step mode: empty when off

    def layer_ids(self) -> list[str]:
        return [safe_id(i, spec.name) for i, spec in enumerate(self.layers)]

    def variable_ids(self) -> list[str]:
        return [safe_id(i, spec.name) for i, spec in enumerate(self.variables)]

    def ics_ids(self) -> list[str]:
        return [safe_id(i, name) for i, name in enumerate(self.ics_layers)]

    def describe_difference(self, other: RunLayout) -> str | None:
        """A human sentence saying how `other` differs, or None when equal."""
        if self == other:
            return None
        mine = [spec.name for spec in self.layers]
        theirs = [spec.name for spec in other.layers]
        if mine != theirs:
            return f"captured layers differ: {mine} vs {theirs}"
        for a, b in zip(self.layers, other.layers):
            if a != b:
                return f"layer {a.name!r} differs: {a} vs {b}"
        if self.variables != other.variables:
            return "trainable variables differ"
        if self.ics_layers != other.ics_layers:
            return "gradient-shift (ICS) layers differ"
        if self.batch_layers != other.batch_layers:
            return "the per-step (batch_stats) layers differ"
        return "histogram bins or quantile levels differ"
