"""Where icsviz's warnings point: at the user's own line, not at icsviz or Keras."""

from __future__ import annotations

import inspect
import threading
import warnings

import keras
import numpy as np

from icsviz import CaptureWarning, ICSCallback
from icsviz.errors import warn_capture


def _capture_warnings(run) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [w for w in caught if issubclass(w.category, CaptureWarning)]


def test_a_warning_from_the_callbacks_arguments_points_at_the_users_line(tmp_path):
    x = np.zeros((8, 3), "float32")
    line = inspect.currentframe().f_lineno + 1
    caught = _capture_warnings(lambda: ICSCallback(tmp_path / "run.hdf5", probe=x))
    assert [w.message.args[0][:31] for w in caught] == ["icsviz: 'run.hdf5' does not end"]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_a_warning_raised_inside_fit_points_at_the_users_fit_line(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, activation="relu", name="hidden"),
            keras.layers.Dense(2, name="out"),
        ]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # The probe has no labels: Keras calls on_train_begin, which warns from inside icsviz.
    callback = ICSCallback(tmp_path / "run.h5", probe=x[:16], layers=["hidden", "no_such_layer"])
    fit = lambda: model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])  # noqa: E731
    line = inspect.currentframe().f_lineno - 1
    caught = _capture_warnings(fit)
    messages = sorted(w.message.args[0][:40] for w in caught)
    assert messages == [
        "icsviz: the layer filter entries ['no_su",
        "icsviz: the probe has no labels, so grad",
    ]
    assert {(w.filename, w.lineno) for w in caught} == {(__file__, line)}


def test_a_warning_with_no_user_frame_points_at_its_caller():
    # A thread running icsviz's code alone (the writer's thread): no frame of the user's.
    caught: list[warnings.WarningMessage] = []

    def record() -> None:
        caught.extend(_capture_warnings(lambda: warn_capture("from a thread")))

    thread = threading.Thread(target=record)
    thread.start()
    thread.join()
    # record() is this test file's, so the warning points there: the nearest frame outside icsviz.
    assert [(w.message.args[0], w.filename) for w in caught] == [("icsviz: from a thread", __file__)]
    alone = threading.Thread(target=warn_capture, args=("alone",))
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        alone.start()
        alone.join()
    assert [(w.message.args[0], w.filename.endswith("threading.py")) for w in raw] == [
        ("icsviz: alone", True)
    ]
