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

On TensorFlow, whose `tf.nn.l2_loss` sums squares in one pass over a tensor where squaring then
summing reads it twice and writes it once (`backend.sum_of_squares`), a large tensor (`LARGE`
values or more: the reference CNN's 1.2 M-value dense kernel, a few of a deep model's) is
measured on its own, from its slice of the vector. The large tensors lie after the small ones,
whose blocks stay one reduction. The reference CNN's capture took 1.0-1.6 ms less in runs of
`benchmarks/norms_one_pass.py` (its training step is 45-50 ms); a deep model's kernel count
hardly changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from . import backend

__all__ = ["FlatLayout", "l2", "l2_norms"]

ops = keras.ops

BLOCK = 1024  # values per block: small enough that tiny tensors (biases) waste little padding
# Values from which a tensor is large: laid out after the small ones, and where the backend sums
# squares in one pass (`backend.sum_of_squares`) its norm is taken on its own (`FlatLayout.norms`).
LARGE = 2**16


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class FlatLayout:
    """Where each of a fixed list of tensors lies in the flat vector (`slices`), and which
    tensor each block of `BLOCK` values belongs to (`owners`). Padding is zeros. The small
    tensors come first, in their order, the large ones after them (`order`)."""

    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[tuple[int, int], ...]  # (start, end) of each tensor's values
    owners: np.ndarray  # (size // BLOCK,) int32: each block's tensor, in order
    size: int  # the flat vector's length, a multiple of BLOCK
    order: tuple[int, ...]  # the tensors in the vector's order
    small_size: int  # the values of the small tensors' blocks, at the vector's start

    @classmethod
    def of(cls, shapes: Sequence[Sequence[int]]) -> FlatLayout:
        shapes = tuple(tuple(int(d) for d in shape) for shape in shapes)
        counts = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
        blocks = [max(1, -(-count // BLOCK)) for count in counts]  # an empty tensor keeps a block
        order = tuple(sorted(range(len(shapes)), key=lambda i: counts[i] >= LARGE))  # stable
        starts = np.zeros(len(shapes), dtype=np.int64)
        starts[list(order)] = np.cumsum([0, *(blocks[i] for i in order[:-1])], dtype=np.int64) * BLOCK
        return cls(
            shapes=shapes,
            slices=tuple((int(s), int(s) + count) for s, count in zip(starts, counts)),
            owners=np.repeat(np.asarray(order, dtype="int32"), [blocks[i] for i in order]),
            size=int(sum(blocks)) * BLOCK,
            order=order,
            small_size=sum(blocks[i] for i in order if counts[i] < LARGE) * BLOCK,
        )

    @property
    def large(self) -> list[int]:
        """The large tensors, in order: those laid out after the small ones' blocks."""
        return [i for i in self.order if self.slices[i][0] >= self.small_size]

    def pack(self, tensors: Sequence[Any]) -> Any:
        """`tensors` (these shapes, in their order) as one new float32 vector of `size` values."""
        if not self.shapes:
            return ops.zeros((0,), "float32")
        pieces = []
        next_starts = [self.slices[i][0] for i in self.order[1:]] + [self.size]
        for i, next_start in zip(self.order, next_starts):
            pieces.append(ops.reshape(ops.cast(tensors[i], "float32"), (-1,)))
            if next_start > self.slices[i][1]:
                pieces.append(ops.zeros((next_start - self.slices[i][1],), "float32"))
        flat = ops.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        # One tensor without padding: the concatenation is the input itself, which JAX would
        # hand back as a result aliasing an argument the training step donates.
        return backend.copies([flat])[0] if len(pieces) == 1 else flat

    def norms(self, flat: Any) -> Any:
        """(n,) float32: each tensor's L2 norm, from a packed vector (or a difference of two)."""
        if not self.shapes:
            return ops.zeros((0,), "float32")
        n = len(self.shapes)
        if not backend.squares_summed_in_one_pass() or self.small_size == self.size:
            return ops.sqrt(_block_sums(flat, self.owners, n))
        # Large tensors one by one, each read once from its slice (a view: it starts a block);
        # the small ones by blocks, from the vector's start.
        large = self.large
        sums = ops.stack([backend.sum_of_squares(flat[self.slices[i][0] : self.slices[i][1]]) for i in large])
        if len(large) < n:  # (all large: in their own order already)
            small = _block_sums(flat[: self.small_size], self.owners[: self.small_size // BLOCK], n)
            sums = small + ops.scatter(np.asarray(large, "int32")[:, None], sums, (n,))
        return ops.sqrt(sums)


def _block_sums(flat: Any, owners: np.ndarray, n: int) -> Any:
    """(n,): each tensor's sum of squares, from the blocks of `flat` (`owners`: each block's)."""
    block_sums = ops.sum(ops.square(ops.reshape(flat, (-1, BLOCK))), axis=1)
    return ops.segment_sum(block_sums, ops.convert_to_tensor(owners), num_segments=n)


def l2(x: Any) -> Any:
    """The L2 norm of every value of `x`, in float32 (a scalar)."""
    return ops.sqrt(backend.sum_of_squares(ops.cast(x, "float32")))


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
        parts.append(ops.stack([l2(tensors[i]) for i in large]))
    norms = ops.concatenate(parts) if len(parts) > 1 else parts[0]
    order = np.argsort(np.asarray(small + large, "int32")).astype("int32")
    return norms if (order == np.arange(len(order))).all() else backend.gather(norms, order)
