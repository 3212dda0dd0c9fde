import numpy as np

from icsviz.train import RECIPES, ShiftFlipBatches, recipe_for


def test_reference_recipes_match_the_design() -> None:
    base, bn = RECIPES["baseline"], RECIPES["bn"]
    assert (
        base.optimizer,
        base.learning_rate,
        base.lr_decay,
        base.batch_size,
        base.augment,
        base.epochs,
    ) == ("rmsprop", 1e-4, 1e-6, 32, True, 50)
    assert bn.learning_rate == 1e-3 and bn.batch_size == 32 and bn.lr_decay == 1e-6
    assert RECIPES["mlp"].batch_size == 60 and not RECIPES["mlp"].augment
    assert recipe_for("bn", epochs=3, batch_size=None).epochs == 3


def test_shift_and_flip_move_pixels_with_nearest_fill() -> None:
    x = np.arange(10 * 10, dtype=np.uint8).reshape(1, 10, 10, 1).repeat(64, 0)
    y = np.arange(64)
    batches = ShiftFlipBatches(x, y, batch_size=64, seed=0)
    images, labels = batches[0]
    assert images.shape == x.shape and sorted(labels.tolist()) == list(range(64))
    original = x[0, :, :, 0]
    seen_flip = seen_shift = False
    for image in images[:, :, :, 0]:
        # Every output is the original shifted by at most 1 pixel (0.1 * 10), maybe flipped,
        # with edge rows/cols repeated (nearest fill).
        candidates = []
        for flip in (False, True):
            src = original[:, ::-1] if flip else original
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    rows = np.clip(np.arange(10) - dy, 0, 9)
                    cols = np.clip(np.arange(10) - dx, 0, 9)
                    if np.array_equal(image, src[rows][:, cols]):
                        candidates.append((flip, dy, dx))
        assert candidates, "not a shift/flip of the original"
        seen_flip |= any(c[0] for c in candidates)
        seen_shift |= any(c[1] or c[2] for c in candidates)
    assert seen_flip and seen_shift
