"""Many tensors as one flat vector, and each tensor's L2 norm taken from it.

A capture measures the norm of every trainable variable three times (its weights, its
gradient, its update since the last capture). One reduction per variable, and a slice of the
last capture's weights per variable for the update, made MobileNetV2's capture (158
variables) about 900 more kernels for XLA to compile. Here the tensors are laid end to end,
each padded with zeros to a whole number of blocks, so that one reduction sums every block
and one segment sum adds up each tensor's blocks: a handful of kernels, whatever the depth
(the weights and the updates; the gradients go through `l2_norms`). Compiling MobileNetV2's
capture with JAX on a CPU went from about 10 s to about 8 s.

Summing blocks first keeps the accuracy of a per-tensor reduction: a segment sum over every
value would accumulate a million-value kernel in order (1e-3 off); here each tensor's sum
adds at most a few thousand block sums.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from . import backend

__all__ = ["FlatLayout", "l2_norms"]

ops = keras.ops

BLOCK = 1024  # values per block: small enough that tiny tensors (biases) waste little padding


@dataclasses.dataclass(frozen=True, eq=False)  # holds an array: compared by identity
class FlatLayout:
    """Where each of a fixed list of tensors lies in the flat vector (`slices`), and which
    tensor each block of `BLOCK` values belongs to (`owners`). Padding is zeros."""

    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[tuple[int, int], ...]  # (start, end) of each tensor's values
    owners: np.ndarray  # (size // BLOCK,) int32: each block's tensor, in order
    size: int  # the flat vector's length, a multiple of BLOCK

    @classmethod
    def of(cls, shapes: Sequence[Sequence[int]]) -> FlatLayout:
        shapes = tuple(tuple(int(d) for d in shape) for shape in shapes)
        counts = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
        blocks = [max(1, -(-count // BLOCK)) for count in counts]  # an empty tensor keeps a block
        starts = np.cumsum([0, *blocks[:-1]], dtype=np.int64) * BLOCK
        return cls(
            shapes=shapes,
            slices=tuple((int(s), int(s) + count) for s, count in zip(starts, counts)),
            owners=np.repeat(np.arange(len(shapes), dtype="int32"), blocks),
            size=int(sum(blocks)) * BLOCK,
        )

    def pack(self, tensors: Sequence[Any]) -> Any:
        """`tensors` (these shapes) as one new float32 vector of `size` values."""
        if not self.shapes:
            return ops.zeros((0,), "float32")
        pieces = []
        ends = [end for _, end in self.slices]
        next_starts = [start for start, _ in self.slices[1:]] + [self.size]
        for tensor, end, next_start in zip(tensors, ends, next_starts):
            pieces.append(ops.reshape(ops.cast(tensor, "float32"), (-1,)))
            if next_start > end:
                pieces.append(ops.zeros((next_start - end,), "float32"))
        flat = ops.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        # One tensor without padding: the concatenation is the input itself, which JAX would
        # hand back as a result aliasing an argument the training step donates.
        return backend.copies([flat])[0] if len(pieces) == 1 else flat

    def norms(self, flat: Any) -> Any:
        """(n,) float32: each tensor's L2 norm, from a packed vector (or a difference of two)."""
        if not self.shapes:
            return ops.zeros((0,), "float32")
        block_sums = ops.sum(ops.square(ops.reshape(flat, (-1, BLOCK))), axis=1)
        owners = ops.convert_to_tensor(self.owners)
        sums = ops.segment_sum(block_sums, owners, num_segments=len(self.shapes))
        return ops.sqrt(sums)


def l2_norms(tensors: Sequence[Any]) -> Any:
    """(n,) float32: each tensor's L2 norm, for tensors that are not packed already (gradients).

    Tensors of rank 1 or less (biases, normalization scales: most of a deep model's variables)
    are packed and measured together. The others each keep a reduction of their own: packing
    a kernel's gradient copies it into the flat layout, while a reduction reads it in whatever
    layout the backward pass left it: packing every gradient made the BN CNN's capture 12-16 ms
    slower (of 210 ms, JAX on a CPU), this way it is not.
    """
    if not tensors:
        return ops.zeros((0,), "float32")
    small = [i for i, t in enumerate(tensors) if len(t.shape) <= 1]
    large = [i for i, t in enumerate(tensors) if len(t.shape) > 1]
    parts = []
    if small:
        layout = FlatLayout.of([tensors[i].shape for i in small])
        parts.append(layout.norms(layout.pack([tensors[i] for i in small])))
    if large:
        parts.append(
            ops.sqrt(ops.stack([ops.sum(ops.square(ops.cast(tensors[i], "float32"))) for i in large]))
        )
    norms = ops.concatenate(parts) if len(parts) > 1 else parts[0]
    order = np.argsort(np.asarray(small + large, "int32")).astype("int32")
    return norms if (order == np.arange(len(order))).all() else backend.gather(norms, order)
