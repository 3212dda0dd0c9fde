from conftest import tiny_layout
from icsviz.store.schema import QUANTILES, safe_id


def test_safe_id_sanitizes_and_orders() -> None:
    assert safe_id(3, "conv2d_1") == "003_conv2d_1"
    assert safe_id(0, "../../etc/passwd") == "000_etc_passwd"
    assert safe_id(12, "block/conv:preact") == "012_block_conv_preact"
    assert safe_id(1, "///") == "001_unnamed"
    assert safe_id(2, "a b") != safe_id(3, "a_b")  # the index keeps sanitized twins apart


def test_quantiles_include_ioffe_and_tensorboard_levels() -> None:
    for level in (0.15, 0.50, 0.85, 0.07, 0.16, 0.31, 0.69, 0.84, 0.93):
        assert level in QUANTILES
    assert list(QUANTILES) == sorted(QUANTILES)


def test_layout_difference_is_described() -> None:
    a, b = tiny_layout(units=4), tiny_layout(units=5)
    assert a.describe_difference(tiny_layout(units=4)) is None
    assert "dense" in a.describe_difference(b)
