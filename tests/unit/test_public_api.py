from __future__ import annotations

import quotagate as qg


def test_all_is_sorted_and_importable() -> None:
    assert qg.__all__ == sorted(qg.__all__)
    for name in qg.__all__:
        assert hasattr(qg, name), name


def test_version_is_a_string() -> None:
    assert isinstance(qg.__version__, str)
    assert qg.__version__.count(".") == 2


def test_error_tree() -> None:
    assert issubclass(qg.ConfigError, qg.QuotagateError)
    assert issubclass(qg.StorageError, qg.QuotagateError)
