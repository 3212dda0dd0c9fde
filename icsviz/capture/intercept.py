"""Interception: collect the tensors the selected layers produce during one call.

Each selected layer's `call` (and, for a layer with a fused activation, its
`activation`) is wrapped while a function is traced, then restored. That works
for Sequential, functional, nested and subclassed models alike, and inside any
function that calls the model: the capture program's probe pass and, in the
per-step mode, the user's own training step.

A layer that cannot be wrapped (an `activation` that is a read-only property,
an object that refuses new attributes) loses only what could not be wrapped,
with one `CaptureWarning` naming it; every other layer is still recorded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from ..errors import warn_capture
from . import backend
from .layers import SelectedLayer, is_composite, is_time_distributed
from .monotone import RangeMap, activation_map, layer_map

__all__ = ["PREACT", "Record", "Recorder", "intercept", "is_float_tensor", "warn_once"]

PREACT = ":preact"  # the suffix of a fused layer's pre-activation: "dense:preact" (before "#2")

_warned: set[str] = set()
Mapped = tuple[Any, RangeMap] | None  # (input, exact monotone map): see monotone.py
# One interception at a time in the process: the JAX first capture may trace (its masked
# program) on its own thread while the training thread traces the per-step mode's step.
_one_at_a_time = threading.RLock()


def warn_once(key: str, message: str) -> None:
    """One CaptureWarning per layer and reason for the life of the process (traces repeat)."""
    if key in _warned:
        return
    _warned.add(key)
    warn_capture(message)


@dataclass
class Record:
    """One captured tensor: which layer made it, a suffix for its role, its kind; and, for an
    exact monotone map of another record's tensor (monotone.py), that record and the map."""

    layer: SelectedLayer
    tensor: Any
    suffix: str
    kind: str
    range_source: int | None = None  # index in Recorder.records
    range_map: RangeMap | None = None

    @property
    def name(self) -> str:
        return self.layer.name + self.suffix


_FrameKey = tuple[int, str, str]  # (id of the layer, tag, output index): one tensor of each step


@dataclass
class _Frames:
    """What the layers inside one TimeDistributed call made, step by step, until it returns."""

    static: bool  # a known number of steps: Keras calls the wrapped layer once per step
    tensors: dict[_FrameKey, list[Any]] = field(default_factory=dict)  # in call order
    made_by: dict[_FrameKey, tuple[SelectedLayer, str]] = field(default_factory=dict)

    def hold(self, key: _FrameKey, tensor: Any, selected: SelectedLayer, kind: str) -> None:
        self.tensors.setdefault(key, []).append(tensor)
        self.made_by.setdefault(key, (selected, kind))

    def made_again(self) -> dict[_FrameKey, _FrameKey]:
        """A composite layer's output that one of its own layers made, at every step (the same
        tensors): its key -> that layer's, whose record stands for both."""
        first: dict[tuple[int, ...], _FrameKey] = {}
        again: dict[_FrameKey, _FrameKey] = {}
        for key, tensors in self.tensors.items():
            steps = tuple(id(tensor) for tensor in tensors)
            if steps in first and is_composite(self.made_by[key][0].layer):
                again[key] = first[steps]
            else:
                first.setdefault(steps, key)
        return again


@dataclass
class Recorder:
    """Collects the tensors produced by the selected layers during one call."""

    records: list[Record] = field(default_factory=list)
    calls: dict[int, int] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)  # id(tensor) -> its record's index
    # A composite layer's output that one of its own layers made: its name -> that record's name.
    aliases: dict[str, str] = field(default_factory=dict)
    _frames: list[_Frames] = field(default_factory=list)  # TimeDistributed calls under way, innermost last

    def add(
        self, selected: SelectedLayer, outputs: Any, kind: str, tag: str = "", mapped_from: Mapped = None
    ) -> None:
        """Record `outputs`; `mapped_from`: (input, map) when a single output is that map of
        the input elementwise, noted when the input is itself recorded."""
        flat = keras.tree.flatten(outputs)
        if flat and not any(is_float_tensor(tensor) for tensor in flat):
            dtypes = ", ".join(sorted({_dtype_name(t) for t in flat}))
            warn_once(
                f"dtype:{selected.name}",
                f"layer {selected.name!r} is not recorded: its output is {dtypes}, and only "
                "floating-point outputs have a distribution to measure. Every other layer is.",
            )
            return
        if self._frames:  # one step of a TimeDistributed: kept until all its steps are made
            for i, tensor in enumerate(flat):
                if is_float_tensor(tensor):
                    key = (id(selected.layer), tag, f"[{i}]" if len(flat) > 1 else "")
                    self._frames[-1].hold(key, tensor, selected, kind)
            return
        # A shared layer called n times yields "name", "name#2", ...; the
        # pre-activation of call n is recorded before its output, with the same suffix.
        call_suffix = self._call_suffix(selected.layer)
        if not tag:
            self.calls[id(selected.layer)] = self.calls.get(id(selected.layer), 0) + 1
        composite = is_composite(selected.layer)
        for i, tensor in enumerate(flat):
            if not is_float_tensor(tensor):
                continue
            index = f"[{i}]" if len(flat) > 1 else ""
            if composite and id(tensor) in self.positions:  # the same values twice: kept once
                made = self.records[self.positions[id(tensor)]]
                self.aliases.setdefault(f"{selected.name}{tag}{index}{call_suffix}", made.name)
                continue
            record = Record(selected, tensor, f"{tag}{index}{call_suffix}", kind)
            if mapped_from is not None and len(flat) == 1 and id(mapped_from[0]) in self.positions:
                record.range_source = self.positions[id(mapped_from[0])]
                record.range_map = mapped_from[1]
            self._keep(record)

    def _call_suffix(self, layer: Any) -> str:
        """ "#n" for the n-th call of a layer (n > 1), "" for its first."""
        count = self.calls.get(id(layer), 0)
        return f"#{count + 1}" if count else ""

    def _keep(self, record: Record) -> None:
        self.positions.setdefault(id(record.tensor), len(self.records))
        self.records.append(record)

    def drop_unreachable(self) -> list[str]:
        """Drop the records made inside a loop or branch of a layer's `call` (backend.reachable),
        which cannot be used where the call returned; their names, for the caller's warning."""
        usable = backend.reachable()
        reachable = [usable(record.tensor) for record in self.records]
        if all(reachable):
            return []
        kept = [i for i, ok in enumerate(reachable) if ok]
        dropped = [record.name for record, ok in zip(self.records, reachable) if not ok]
        index = {old: new for new, old in enumerate(kept)}
        records = [self.records[i] for i in kept]
        for record in records:  # a range taken from a dropped record is measured instead
            if record.range_source is not None:
                record.range_source = index.get(record.range_source)
                if record.range_source is None:
                    record.range_map = None
        self.records = records
        self.positions = {}
        for i, record in enumerate(records):
            self.positions.setdefault(id(record.tensor), i)
        return dropped

    def enter_frames(self, static: bool) -> None:
        """A TimeDistributed call begins: what the layers inside it make is held per step."""
        self._frames.append(_Frames(static))

    def leave_frames(self) -> list[str]:
        """It returned: each tensor of its steps joined along the batch axis (every step of
        every sample is a value, as for a recurrent layer's outputs) and recorded as one. With
        an unknown number of steps Keras maps the wrapped layer over them (vectorized), and
        the tensors made inside cannot be used outside: nothing is recorded, and the names
        left out are returned for the caller's warning."""
        frames = self._frames.pop()
        if not frames.static:
            return list(dict.fromkeys(made.name + tag for (_, tag, _), (made, _) in frames.made_by.items()))
        joined = {
            key: tensors[0] if len(tensors) == 1 else keras.ops.concatenate(tensors, axis=0)
            for key, tensors in frames.tensors.items()
        }
        if self._frames:  # inside another TimeDistributed: one step of that one
            for key, tensor in joined.items():
                self._frames[-1].hold(key, tensor, *frames.made_by[key])
            return []

        def name(key: _FrameKey) -> str:
            selected, (_, tag, index) = frames.made_by[key][0], key
            return f"{selected.name}{tag}{index}{self._call_suffix(selected.layer)}"

        made_again = frames.made_again()
        for key, tensor in joined.items():
            if key in made_again:  # the same values twice: kept once, as in `add`
                self.aliases.setdefault(name(key), name(made_again[key]))
                continue
            selected, kind = frames.made_by[key]
            self._keep(Record(selected, tensor, name(key).removeprefix(selected.name), kind))
        for layer_id in dict.fromkeys(layer_id for layer_id, tag, _ in joined if not tag):
            self.calls[layer_id] = self.calls.get(layer_id, 0) + 1
        return []


def is_float_tensor(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    try:
        return "float" in keras.backend.standardize_dtype(dtype)
    except ValueError:  # a dtype Keras does not know (strings, resources)
        return False


def _dtype_name(x: Any) -> str:
    """ "int32" whatever the backend calls it (TensorFlow: "<dtype: 'int32'>")."""
    try:
        return keras.backend.standardize_dtype(x.dtype)
    except (AttributeError, ValueError):
        return type(x).__name__


def _settable(obj: Any, attr: str) -> bool:
    """Whether `attr` can be shadowed on the instance (not a read-only property)."""
    descriptor = getattr(type(obj), attr, None)
    if isinstance(descriptor, property):
        return False
    return hasattr(obj, "__dict__")


@contextlib.contextmanager
def intercept(selection: Sequence[SelectedLayer], recorder: Recorder) -> Iterator[None]:
    """Wrap the selected layers' `call` (and fused activations) for the duration.

    Only calls on this thread are recorded: another thread that calls the model meanwhile
    (Keras tracing its own step while a capture compiles beside it) passes straight through.
    """
    with _one_at_a_time:
        with _intercepting(selection, recorder, threading.get_ident()):
            yield
        dropped = recorder.drop_unreachable()
        if dropped:
            fix = (
                "A model built inside keras.RematScope is rematerialized as a whole: build the model "
                "outside the scope and its layers inside it, and their outputs are recorded."
                if not recorder.records
                else "The layer's own output is recorded, and every other layer."
            )
            warn_once(
                "unreachable:" + ",".join(dropped),
                f"{', '.join(repr(name) for name in dropped)} not recorded: made inside a loop or a "
                "branch (keras.ops.fori_loop, scan, while_loop, cond) of a layer's `call`, or inside a "
                f"rematerialized call (keras.RematScope), where they cannot be taken out. {fix}",
            )


@contextlib.contextmanager
def _intercepting(selection: Sequence[SelectedLayer], recorder: Recorder, owner: int) -> Iterator[None]:
    restore: list[tuple[Any, str, bool, Any]] = []

    def patch(obj: Any, attr: str, new: Any) -> bool:
        if not _settable(obj, attr):
            return False
        had = attr in obj.__dict__
        old = obj.__dict__.get(attr)
        try:
            object.__setattr__(obj, attr, new)
        except (AttributeError, TypeError):
            return False
        restore.append((obj, attr, had, old))
        return True

    # A fused activation's (input, output) in the call under way, by layer: the layer's output
    # is that output exactly when `call` returns it unchanged.
    fused: dict[int, tuple[Any, Any]] = {}

    # TimeDistributed layers first: their own `call` then runs inside the wrapper that records
    # their output, and that output is recorded after their steps are joined.
    for wrapper in _time_distributed(selection):
        original_call = wrapper.call

        def frames_call(
            inputs: Any, *args: Any, _orig: Any = original_call, _td: Any = wrapper, **kwargs: Any
        ) -> Any:
            if threading.get_ident() != owner:
                return _orig(inputs, *args, **kwargs)
            recorder.enter_frames(_steps_known(inputs))
            try:
                return _orig(inputs, *args, **kwargs)
            finally:
                _leave_frames(recorder, _td)

        if not patch(wrapper, "call", frames_call):
            warn_once(
                f"frames:{wrapper.name}",
                f"the layers inside TimeDistributed {wrapper.name!r} are recorded once per time step "
                "(name#2, name#3, ...): its `call` cannot be wrapped to join the steps.",
            )

    for selected in selection:
        layer = selected.layer
        original_call = layer.call
        kind = selected.kind if not selected.capture_preactivation else "activation"
        own_map, fused_map = _range_maps(selected, original_call)

        def recorded(
            out: Any,
            args: tuple[Any, ...],
            _sel: SelectedLayer = selected,
            _kind: str = kind,
            _own_map: RangeMap | None = own_map,
            _fused_map: RangeMap | None = fused_map,
        ) -> Any:
            if threading.get_ident() == owner:
                pre, post = fused.pop(id(_sel.layer), (None, None))
                mapped: Mapped = None
                if _own_map is not None and args:
                    mapped = (args[0], _own_map)
                elif _fused_map is not None and post is out:
                    mapped = (pre, _fused_map)
                _record(recorder, _sel, out, _kind, mapped_from=mapped)
            return out

        call = _recording(original_call, recorded)
        if getattr(layer, "_remat_mode", None) is not None:
            _record_outside_remat(layer, call, original_call, recorded, patch)
        if not patch(layer, "call", call):
            warn_once(
                f"call:{selected.name}",
                f"layer {selected.name!r} ({type(layer).__name__}) is not recorded: its `call` "
                "cannot be wrapped. Every other layer is.",
            )
            continue
        if getattr(layer, "quantization_mode", None) is not None:
            # A quantized layer (`model.quantize("int8")`): Keras calls its `quantized_call`
            # instead of `call`.
            patch(layer, "quantized_call", _recording(layer.quantized_call, recorded))
        if selected.capture_preactivation:
            layer = selected.activation_owner  # a TimeDistributed's wrapped layer applies it
            original_activation = layer.activation

            def activation(x: Any, _orig: Any = original_activation, _sel: SelectedLayer = selected) -> Any:
                if threading.get_ident() != owner:
                    return _orig(x)
                _record(recorder, _sel, x, "preactivation", tag=PREACT)
                out = _orig(x)
                fused[id(_sel.layer)] = (x, out)
                return out

            if not patch(layer, "activation", activation):
                warn_once(
                    f"activation:{selected.name}",
                    f"the pre-activation of layer {selected.name!r} ({type(layer).__name__}) is not "
                    "recorded: its `activation` cannot be replaced. Its output is.",
                )
    try:
        yield
    finally:
        for obj, attr, had, value in reversed(restore):
            if had:
                object.__setattr__(obj, attr, value)
            else:
                object.__delattr__(obj, attr)


def _recording(original: Any, recorded: Any) -> Any:
    """`original` (a layer's `call` or `quantized_call`) with its output handed to `recorded`."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return recorded(original(*args, **kwargs), args)

    return call


def _record_outside_remat(layer: Any, call: Any, original_call: Any, recorded: Any, patch: Any) -> None:
    """A layer rematerialized (`keras.RematScope`) runs its `call` inside `jax.checkpoint`,
    whose tensors cannot be taken out: record its output where the checkpointed call returns.
    (Its fused pre-activation stays inside and is left out: `Recorder.drop_unreachable`.)"""
    original_remat = layer.rematerialized_call

    def rematerialized_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn is not call:  # quantized_call: as Keras would
            return original_remat(fn, *args, **kwargs)
        checkpointed = original_remat(original_call, *args, **kwargs)
        if checkpointed is original_call:  # not rematerialized this time: recorded inside
            return call

        def call_then_record(*a: Any, **kw: Any) -> Any:
            return recorded(checkpointed(*a, **kw), a)

        return call_then_record

    patch(layer, "rematerialized_call", rematerialized_call)


def _time_distributed(selection: Sequence[SelectedLayer]) -> list[Any]:
    """The TimeDistributed layers whose steps make recorded tensors: those selected and those
    that selected layers run inside, each once, outermost first."""
    found: dict[int, Any] = {}
    for selected in selection:
        for layer in (selected.time_distributed, selected.layer):
            if layer is not None and is_time_distributed(layer):
                found.setdefault(id(layer), layer)
    return list(found.values())


def _steps_known(inputs: Any) -> bool:
    """Whether Keras's TimeDistributed will loop over the steps in Python (a static time
    axis), rather than map the wrapped layer over them (vectorized)."""
    try:
        first = keras.tree.flatten(inputs)[0]
        return first.shape[1] is not None
    except (AttributeError, IndexError, TypeError):
        return False


def _leave_frames(recorder: Recorder, wrapper: Any) -> None:
    # Our bookkeeping must never break the user's forward pass.
    try:
        left_out = recorder.leave_frames()
    except Exception as exc:  # noqa: BLE001
        warn_once(
            f"frames:{wrapper.name}",
            f"the layers inside TimeDistributed {wrapper.name!r} are not recorded ({type(exc).__name__}: {exc}).",
        )
        return
    if left_out:
        warn_once(
            f"frames:{wrapper.name}",
            f"{', '.join(repr(name) for name in left_out)} not recorded: TimeDistributed "
            f"{wrapper.name!r} maps the layer it wraps over a time axis of unknown length (vectorized), "
            "and the tensors made inside cannot be taken out. Give the model's input a fixed number "
            f"of steps to record them; {wrapper.name!r}'s own output is recorded.",
        )


def _range_maps(selected: SelectedLayer, call: Any) -> tuple[RangeMap | None, RangeMap | None]:
    """The exact monotone map the layer's `call` is, and the one its fused activation is (if
    any): None where unknown, and never an error (odd attributes only cost the shortcut)."""
    try:
        own = layer_map(selected.layer, call)
        fused = (
            activation_map(selected.activation_owner.activation) if selected.capture_preactivation else None
        )
    except Exception:  # noqa: BLE001 - the range is then measured over the values themselves
        return None, None
    return own, fused


def _record(
    recorder: Recorder,
    selected: SelectedLayer,
    outputs: Any,
    kind: str,
    tag: str = "",
    mapped_from: Mapped = None,
) -> None:
    # Our bookkeeping must never break the user's forward pass.
    try:
        recorder.add(selected, outputs, kind, tag, mapped_from)
    except Exception as exc:  # noqa: BLE001
        warn_once(
            f"record:{selected.name}",
            f"layer {selected.name!r} is not recorded ({type(exc).__name__}: {exc}).",
        )
