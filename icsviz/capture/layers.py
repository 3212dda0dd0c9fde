"""Which layers of a Keras model to capture, including layers of nested models.

A layer is classified by the class names in its MRO, so user subclasses of
Dense or Conv2D are recognised. The default selection keeps every layer whose
output is a hidden representation and drops the plumbing (Input, Dropout,
Flatten, Reshape, pooling, Concatenate, preprocessing).

A functional model's graph also holds the `keras.ops` called on its tensors
(`ops.relu(x)`, `x + shortcut`): Keras's summary lists them as rows of their own.
Those that stand for an activation, a normalization, attention or a merge of two
tensors are captured like the layers they stand for; the rest (`x * 2.0`,
reshapes, reductions) are plumbing, and any of them can be chosen by name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import warn_capture

__all__ = [
    "LayerFilter",
    "SelectedLayer",
    "captured_inputs",
    "classify",
    "is_composite",
    "iter_layers",
    "layer_filters",
    "recurrent_states",
    "select_layers",
]

# A filter entry: a name or glob pattern ("conv*", "block1/*"), a layer class,
# or a predicate on the layer.
LayerFilter = str | type | Callable[[Any], bool]

_LINEAR = {
    "Dense",
    "EinsumDense",
    "BaseConv",
    "BaseConvTranspose",
    "BaseSeparableConv",
    "BaseDepthwiseConv",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Embedding",
}
_NORMALIZATION = {
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "UnitNormalization",
    "RMSNormalization",
    "SpectralNormalization",
}
_ACTIVATION = {"Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax"}
_MERGE = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"}
# Recurrent layers: their hidden units are the output over every time step
# (units on the last axis); the pre-activations live inside the time loop and
# are not intercepted (docs/statistics.md).
_RECURRENT = {"RNN", "LSTM", "GRU", "SimpleRNN", "ConvLSTM", "Bidirectional"}
_ATTENTION = {"MultiHeadAttention", "GroupedQueryAttention", "Attention", "AdditiveAttention"}
# Inline operations of a functional graph (keras.ops on its tensors), by class name: they are
# not Layers, and some share a class name with a layer of another meaning (`ops.add` is "Add",
# also for `x + 1.0`), so they are classified apart (`_classify_operation`).
_OP_ACTIVATION = {
    "Celu",
    "Elu",
    "Gelu",
    "Glu",
    "HardShrink",
    "HardSigmoid",
    "HardSilu",
    "HardTanh",
    "LeakyRelu",
    "LogSigmoid",
    "LogSoftmax",
    "Mish",
    "ReLU",  # keras.activations.relu(x)
    "Relu",
    "Relu6",
    "Selu",
    "Sigmoid",
    "Silu",
    "SoftShrink",
    "Softmax",
    "Softplus",
    "Softsign",
    "SparsePlus",
    "SparseSigmoid",
    "Sparsemax",
    "Squareplus",
    "Tanh",
    "TanhShrink",
    "Threshold",
}
_OP_NORMALIZATION = {"BatchNorm", "LayerNorm", "RMSNorm", "Normalize"}
_OP_ATTENTION = {"DotProductAttention"}
_OP_MERGE = {"Add", "Subtract", "Multiply", "Maximum", "Minimum"}  # of two tensors, not a constant
# Never captured by default: they move or mask values but make no new representation.
_PLUMBING = {
    "InputLayer",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianDropout",
    "GaussianNoise",
    "AlphaDropout",
    "ActivityRegularization",
    "Flatten",
    "Reshape",
    "Permute",
    "RepeatVector",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    "BasePooling",
    "BaseGlobalPooling",
    "Concatenate",
    "Identity",
    "Masking",
    "TFSMLayer",
    "DataLayer",
    "TFDataLayer",
    "Rescaling",
    "Normalization",
    "Resizing",
    "CenterCrop",
}


@dataclass(frozen=True)
class SelectedLayer:
    """A layer chosen for capture."""

    name: str  # "layer" or "outer/inner" for a layer of a nested model
    layer: Any  # keras.layers.Layer, or an inline keras.ops Operation of a functional graph
    kind: str  # "linear", "normalization", "activation", "merge", "recurrent", "attention", "other"
    capture_preactivation: bool  # the layer applies a non-linear activation itself
    # The TimeDistributed layer this one runs inside, once per time step (a layer of the model
    # it wraps); its tensors of all the steps are recorded as one (intercept.py).
    time_distributed: Any = None

    @property
    def activation_owner(self) -> Any:
        """The layer whose `activation` is fused: a TimeDistributed's wrapped layer, else itself."""
        return _wrapped(self.layer) or self.layer


def _wrapped(layer: Any) -> Any:
    """The layer a TimeDistributed wraps, or None for any other layer."""
    return getattr(layer, "layer", None) if is_time_distributed(layer) else None


def is_time_distributed(layer: Any) -> bool:
    return "TimeDistributed" in _mro_names(layer)


def _mro_names(layer: Any) -> set[str]:
    return {cls.__name__ for cls in type(layer).__mro__}


def _is_model(layer: Any) -> bool:
    return "Model" in _mro_names(layer) or "Functional" in _mro_names(layer)


# Keras classes whose layers are recorded as one, whatever layers they hold inside (an
# attention's projections, a Bidirectional's two RNNs, an RNN's cell, a TimeDistributed's layer).
_RECORDED_AS_ONE = (
    _LINEAR | _NORMALIZATION | _ACTIVATION | _MERGE | _RECURRENT | _ATTENTION | _PLUMBING | {"Wrapper"}
)


def is_composite(layer: Any) -> bool:
    """True for a layer built from layers of its own by its author, outside Keras (a
    transformer or residual block written as a `keras.layers.Layer`, a library's block): its
    layers are recorded one by one, as a nested model's are."""
    if _is_model(layer) or is_operation(layer) or _mro_names(layer) & _RECORDED_AS_ONE:
        return False
    return type(layer).__module__.split(".")[0] != "keras" and bool(_sublayers(layer))


def _sublayers(layer: Any) -> list[Any]:
    """The layers a layer holds as attributes (or in lists of them), in the order assigned."""
    try:
        return list(layer._flatten_layers(include_self=False, recursive=False))
    except Exception:  # noqa: BLE001 - Keras internals: without them, the layer is recorded as one
        return []


def is_operation(layer: Any) -> bool:
    """True for an inline `keras.ops` operation of a functional graph (not a Layer)."""
    return "Layer" not in _mro_names(layer)


def _classify_operation(op: Any) -> str | None:
    names = _mro_names(op)
    if names & _OP_ACTIVATION:
        return "activation"
    if names & _OP_NORMALIZATION:
        return "normalization"
    if names & _OP_ATTENTION:
        return "attention"
    if names & _OP_MERGE and _tensor_arguments(op) >= 2:
        return "merge"
    return None


def _tensor_arguments(op: Any) -> int:
    """How many distinct tensors of the graph `op` takes (a constant operand is not one)."""
    try:
        return len({id(t) for t in op._inbound_nodes[0].arguments.keras_tensors})
    except Exception:  # noqa: BLE001 - Keras internals: without them, not a merge
        return 0


def classify(layer: Any) -> str | None:
    """The kind of a layer (or inline operation), or None when its output is not a hidden
    representation."""
    if is_operation(layer):
        return _classify_operation(layer)
    names = _mro_names(layer)
    if "TimeDistributed" in names and getattr(layer, "layer", None) is not None:
        # The wrapped layer applied at every time step: it makes what the wrapped layer makes.
        # A wrapped model is a nested model: its layers are recorded, its output is its last's.
        return None if _is_model(layer.layer) else classify(layer.layer)
    if names & _PLUMBING:
        return None
    if names & _NORMALIZATION:
        return "normalization"
    if names & _LINEAR:
        return "linear"
    if names & _ACTIVATION:
        return "activation"
    if names & _MERGE:
        return "merge"
    if names & _RECURRENT:
        return "recurrent"
    if names & _ATTENTION:
        return "attention"
    if getattr(layer, "trainable_weights", None):
        return "other"  # a layer with weights makes a representation
    if not type(layer).__module__.startswith("keras"):
        return "other"  # the user wrote it to compute something: keep it
    return None


def has_fused_activation(layer: Any) -> bool:
    """True when the layer calls a non-linear `self.activation` inside `call`."""
    activation = getattr(layer, "activation", None)
    if activation is None or not callable(activation):
        return False
    name = getattr(activation, "__name__", "")
    return name not in ("linear", "identity")


def _fuses(layer: Any, kind: str) -> bool:
    # An Activation layer *is* the activation: its input is already captured upstream.
    # A recurrent layer applies its activation inside the time loop, out of reach.
    # TimeDistributed(Dense(relu)) applies its wrapped layer's.
    inner = _wrapped(layer)
    if inner is not None and _is_model(inner):
        return False  # its own layers are captured one by one
    return kind not in ("activation", "recurrent") and has_fused_activation(inner or layer)


def iter_layers(model: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every layer of `model` but its inputs, depth first, nested models flattened
    with path names ("block/conv"); the layers of a model that a TimeDistributed wraps
    come before it, under its name ("frames/conv"). A functional model's inline
    operations come in graph order among its layers (`is_operation`)."""
    for name, layer, _ in _walk(model, prefix, None):
        yield name, layer


def _members(model: Any) -> list[Any]:
    """A model's layers in order; a functional model's with its inline operations among them;
    the layers a composite layer holds."""
    if "Functional" in _mro_names(model):
        operations = getattr(model, "operations", None)
        if operations is not None:
            return list(operations)
    if not _is_model(model):
        return _sublayers(model)
    return list(getattr(model, "layers", []))


def _walk(
    model: Any, prefix: str, within: Any, seen: set[int] | None = None
) -> Iterator[tuple[str, Any, Any]]:
    """`iter_layers` with the TimeDistributed each layer runs inside (None: none). A layer
    reached twice (an Embedding in the graph that a block of the user's own also holds, to tie
    its weights) comes once, where it is reached first: wrapped twice, each of its calls would
    be recorded twice."""
    seen = set() if seen is None else seen
    for layer in _members(model):
        name = f"{prefix}{layer.name}"
        if "InputLayer" in _mro_names(layer) or id(layer) in seen:
            continue  # an input is never called: it has no output to capture
        seen.add(id(layer))
        inner = _wrapped(layer)
        if _is_model(layer):
            yield from _walk(layer, f"{name}/", within, seen)
        elif is_composite(layer):
            # Its layers, then its own output: recorded where it is not one of theirs (intercept.py).
            yield from _walk(layer, f"{name}/", within, seen)
            yield name, layer, within
        elif inner is not None and _is_model(inner):
            yield from _walk(inner, f"{name}/", layer, seen)
            yield name, layer, within
        else:
            yield name, layer, within


def recurrent_states(model: Any) -> list[Any]:
    """The state variables of `model`'s stateful recurrent layers (`LSTM(stateful=True)`, a
    Bidirectional around one), in layer order. Keras keeps them outside the model's variables,
    carries them from one training batch to the next, and sizes them by the batch (the model's
    fixed batch size)."""
    states: dict[int, Any] = {}
    for _, layer in iter_layers(model):
        if getattr(layer, "stateful", False) and getattr(layer, "states", None) is not None:
            for v in _flat(layer.states):
                if hasattr(v, "assign"):  # a keras.Variable
                    states.setdefault(id(v), v)
    return list(states.values())


def _matches(entry: LayerFilter, name: str, layer: Any) -> bool:
    if isinstance(entry, str):
        short = name.rsplit("/", 1)[-1]
        return fnmatch.fnmatchcase(name, entry) or fnmatch.fnmatchcase(short, entry)
    if isinstance(entry, type):
        return isinstance(layer, entry)
    return bool(entry(layer))


def layer_filters(layers: LayerFilter | Sequence[LayerFilter] | None) -> list[LayerFilter] | None:
    """`layers` as a list of filters (one filter on its own is a list of one), each checked."""
    if layers is None:
        return None
    entries = [layers] if isinstance(layers, (str, type)) or callable(layers) else list(layers)
    for entry in entries:
        if not (isinstance(entry, (str, type)) or callable(entry)):
            raise ValueError(
                "Each layer filter entry must be a name, a glob pattern, a layer class or a "
                f"callable. Received: {entry!r}"
            )
    return entries  # type: ignore[return-value]


def select_layers(
    model: Any, layers: LayerFilter | Sequence[LayerFilter] | None = None
) -> list[SelectedLayer]:
    """The layers to capture: the default selection, or those matching `layers`.

    With an explicit filter every matching layer is captured whatever its kind
    (a Flatten or Dropout included), since the user asked for it. Entries that
    match nothing are reported in one warning that lists the model's layers.
    """
    walked = list(_walk(model, "", None))
    all_layers = [(name, layer) for name, layer, _ in walked]
    selected: list[SelectedLayer] = []
    if layers is None:
        for name, layer, within in walked:
            kind = classify(layer)
            if kind is not None:
                selected.append(SelectedLayer(name, layer, kind, _fuses(layer, kind), within))
        return selected

    entries = layer_filters(layers) or []
    used = [False] * len(entries)
    for name, layer, within in walked:
        hit = False
        for i, entry in enumerate(entries):
            if _matches(entry, name, layer):
                used[i] = True
                hit = True
        if hit:
            kind = classify(layer) or "other"
            selected.append(SelectedLayer(name, layer, kind, _fuses(layer, kind), within))
    unmatched = [entry for entry, ok in zip(entries, used) if not ok]
    if unmatched:
        warn_capture(
            f"the layer filter entries {unmatched!r} match no layer of model "
            f"{getattr(model, 'name', '?')!r}; its layers are: "
            f"{', '.join(n for n, _ in all_layers)}"
        )
    return selected


def captured_inputs(
    model: Any,
    selection: Sequence[SelectedLayer],
    captured: Sequence[str],
    aliases: dict[str, str] | None = None,
) -> dict[str, tuple[str, ...]]:
    """For each captured tensor, the captured tensors that feed it in the model's graph.

    Walks back from each call of each selected layer through layers that are not captured
    (Dropout, Flatten, pooling, Concatenate, ...), into nested models (a nested model's
    output is its last layer's) and out of them (a nested model's input is what fed that
    call of it). A layer called again is recorded as `name#2`, ...: each call is fed, and
    feeds, as its own (a layer of a nested model called twice, as a siamese network's
    encoder is, runs once per call of the model). A layer of several outputs is recorded as
    `name[k]`: the one used is named. A fused layer's output is fed by its own `:preact`. A
    composite layer's output that one of its layers made is that layer's (`aliases`: the
    Recorder's). Layers outside a functional graph (subclassed models, a composite layer's)
    get no entry; analysis then falls back on model order.
    """
    names = set(captured)
    try:
        graph = _Graph(model, selection, names, aliases or {})
    except Exception:  # noqa: BLE001 - Keras internals: nested models' calls then lead nowhere
        graph = _Graph(None, selection, names, aliases or {})
    out: dict[str, tuple[str, ...]] = {}
    calls: dict[str, list[str]] = {}  # "dense" -> ["", "#2"]: the calls recorded of each name
    for name in names:
        base, hash_mark, call = name.rpartition("#")
        if hash_mark and call.isdigit():
            calls.setdefault(base, []).append(f"#{call}")
        else:
            calls.setdefault(name, []).append("")
    for selected in selection:
        preact = f"{selected.name}:preact"
        # A fused layer's output, of every call, in a graph or not (a composite layer's, a
        # subclassed model's), is fed by its pre-activation.
        for call in calls.get(selected.name, ()):
            if f"{preact}{call}" in names:
                out[f"{selected.name}{call}"] = (f"{preact}{call}",)
        try:
            nodes = list(selected.layer._inbound_nodes)
        except Exception:  # noqa: BLE001 - Keras internals: without them, model order is the fallback
            nodes = []
        own = graph.own_nodes(selected.layer, len(nodes))
        enclosed = graph.is_enclosed(selected.layer)
        for outer_call in range(graph.calls_of_enclosing(selected.layer)):
            within = (outer_call,) if enclosed else ()
            for position, node_index in enumerate(own):
                call = outer_call * len(own) + position
                suffix = f"#{call + 1}" if call else ""
                try:
                    found = tuple(graph.sources(list(nodes[node_index].input_tensors), within))
                except Exception:  # noqa: BLE001 - Keras internals: without them, model order is the fallback
                    continue
                if f"{preact}{suffix}" in names:
                    out[f"{preact}{suffix}"] = found
                elif f"{selected.name}{suffix}" in names:
                    out[f"{selected.name}{suffix}"] = found
                else:  # a layer of several outputs (an RNN's states): each is fed by what feeds it
                    out.update({name: found for name in names if _is_output_of(name, selected.name, suffix)})
    return out


def _is_output_of(name: str, layer: str, suffix: str = "") -> bool:
    """Whether `name` is an output `layer[k]` (of the call that `suffix`, "#2", ..., names)."""
    if suffix:
        if not name.endswith(suffix):
            return False
        name = name[: -len(suffix)]
    return name.startswith(f"{layer}[") and name.endswith("]") and name[len(layer) + 1 : -1].isdigit()


class _Graph:
    """A functional model's graph as `captured_inputs` walks it: which of an operation's
    nodes are calls in this model (a layer also used by another model has nodes there too),
    the nested models' inputs and what fed them at each call, and which nested model (or
    TimeDistributed of a model) each of their layers runs inside."""

    def __init__(
        self, model: Any, selection: Sequence[SelectedLayer], names: set[str], aliases: dict[str, str]
    ) -> None:
        self.by_operation = {id(s.layer): s for s in selection}
        self.names, self.aliases = names, aliases
        self._own: dict[int, list[int]] = {}  # id(operation) -> its nodes in this model's graphs
        self._entries: dict[int, list[Any]] = {}  # id(a nested model's input) -> fed, per call
        self._enclosing: dict[int, Any] = {}  # id(layer of a nested model) -> the layer calling it
        if model is not None:
            self._read(model)

    def _read(self, model: Any) -> None:
        # A Sequential keeps its graph in a Functional of its own.
        own_nodes = getattr(model, "_nodes", None) or getattr(
            getattr(model, "_functional", None), "_nodes", ()
        )
        for key in own_nodes:  # Keras's make_node_key: f"{id(op)}_ib-{index}"
            operation, _, index = str(key).partition("_ib-")
            if operation.isdigit() and index.isdigit():
                self._own.setdefault(int(operation), []).append(int(index))
        for indices in self._own.values():
            indices.sort()  # call order (Keras keeps a model's nodes in a set), read just below
        for layer in _members(model):
            inner = layer if _is_model(layer) else _wrapped(layer)
            if inner is None or not _is_model(inner):
                continue
            inputs = _flat(inner.inputs)
            nodes = list(getattr(layer, "_inbound_nodes", []))
            for node_index in self.own_nodes(layer, len(nodes)):
                fed = list(nodes[node_index].input_tensors)
                for position, tensor in enumerate(inputs):
                    self._entries.setdefault(id(tensor), []).append(
                        fed[position] if len(fed) == len(inputs) else None
                    )
            for member in _members(inner):
                self._enclosing.setdefault(id(member), layer)
            self._read(inner)

    def own_nodes(self, operation: Any, count: int) -> list[int]:
        """The indices of `operation`'s nodes that are calls in this model, in call order."""
        return self._own.get(id(operation), list(range(count)))

    def is_enclosed(self, operation: Any) -> bool:
        return id(operation) in self._enclosing

    def calls_of_enclosing(self, operation: Any) -> int:
        """How many times the nested model `operation` runs inside is called (1 at top level)."""
        enclosing = self._enclosing.get(id(operation))
        if enclosing is None:
            return 1
        return max(1, len(self.own_nodes(enclosing, len(getattr(enclosing, "_inbound_nodes", [])))))

    def call_of(self, operation: Any, node_index: int, within: tuple[int, ...]) -> int:
        """Which call (from 0) of `operation` its node `node_index` is, inside call
        `within[-1]` of the nested model it runs in: a layer runs once per call of it."""
        own = self.own_nodes(operation, node_index + 1)
        position = own.index(node_index) if node_index in own else node_index
        return (within[-1] * len(own) if within else 0) + position

    def sources(self, tensors: list[Any], within: tuple[int, ...] = ()) -> list[str]:
        """The captured tensors that `tensors` come from, nearest first; `within`: the calls
        of the nested models the walk is inside, outermost first."""
        found: list[str] = []
        queue, seen = [(tensor, within) for tensor in tensors], set()
        while queue:
            tensor, calls = queue.pop(0)
            if tensor is None or (id(tensor), calls) in seen:
                continue
            seen.add((id(tensor), calls))
            if id(tensor) in self._entries:  # a nested model's input: what fed that call of it
                fed = self._entries[id(tensor)]
                call = calls[-1] if calls else 0
                queue.append((fed[call] if call < len(fed) else None, calls[:-1]))
                continue
            history = getattr(tensor, "_keras_history", None)
            if history is None:
                continue
            operation, node_index, tensor_index = history
            selected = self.by_operation.get(id(operation))
            if selected is not None:
                name = self._output_name(selected, self.call_of(operation, node_index, calls), tensor_index)
                if name is not None:
                    if name not in found:
                        found.append(name)
                    continue
            inner = operation if _is_model(operation) else _wrapped(operation)
            if inner is not None and _is_model(inner):  # a nested model's output: its own graph's
                call = self.call_of(operation, node_index, calls)
                queue.append((_flat(inner.outputs)[tensor_index], (*calls, call)))
                continue
            nodes = getattr(operation, "_inbound_nodes", [])
            if node_index < len(nodes):
                queue.extend((t, calls) for t in nodes[node_index].input_tensors)
        return found

    def _output_name(self, selected: SelectedLayer, call: int, index: int) -> str | None:
        """The recorded name of output `index` of call `call` (from 0) of a selected layer, if
        recorded: a layer called again is recorded as "name#2", ..."""
        name, suffix = selected.name, f"#{call + 1}" if call else ""
        for candidate in (f"{name}[{index}]{suffix}", f"{name}{suffix}"):
            if candidate in self.names:
                return candidate
            if candidate in self.aliases:
                return self.aliases[candidate]
        return None


def _flat(tensors: Any) -> list[Any]:
    if isinstance(tensors, dict):
        return list(tensors.values())
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
