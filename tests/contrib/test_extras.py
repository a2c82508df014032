"""Without their library, the integrations say which extra to install."""

from __future__ import annotations

import importlib
import sys

import pytest

import inturn


@pytest.mark.parametrize(
    ("module", "library", "extra"),
    [
        ("inturn.contrib.aiogram", "aiogram", "inturn[aiogram]"),
        ("inturn.contrib.telegram", "telegram", "inturn[telegram]"),
    ],
)
def test_a_missing_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, library: str, extra: str
) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, library, None)  # import of it fails
    with pytest.raises(inturn.ConfigurationError, match=extra.replace("[", r"\[")):
        importlib.import_module(module)
