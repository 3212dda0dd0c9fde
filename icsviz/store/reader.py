"""Read icsviz run files: `open_run(path)` returns a `Run`.

Pure h5py + numpy: nothing here imports TensorFlow or Keras, so the app, the
plots and the report run on any machine. Files are opened in SWMR read mode so
that a run can be followed while it trains; call `Run.refresh()` to see new
captures. Only rows below the commit marker (the length of /captures/step) are
ever returned.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import DamagedRunError, MissingDataError, SchemaVersionError
from .files import damaged, not_a_run, open_for_reading, reading, short_rows
from .schema import CAPTURE_KINDS, SCHEMA_VERSION, decode_status, decode_text, safe_id

__all__ = ["open_run", "Run", "ActivationStats", "GradientStats", "ICSStats", "LayerInfo"]


@dataclass(frozen=True)
class LayerInfo:
    """What the file says about one captured layer."""

    name: str
    id: str
    class_name: str
    kind: str
    output_shape: tuple[int, ...]
    n_units: int
    n_values: int
    inputs: tuple[str, ...] = ()  # captured tensors that feed this one (empty when unknown)
    # How the values were chosen: "all", "rows" (a sample of rows), "mask" / "mask, rows" (the
    # padding a Keras mask marks left out), "first samples"; "" in runs that do not say.
    value_sample: str = ""

    @property
    def padding_left_out(self) -> bool:
        """Whether positions a Keras mask marks as padding were left out of the statistics."""
        return self.value_sample.startswith("mask")


@dataclass(frozen=True)
class ActivationStats:
    """A layer's activation statistics, one row per capture (T captures).

    Attributes:
        counts: (T, B) histogram bin counts (non-finite values excluded).
        edges: (T, B+1) bin edges of each capture's histogram.
        quantiles: (T, Q) values at the levels `q`.
        q: (Q,) quantile levels in [0, 1].
        mean, std: (T,) over the finite values the value budget kept (`LayerInfo.n_values`,
            `LayerInfo.value_sample`; every value with `ICSCallback(max_values=None)`).
        min, max: (T,) over every finite value.
        zero_frac: (T,) fraction of the kept values exactly zero (dead ReLUs).
        nonfinite: (T,) number of NaN or infinite values, over every value.
        unit_mean, unit_std: (T, C) per unit (Dense unit or conv channel).
        tracked_units: (U,) unit indices whose own quantiles are recorded.
        unit_quantiles: (T, U, Q) quantiles of each tracked unit.
    """

    name: str
    steps: np.ndarray
    epochs: np.ndarray
    counts: np.ndarray
    edges: np.ndarray
    quantiles: np.ndarray
    q: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    zero_frac: np.ndarray
    nonfinite: np.ndarray
    unit_mean: np.ndarray
    unit_std: np.ndarray
    tracked_units: np.ndarray
    unit_quantiles: np.ndarray

    def quantile(self, level: float) -> np.ndarray:
        """The (T,) series of one recorded quantile level, e.g. 0.85."""
        return self.quantiles[:, _level_index(self.q, level)]

    def unit_quantile(self, unit: int, level: float) -> np.ndarray:
        """The (T,) series of a tracked unit's quantile."""
        matches = np.flatnonzero(self.tracked_units == unit)
        if not len(matches):
            raise MissingDataError(
                f"unit {unit} of {self.name!r} is not tracked; tracked units: {self.tracked_units.tolist()}"
            )
        return self.unit_quantiles[:, int(matches[0]), _level_index(self.q, level)]


@dataclass(frozen=True)
class GradientStats:
    """Per-variable gradient statistics, one row per capture.

    Attributes:
        variables: the V variable names.
        grad_norm: (T, V) L2 norm of the loss gradient on the probe batch.
        weight_norm: (T, V) L2 norm of the variable.
        update_ratio: (T, V) ||W_t - W_prev|| / ||W_prev|| (NaN at the first capture).
    """

    variables: list[str]
    steps: np.ndarray
    grad_norm: np.ndarray
    weight_norm: np.ndarray
    update_ratio: np.ndarray

    @property
    def total_grad_norm(self) -> np.ndarray:
        """(T,) L2 norm over all the variables together."""
        return np.sqrt(np.sum(np.square(self.grad_norm), axis=1))

    @property
    def total_update_ratio(self) -> np.ndarray:
        """(T,) ||W_t - W_prev|| / ||W_prev|| over all the variables together (NaN at the first capture).

        Each variable's update norm is its ratio times its previous weight norm.
        """
        previous = np.vstack([np.full((1, self.weight_norm.shape[1]), np.nan), self.weight_norm[:-1]])
        update = np.sqrt(np.nansum(np.square(self.update_ratio * previous), axis=1))
        base = np.sqrt(np.nansum(np.square(previous), axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(base > 0, update / base, np.nan)
        ratio[:1] = np.nan
        return ratio


@dataclass(frozen=True)
class ICSStats:
    """The gradient-shift measure of Santurkar et al. (2018) for one layer."""

    name: str
    steps: np.ndarray
    grad_diff: np.ndarray  # (T,) ||G - G'||
    grad_cos: np.ndarray  # (T,) cos(G, G')


def _level_index(levels: np.ndarray, level: float) -> int:
    hits = np.flatnonzero(np.isclose(levels, level))
    if not len(hits):
        raise MissingDataError(f"quantile {level} was not recorded; recorded levels: {levels.tolist()}")
    return int(hits[0])


def open_run(path: str | os.PathLike[str], *, skip: Iterable[str] = ()) -> Run:
    """Open a run file for reading.

    `skip` lists groups known to be damaged ("/layers/003_conv2", as
    `icsviz.check_run(path).drop_groups` gives them): the run opens without
    them, as if they had not been captured, and `Run.damage` says why.

    Raises:
        RunFileError: the file is missing, empty, truncated, not HDF5, not an
            icsviz run, or (SchemaVersionError) of a newer schema.

    Example:

    ```python
    run = icsviz.open_run("runs/cifar10-bn.h5")
    acts = run.activations(run.layer_names[0])
    print(acts.mean[-1] - acts.mean[0])
    ```
    """
    return Run(path, skip=skip)


# Read once per process and file version (path, inode, size, mtime, parts skipped): each
# version's index of groups (Run._read_index) and, per committed length, its layers'
# statistics (Run.activations). The app opens the same files in every view.
_INDEXES: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_MAX_INDEXES = 1024
_ACTIVATIONS: collections.OrderedDict[tuple[Any, ...], ActivationStats] = collections.OrderedDict()
_MAX_ACTIVATIONS = 256  # layers, about 0.2 MB each for a 50-epoch run
_ACTIVATIONS_LOCK = threading.Lock()  # the app reads from several sessions' threads
_UNVERSIONED = itertools.count()  # a file whose version cannot be read shares nothing


def _file_version(path: Path, skip: frozenset[str]) -> tuple[Any, ...]:
    """What identifies a file's content: (path, inode, size, mtime, parts skipped)."""
    try:
        stat = path.stat()
        return (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, skip)
    except OSError:
        return ("unversioned", next(_UNVERSIONED))


def _version_json(version: tuple[Any, ...]) -> list[Any]:
    return [*version[:4], sorted(version[4])]


def index_record(run: Run) -> dict[str, Any] | None:
    """The run's index of groups (what opening it reads from every group's attributes) as
    JSON data with the file version it describes, for a cache on disk (`store/catalog.py`)."""
    if run._version[0] == "unversioned":
        return None
    return {
        "version": _version_json(run._version),
        "layers": [dataclasses.asdict(info) for info in run._layers],
        "variables": run._variables,
        "variable_layers": run._owners,
        "ics": run._ics,
        "batches": run._batch_ids,
    }


def seed_index(path: str | os.PathLike[str], skip: Iterable[str], read_record: Callable[[], Any]) -> bool:
    """Let the next `open_run(path, skip=skip)` take its index from `read_record()` (an
    `index_record`) instead of every group's attributes, if the record describes the file as
    it is now. True when the index is known (already, or from the record)."""
    version = _file_version(Path(path).expanduser(), frozenset(skip))
    if version[0] == "unversioned":
        return False
    if version in _INDEXES:
        return True
    record = read_record()
    if not isinstance(record, dict) or record.get("version") != _version_json(version):
        return False  # another version of the file, or no record: the file is read
    try:
        layers = [
            LayerInfo(
                name=str(item["name"]),
                id=str(item["id"]),
                class_name=str(item["class_name"]),
                kind=str(item["kind"]),
                output_shape=tuple(int(d) for d in item["output_shape"]),
                n_units=int(item["n_units"]),
                n_values=int(item["n_values"]),
                inputs=tuple(str(name) for name in item.get("inputs", ())),
                value_sample=str(item["value_sample"]),  # a record from before it was kept: stale
            )
            for item in record["layers"]
        ]
        groups = [
            {str(k): str(v) for k, v in record[part].items()}
            # a record from before variable_layers was kept: stale (KeyError), the file is read
            for part in ("variables", "variable_layers", "ics", "batches")
        ]
    except (KeyError, TypeError, ValueError, AttributeError):
        return False  # a record of another shape (edited, or from another icsviz): the file is read
    _keep_index(version, (layers, *groups))
    return True


def _keep_index(version: tuple[Any, ...], found: tuple[Any, ...]) -> None:
    if len(_INDEXES) >= _MAX_INDEXES:
        _INDEXES.clear()
    _INDEXES[version] = found


# History entries the callback adds to Keras's logs (`lr`: Keras 2's name for the rate).
_CALLBACK_METRICS = frozenset({"learning_rate", "lr", "epoch_time"})


def metric_names(history: Mapping[str, Any]) -> list[str]:
    """`Run.metric_names` of a history already read."""
    return [name for name in history if not name.startswith("val_") and name not in _CALLBACK_METRICS]


def accuracy_of(names: Sequence[str]) -> str | None:
    """Which of these metric names is the accuracy: "accuracy" (`metrics=["accuracy"]`), else
    the first named "...accuracy" (a metric object's "sparse_categorical_accuracy",
    "binary_accuracy"); None for a model compiled without one."""
    if "accuracy" in names:
        return "accuracy"
    return next((name for name in names if name.endswith("accuracy")), None)


def first_metric(names: Sequence[str]) -> str | None:
    """The metric shown first, beside the loss (the app's first panel, `icsviz plot`'s first
    figure): the accuracy, or for a model compiled without it (a regression) the first other
    metric it recorded (mae)."""
    others = [name for name in names if name != "loss"]
    return accuracy_of(others) or (others[0] if others else None)


def curve_panels(names: Sequence[str]) -> list[str]:
    """The metrics of the training curves, in order (the app's panels, `icsviz plot`'s and the
    report's first two figures): `first_metric`, then the loss; a `train_step` of the user's own
    that logs no "loss" (a GAN's "d_loss" and "g_loss") gets its next metric instead."""
    first = first_metric(names)
    second = "loss" if "loss" in names else next((name for name in names if name != first), None)
    return [metric for metric in (first, second) if metric is not None]


def metric_label(metric: str) -> str:
    """How the app and the figures name a metric: any accuracy (Keras's
    "sparse_categorical_accuracy") is the accuracy, a short name the abbreviation it is ("MAE"),
    others as recorded."""
    if metric.endswith("accuracy"):
        return "accuracy"
    return metric.upper() if metric != "loss" and metric.isalpha() and len(metric) <= 4 else metric


# Metrics whose best value is the lowest: errors and losses, by Keras's names for them.
_LOWER_IS_BETTER = ("loss", "error", "crossentropy", "hinge", "logcosh", "poisson", "divergence")
_LOWER_IS_BETTER_NAMES = {"mae", "mse", "rmse", "mape", "msle"}
# And whose best is the highest, besides the accuracies.
_HIGHER_IS_BETTER = ("accuracy", "auc", "precision", "recall", "f1_score", "fbeta_score", "r2_score", "iou")


def better(metric: str) -> int | None:
    """Which way `metric` improves: 1 where higher is better (accuracy, AUC), -1 where lower is
    (MAE, a loss), None for a name that does not say."""
    name = metric.lower()
    if name in _LOWER_IS_BETTER_NAMES or any(part in name for part in _LOWER_IS_BETTER):
        return -1
    if any(part in name for part in _HIGHER_IS_BETTER):
        return 1
    return None


def last_finite(values: np.ndarray | None) -> float:
    """The last recorded value of a per-epoch series, NaN if none: with
    `fit(validation_freq=k)` the validation metrics are NaN in the epochs between, so the
    final epoch's may be missing though the run validated."""
    finite = np.flatnonzero(np.isfinite(values)) if values is not None else ()
    return float(values[finite[-1]]) if len(finite) else math.nan


def validation_accuracy(history: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The per-epoch validation accuracy of a history already read, whatever Keras named it."""
    name = accuracy_of([key[len("val_") :] for key in history if key.startswith("val_")])
    return None if name is None else history[f"val_{name}"]


def _ids_by_name(groups: list[tuple[str, Any]]) -> dict[str, str]:
    """(id, attributes) of groups -> {original name: id}, in index order."""
    return {str(attrs["name"]): gid for gid, attrs in groups}


class Run:
    """A recorded run. Use as a context manager or call `close()`."""

    def __init__(self, path: str | os.PathLike[str], *, skip: Iterable[str] = ()) -> None:
        self.path = Path(path).expanduser()
        self._skip = frozenset(skip)
        self._file, self.swmr = open_for_reading(self.path)
        # Parts found damaged while opening: HDF5 path -> what went wrong. The
        # rest of the run reads as usual; `icsviz.check_run` reads everything.
        self.damage: dict[str, str] = {
            part: "damaged: left out (icsviz check FILE says why)" for part in self._skip
        }
        try:
            with reading(self.path, "the file's attributes"):
                self._check_schema()
            self._version = _file_version(self.path, self._skip)
            self._layers, self._variables, self._owners, self._ics, self._batch_ids = self._read_index()
            self._by_name = {info.name: info for info in self._layers}
            self._by_name.update({info.id: info for info in self._layers})
            self._length = 0
            self._batch_length = 0
            self.refresh()
        except BaseException:
            self._file.close()
            raise

    # ---------------------------------------------------------------- plumbing
    def _check_schema(self) -> None:
        attrs = self._file.attrs
        if "schema_version" not in attrs:
            raise not_a_run(self.path)
        version = int(attrs["schema_version"])
        if version > SCHEMA_VERSION:
            writer = decode_text(attrs.get("icsviz_version", "a newer icsviz"))
            raise SchemaVersionError(
                f"{self.path} uses run schema version {version} (written by icsviz "
                f"{writer}); this icsviz reads schema versions up to {SCHEMA_VERSION}. "
                "Upgrade icsviz to read it."
            )

    def _read_index(
        self,
    ) -> tuple[list[LayerInfo], dict[str, str], dict[str, str], dict[str, str], dict[str, str]]:
        """The layers, the groups of variables and each variable's layer, and the groups of
        gradient shift and batch rows.

        Reading them means every group's attributes (about 50 ms for the reference CNN);
        they are kept per file version, so that opening the same file again, as the
        app's views do, costs a `stat`.
        """
        found = _INDEXES.get(self._version)
        if found is None:
            variables = self._groups("variables")
            found = (
                self._read_layers(),
                _ids_by_name(variables),
                # Kept with the index: a layer's variables looked up by reading every variable's
                # attribute again made a deep model's gradients quadratic (NASNetMobile: 36 s).
                {str(attrs["name"]): str(attrs["layer"]) for _, attrs in variables},
                self._read_groups("ics"),
                self._read_batch_groups(),
            )
            _keep_index(self._version, found)
        layers, variables, owners, ics, batches = found
        return list(layers), dict(variables), dict(owners), dict(ics), dict(batches)

    def _groups(self, root: str) -> list[tuple[str, Any]]:
        """(id, attributes) of the groups under `root` but those in `skip`, in index order."""
        with reading(self.path, "/" + root):
            parent = self._file[root]
            ids = [gid for gid in parent if f"/{root}/{gid}" not in self._skip]
        found = []
        for gid in ids:
            with reading(self.path, f"/{root}/{gid}"):
                attrs = {k: decode_text(v) for k, v in parent[gid].attrs.items()}
                found.append((int(attrs["index"]), gid, attrs))
        return [(gid, attrs) for _, gid, attrs in sorted(found, key=lambda item: item[0])]

    def _read_layers(self) -> list[LayerInfo]:
        infos = []
        for lid, a in self._groups("layers"):
            with reading(self.path, f"/layers/{lid}"):
                infos.append(
                    LayerInfo(
                        name=str(a["name"]),
                        id=lid,
                        class_name=str(a["class_name"]),
                        kind=str(a["kind"]),
                        output_shape=tuple(json.loads(a["output_shape"])),
                        n_units=int(a["n_units"]),
                        n_values=int(a["n_values"]),
                        inputs=tuple(json.loads(a["inputs"])) if "inputs" in a else (),
                        value_sample=str(a["value_sample"]) if "value_sample" in a else "",
                    )
                )
        return infos

    def _read_groups(self, root: str) -> dict[str, str]:
        """Original name -> group id, in index order."""
        return _ids_by_name(self._groups(root))

    def _open_file(self) -> h5py.File:
        """The HDF5 file, or a ValueError saying the run was closed (h5py's own error for a
        closed file reads like damage)."""
        if not self._file:
            raise ValueError(
                f"{self.path.name}: this Run is closed; read it inside `with open_run(...) as run:`, "
                "or open it again with open_run"
            )
        return self._file

    def _dataset(self, name: str) -> h5py.Dataset:
        file = self._open_file()
        with reading(self.path, "/" + name):
            ds = file[name]
            if not isinstance(ds, h5py.Dataset):
                raise TypeError(f"/{name} is a {type(ds).__name__}, not a dataset")
            if self.swmr:
                ds.refresh()
            return ds

    def _read(self, name: str, rows: int | None = None) -> np.ndarray:
        """A whole dataset, or its first `rows` rows; damage raises DamagedRunError naming it."""
        ds = self._dataset(name)
        with reading(self.path, "/" + name):
            return ds[()] if rows is None else ds[:rows]

    def _attribute(self, name: str, attribute: str) -> Any:
        file = self._open_file()
        with reading(self.path, f"/{name} (attribute {attribute!r})"):
            return decode_text(file[name].attrs[attribute])

    def _rows(self, name: str) -> np.ndarray:
        """The committed rows of a per-capture dataset. One with fewer rows than the capture index
        (cut or edited: the writer adds a capture's rows before its index entry) is damage, not
        a shorter series that no longer lines up with the steps."""
        rows = self._read(name, self._length)
        if len(rows) < self._length:
            raise damaged(self.path, "/" + name, short_rows(len(rows), self._length))
        return rows

    def refresh(self) -> int:
        """Look for captures committed since the last refresh; returns their count."""
        before = self._length
        self._length = int(self._dataset("captures/step").shape[0])
        if self.has_batch_stats:
            self._batch_length = int(self._dataset("batches/step").shape[0])
        return self._length - before

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Run {self.path.name!r}: {self.num_captures} captures, status {self.status}>"

    # ---------------------------------------------------------------- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        """The run's metadata (JSON-encoded values decoded)."""
        out: dict[str, Any] = {}
        file = self._open_file()
        with reading(self.path, "the file's attributes"):
            items = list(file.attrs.items())
        for key, value in items:
            if key == "layout":
                continue
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str) and value[:1] in "[{":
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out

    @property
    def name(self) -> str:
        return str(self.attrs.get("run_name") or self.path.stem)

    @property
    def config(self) -> dict[str, Any]:
        config = self.attrs.get("config", {})
        return config if isinstance(config, dict) else {}

    @property
    def status(self) -> str:
        """ "training" (still being written, or killed), "complete" or "interrupted"."""
        raw = self._read("status")
        with reading(self.path, "/status"):  # files of icsviz 0.1 hold it without a checksum
            return decode_status(raw)

    # ---------------------------------------------------------------- captures
    @property
    def num_captures(self) -> int:
        return self._length

    @property
    def steps(self) -> np.ndarray:
        """(T,) global training step of each capture (0 = before the first update)."""
        return self._rows("captures/step")

    @property
    def epochs(self) -> np.ndarray:
        """(T,) fractional epoch of each capture (0.0 = before training, 1.0 = after epoch 1)."""
        return self._rows("captures/epoch")

    @property
    def times(self) -> np.ndarray:
        """(T,) seconds since training began."""
        return self._rows("captures/time")

    @property
    def capture_kinds(self) -> list[str]:
        names = {v: k for k, v in CAPTURE_KINDS.items()}
        return [names.get(int(k), "?") for k in self._rows("captures/kind")]

    # ---------------------------------------------------------------- layers
    @property
    def layers(self) -> list[LayerInfo]:
        return list(self._layers)

    @property
    def layer_names(self) -> list[str]:
        """Original Keras names of the captured layers, in model (call) order."""
        return [info.name for info in self._layers]

    def layer(self, name: str) -> LayerInfo:
        if not isinstance(name, str):
            raise TypeError(
                f"layers are named by strings, e.g. {self.layer_names[0] if self._layers else 'conv1'!r} "
                f"(run.layer_names lists them). Received: {name!r}"
            )
        try:
            return self._by_name[name]
        except KeyError:
            # A left-out layer's attributes were not read: match its id ("NNN_<sanitized name>").
            sanitized = safe_id(0, name).split("_", 1)[1]
            for part, reason in self.damage.items():
                root, _, lid = part.rpartition("/")
                if root == "/layers" and lid.split("_", 1)[-1] == sanitized:
                    raise DamagedRunError(reason, path=str(self.path), dataset=part) from None
            raise MissingDataError(
                f"{self.path.name} has no captured layer {name!r}; it has: "
                f"{', '.join(self.layer_names[:20])}" + (" ..." if len(self._layers) > 20 else "")
            ) from None

    def tracked_units(self, name: str) -> np.ndarray:
        """(U,) indices of the units of a layer whose own quantiles are recorded."""
        return self._read(f"layers/{self.layer(name).id}/tracked_units")

    def activations(self, name: str) -> ActivationStats:
        """Activation statistics of one layer (by original name or layer id).

        Read once per file version, layer and committed length, in this process:
        views that ask for the same layer share one read, also through another
        `open_run` of the same file. The arrays are therefore read-only; copy one
        before changing it.
        """
        info = self.layer(name)
        key = (self._version, info.id, self._length)
        with _ACTIVATIONS_LOCK:
            cached = _ACTIVATIONS.get(key)
            if cached is not None:
                _ACTIVATIONS.move_to_end(key)
                return cached
        stats = self._read_activations(info)
        for value in vars(stats).values():
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
        with _ACTIVATIONS_LOCK:
            _ACTIVATIONS[key] = stats
            while len(_ACTIVATIONS) > _MAX_ACTIVATIONS:
                _ACTIVATIONS.popitem(last=False)
        return stats

    def _read_activations(self, info: LayerInfo) -> ActivationStats:
        g = f"layers/{info.id}/"
        moments = self._rows(g + "moments")
        moment_names = json.loads(self._attribute(g + "moments", "names"))
        column = {m: moments[:, i] for i, m in enumerate(moment_names)}
        return ActivationStats(
            name=info.name,
            steps=self.steps,
            epochs=self.epochs,
            counts=self._rows(g + "hist_counts"),
            edges=self._rows(g + "hist_edges"),
            quantiles=self._rows(g + "quantiles"),
            q=np.asarray(self._attribute(g + "quantiles", "q")),
            mean=column["mean"],
            std=column["std"],
            min=column["min"],
            max=column["max"],
            zero_frac=self._rows(g + "zero_frac"),
            nonfinite=self._rows(g + "nonfinite"),
            unit_mean=self._rows(g + "unit_mean"),
            unit_std=self._rows(g + "unit_std"),
            tracked_units=self._read(g + "tracked_units"),
            unit_quantiles=self._rows(g + "unit_quantiles"),
        )

    # ------------------------------------------------------------ per-step mode
    def _read_batch_groups(self) -> dict[str, str]:
        if "/batches" in self._skip or "batches" not in self._file:
            return {}
        return {str(attrs["name"]): gid for gid, attrs in self._groups("batches/layers")}

    @property
    def has_batch_stats(self) -> bool:
        """Whether the run recorded the training batches at every step (`batch_stats=True`)."""
        return bool(self._batch_ids)

    @property
    def batch_steps(self) -> np.ndarray:
        """(S,) the global step of each recorded training batch (weights after that many updates)."""
        return self._read("batches/step", self._batch_length) if self.has_batch_stats else np.zeros(0, "i8")

    @property
    def batch_epochs(self) -> np.ndarray:
        """(S,) fractional epoch of each recorded training batch."""
        return self._read("batches/epoch", self._batch_length) if self.has_batch_stats else np.zeros(0)

    @property
    def batch_layer_names(self) -> list[str]:
        """Layers with per-step statistics, in model order."""
        return list(self._batch_ids)

    def batch_activations(self, name: str) -> ActivationStats:
        """Statistics of one layer on the training batch of every step (per-step mode).

        Every statistic comes from a fixed random sample of the batch's values
        (`sample` per step, see docs/statistics.md): histogram, quantiles, mean,
        std, min, max (the sample's extremes, not the batch's) and zero fraction.
        `counts` sum to the sample's finite values; `nonfinite` counts NaN/Inf
        in the sample.
        Per-unit means and stds are not recorded per step (empty (S, 0)).
        """
        if name not in self._batch_ids:
            info = self._by_name.get(name)
            if info is not None and info.name in self._batch_ids:
                name = info.name
            else:
                raise MissingDataError(
                    f"{self.path.name} has no per-step statistics for {name!r}"
                    + (
                        f"; layers with them: {', '.join(self._batch_ids)}"
                        if self._batch_ids
                        else " (it was recorded without batch_stats=True)"
                    )
                )
        g = f"batches/layers/{self._batch_ids[name]}/"
        n = self._batch_length
        moments = self._read(g + "moments", n).astype(np.float64)
        moment_names = json.loads(self._attribute(g + "moments", "names"))
        column = {m: moments[:, i] for i, m in enumerate(moment_names)}
        ranges = self._read(g + "hist_range", n)
        counts = self._read(g + "hist_counts", n).astype(np.int64)
        bins = counts.shape[1]
        edges = ranges[:, :1] + ranges[:, 1:2] * np.arange(bins + 1)
        return ActivationStats(
            name=name,
            steps=self.batch_steps,
            epochs=self.batch_epochs,
            counts=counts,
            edges=edges,
            quantiles=self._read(g + "quantiles", n),
            q=np.asarray(self._attribute(g + "quantiles", "q")),
            mean=column["mean"],
            std=column["std"],
            min=column["min"],
            max=column["max"],
            zero_frac=self._read(g + "zero_frac", n),
            nonfinite=self._read(g + "nonfinite", n).astype(np.int64),
            unit_mean=np.zeros((n, 0), np.float32),
            unit_std=np.zeros((n, 0), np.float32),
            tracked_units=self._read(g + "tracked_units"),
            unit_quantiles=self._read(g + "unit_quantiles", n),
        )

    def nonfinite(self, name: str) -> np.ndarray:
        """(T,) NaN/Inf values of a layer at each capture, without reading the rest of the layer."""
        return self._rows(f"layers/{self.layer(name).id}/nonfinite")

    def iter_activations(self) -> Iterator[ActivationStats]:
        for name in self.layer_names:
            yield self.activations(name)

    # ---------------------------------------------------------------- gradients
    @property
    def variable_names(self) -> list[str]:
        return list(self._variables)

    @property
    def trainable_layers(self) -> list[str]:
        """Layers that own trainable variables, in model order."""
        return list(dict.fromkeys(self._owners.values()))

    def variables_of(self, layer: str) -> list[str]:
        """Names of the trainable variables owned by a layer."""
        return [name for name, owner in self._owners.items() if owner == layer]

    def gradients(self, name: str) -> GradientStats:
        """Gradient statistics of a variable, or of every variable of a layer."""
        names = [name] if name in self._variables else self.variables_of(name)
        if not names:
            raise MissingDataError(
                f"{self.path.name} has no trainable variable or layer with variables named "
                f"{name!r}; variables: {', '.join(self.variable_names[:20])}"
            )

        def stack(field: str) -> np.ndarray:
            cols = [self._rows(f"variables/{self._variables[n]}/{field}") for n in names]
            return np.stack(cols, axis=1).astype(np.float64)

        return GradientStats(
            variables=names,
            steps=self.steps,
            grad_norm=stack("grad_norm"),
            weight_norm=stack("weight_norm"),
            update_ratio=stack("update_ratio"),
        )

    @property
    def has_ics(self) -> bool:
        return bool(self._ics)

    @property
    def ics_layer_names(self) -> list[str]:
        return list(self._ics)

    def ics(self, name: str) -> ICSStats:
        """The recorded Santurkar et al. gradient shift of one layer."""
        if name not in self._ics:
            hint = (
                "this run did not record it (ICSCallback(..., gradient_shift=True))"
                if not self._ics
                else f"layers with it: {', '.join(self._ics)}"
            )
            raise MissingDataError(f"no gradient-shift data for {name!r}: {hint}")
        g = f"ics/{self._ics[name]}/"
        return ICSStats(
            name=name,
            steps=self.steps,
            grad_diff=self._rows(g + "grad_diff").astype(np.float64),
            grad_cos=self._rows(g + "grad_cos").astype(np.float64),
        )

    # ---------------------------------------------------------------- history
    @property
    def history(self) -> dict[str, np.ndarray]:
        """Epoch metrics from Keras's logs: name -> (E,) array, NaN where absent."""
        rows = int(self._dataset("history/epoch").shape[0])
        with reading(self.path, "/history/names"):
            names = [n.decode("utf-8") for n in self._read("history/names")]
        values = self._read("history/values", rows)
        return {name: values[:, i].copy() for i, name in enumerate(names) if i < values.shape[1]}

    @property
    def metric_names(self) -> list[str]:
        """The model's own per-epoch metrics in `history` ("loss", "accuracy", "mae"), in the
        order recorded: not their "val_" twins, nor what the callback adds (learning rate,
        epoch time)."""
        return metric_names(self.history)

    @property
    def history_epochs(self) -> np.ndarray:
        """(E,) 0-based epoch index of each history row."""
        return self._read("history/epoch")
