"""One torture Lab for the session: the PostgreSQL cluster is shared, the rest is per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from inturn._torture.scenarios import Lab


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("torture"))
    yield lab
    lab.close()
