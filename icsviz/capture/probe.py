"""The probe batch: taking it from what the user passed, and checking it fits the model."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = ["split_probe", "num_samples", "take", "mismatch", "nonfinite"]


def _first_batch(probe: Any) -> Any:
    """One batch from a tf.data.Dataset, a PyDataset or any iterable of batches."""
    if hasattr(probe, "__getitem__") and hasattr(probe, "num_batches"):  # keras PyDataset
        return probe[0]
    return next(iter(probe))


def split_probe(probe: Any) -> tuple[Any, Any, Any]:
    """(x, y, sample_weight) from an array, an (x, y[, sample_weight]) tuple or a dataset
    yielding them; y and sample_weight may be None."""
    if probe is None:
        raise ValueError("ICSCallback needs a probe batch, e.g. probe=x_val[:512]. Received: probe=None")
    if not isinstance(probe, (tuple, list, dict, np.ndarray)) and not hasattr(probe, "shape"):
        try:
            probe = _first_batch(probe)
        except (TypeError, StopIteration) as exc:
            raise ValueError(
                "probe must be an array, an (x, y) tuple or a dataset yielding batches. "
                f"Received: probe of type {type(probe).__name__}"
            ) from exc
    if isinstance(probe, (tuple, list)) and len(probe) in (2, 3) and not isinstance(probe, np.ndarray):
        weights = _scalars_as_array(probe[2]) if len(probe) == 3 else None
        return _scalars_as_array(probe[0]), _scalars_as_array(probe[1]), weights
    if isinstance(probe, (tuple, list)) and len(probe) == 1:
        return _scalars_as_array(probe[0]), None, None
    return probe, None, None


def _scalars_as_array(part: Any) -> Any:
    """A plain list of numbers (labels as `list(y)`) as one array, as `fit` takes it; Keras
    would read the list as a structure of separate scalars."""
    if (
        isinstance(part, (list, tuple))
        and part
        and all(isinstance(v, (int, float, np.generic)) for v in part)
    ):
        return np.asarray(part)
    return part


def num_samples(x: Any) -> int:
    first = keras.tree.flatten(x)[0]
    return int(first.shape[0])


def nonfinite(part: Any, name: str) -> str | None:
    """Where the probe's `part` (its inputs or labels) holds NaN or inf, in words ("the probe's
    inputs (x) hold 8 non-finite values, in 1 of its 64 samples (sample 3)"), or None. Parts that
    are not floating-point arrays (token ids, strings) have none."""
    if part is None:
        return None
    bad_samples: np.ndarray | None = None
    count = 0
    for array in keras.tree.flatten(part):
        try:
            values = np.asarray(array)
        except Exception:  # noqa: BLE001 - a tensor numpy cannot read: Keras's own checks apply
            continue
        if values.ndim == 0 or not np.issubdtype(values.dtype, np.floating):
            continue
        bad = ~np.isfinite(values.reshape(len(values), -1))
        count += int(bad.sum())
        per_sample = bad.any(axis=1)
        bad_samples = per_sample if bad_samples is None else bad_samples | per_sample
    if not count or bad_samples is None:
        return None
    where = np.flatnonzero(bad_samples)
    first = ", ".join(str(i) for i in where[:5]) + (", ..." if len(where) > 5 else "")
    return (
        f"the probe's {name} hold {count} non-finite values, in {len(where)} of its "
        f"{len(bad_samples)} samples ({'sample' if len(where) == 1 else 'samples'} {first})"
    )


def take(x: Any, n: int) -> Any:
    return keras.tree.map_structure(lambda a: a[:n], x)


def mismatch(model: Any, x: Any) -> str | None:
    """Why the probe's inputs `x` cannot go into `model`, in words, or None when they fit (or
    when the model's inputs are several or not declared: Keras's own error then says it).

    Keras's own error for a probe of the wrong shape is a long traceback text about the
    layer it reached; this names the model and both shapes.
    """
    try:
        inputs = list(model.inputs)
    except (AttributeError, TypeError, ValueError):  # a subclassed model: no symbolic inputs
        return None
    if len(inputs) != 1 or not hasattr(x, "shape"):
        return None  # several inputs (matched by name or position): Keras's own error names them
    expected, shape = tuple(inputs[0].shape), tuple(x.shape)
    if not _fits(expected, shape):
        problem = f"model {model.name!r} takes shape {expected}, the probe's x has shape {shape}"
        if _fits(expected, (None, *shape)):
            # A dataset that yields samples, not batches: its first element is one sample.
            problem += " (one sample, not a batch: from an unbatched dataset? pass probe=dataset.batch(512))"
        return problem
    return None


def _fits(expected: tuple[int | None, ...], shape: tuple[int, ...]) -> bool:
    # Keras adds or drops a trailing axis of length 1 itself (Functional._adjust_input_rank).
    if len(shape) == len(expected) + 1 and shape[-1] == 1:
        shape = shape[:-1]
    elif len(expected) == len(shape) + 1 and expected[-1] == 1:
        expected = expected[:-1]
    return len(expected) == len(shape) and all(e is None or e == s for e, s in zip(expected[1:], shape[1:]))
