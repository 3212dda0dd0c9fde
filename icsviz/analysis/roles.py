"""Which captured tensor plays which role, so that runs are compared like with like.

Ioffe & Szegedy's comparison is "the input of each nonlinearity". In the
baseline CNN that is `fc1` (the Dense output); in its BN twin it is `fc1_bn`,
while `fc1` there is the Dense output *before* the normalization. Pairing by
name compares the wrong tensors; pairing by role compares the input of the k-th
nonlinearity of one run with the input of the k-th nonlinearity of the other.

A nonlinearity is an activation layer (its input is the captured tensor that
feeds it: recorded in the run as the layer's `inputs` since 2026-11-25, the
previous captured tensor in model order for older runs), a fused activation
(its input is recorded as `name:preact`) or a recurrent layer. A recurrent
layer's gates apply their sigmoids and tanh to pre-activations computed inside
the time loop, which nothing records; what they are computed from, the layer's
input, stands for them: the tensor a LayerNormalization before the layer
normalizes, as BatchNormalization normalizes a Dense layer's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..store.reader import Run

__all__ = ["Role", "inputs_by_position", "nonlinearity_inputs", "pair_layers", "same_depth"]


@dataclass(frozen=True)
class Role:
    """The input of one nonlinearity of a run."""

    index: int  # k: the k-th nonlinearity in model order, from 1
    nonlinearity: str  # its name (an activation layer, or a layer with a fused activation)
    layer: str  # the captured tensor that is its input, in this run

    @property
    def label(self) -> str:
        return f"input of {self.nonlinearity}"


def nonlinearity_inputs(run: Run) -> list[Role]:
    """The input of every nonlinearity of `run`, in model order."""
    infos = run.layers
    names = {info.name for info in infos}
    roles: list[Role] = []
    preactivations: set[str] = set()  # recorded pre-activations, each a role already
    recurrent: set[str] = set()  # recurrent layers seen (one role for all of a layer's states)
    # Else a subclassed model's or an old run (a fused layer's output is fed by its own
    # pre-activation in any model).
    has_graph = any(set(info.inputs) - {f"{info.name}:preact"} for info in infos)
    for i, info in enumerate(infos):
        if info.kind == "preactivation":
            # "dense:preact#2": the second call of "dense", a nonlinearity of its own
            roles.append(Role(len(roles) + 1, info.name.replace(":preact", "", 1), info.name))
            preactivations.add(info.name)
        elif info.kind == "activation":
            feeding = [name for name in info.inputs if name in names]
            source = feeding[0] if feeding else (infos[i - 1].name if i > 0 else None)
            # A layer with a fused activation (Dense(activation="relu")) is recorded twice, as
            # its pre-activation and its output: that nonlinearity has its role already.
            if source is not None and source not in preactivations:
                roles.append(Role(len(roles) + 1, info.name, source))
        elif info.kind == "recurrent":
            layer = info.name.split("[")[0]  # an RNN's returned states are `name[1]`, ...: one layer
            feeding = [name for name in info.inputs if name in names]
            if not feeding and not has_graph and i > 0:
                feeding = [infos[i - 1].name]  # a subclassed model: no graph, model order
            if feeding and layer not in recurrent:
                roles.append(Role(len(roles) + 1, layer, feeding[0]))
            recurrent.add(layer)  # the first layer of a model has no captured input: no role
    return roles


def same_depth(runs: Mapping[str, Run]) -> bool:
    """Whether every run has as many nonlinearities, as a model and its BatchNormalization twin
    have. Only then does pairing by role compare like with like: the second nonlinearity of an
    LSTM model is no counterpart of a CNN's second."""
    return len({len(nonlinearity_inputs(run)) for run in runs.values()}) <= 1


def inputs_by_position(runs: Mapping[str, Run]) -> list[tuple[str, dict[str, str]]]:
    """Each run's own nonlinearity inputs, not paired: [("1", {run label: its first input}),
    ("2", ...), ...] up to the deepest run (a run without a k-th is absent from k's dict). For
    runs of different depths, where `pair_layers` would pair unrelated tensors."""
    own = {label: nonlinearity_inputs(run) for label, run in runs.items()}
    depth = max((len(roles) for roles in own.values()), default=0)
    return [
        (str(k + 1), {label: roles[k].layer for label, roles in own.items() if k < len(roles)})
        for k in range(depth)
    ]


def pair_layers(runs: Mapping[str, Run], by: str = "role") -> list[tuple[str, dict[str, str]]]:
    """Tensors to compare across runs: [(label, {run label: layer name})], in model order.

    `by="role"` pairs the inputs of the k-th nonlinearity of every run (runs with a
    different number of nonlinearities pair up to the shortest: see `same_depth`); `by="name"` pairs
    layers of equal name present in every run.
    """
    if by == "name":
        first = next(iter(runs.values()))
        shared = [n for n in first.layer_names if all(n in run.layer_names for run in runs.values())]
        return [(name, {label: name for label in runs}) for name in shared]
    if by != "role":
        raise ValueError(f"by must be 'role' or 'name'. Received: by={by!r}")
    per_run = {label: nonlinearity_inputs(run) for label, run in runs.items()}
    count = min((len(roles) for roles in per_run.values()), default=0)
    pairs = []
    for k in range(count):
        first_label = next(iter(per_run))
        label = per_run[first_label][k].label
        pairs.append((label, {run_label: roles[k].layer for run_label, roles in per_run.items()}))
    return pairs
