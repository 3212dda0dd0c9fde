"""Analysis of recorded runs (pure numpy; nothing here imports Keras).

`drift` measures how far distributions move; `roles` says which tensors of two
runs play the same role (the input of the k-th nonlinearity), so that every
comparison pairs like with like.
"""

from .drift import *  # noqa: F403 - the public names listed in drift.__all__
from .drift import __all__ as _drift_all
from .roles import Role, inputs_by_position, nonlinearity_inputs, pair_layers, same_depth

__all__ = [*_drift_all, "Role", "inputs_by_position", "nonlinearity_inputs", "pair_layers", "same_depth"]
