"""`inturn migrate`: creates the PostgreSQL schema, idempotently; other URLs say why not."""

from __future__ import annotations

import psycopg
import pytest

from inturn._cli import main


def test_migrate_is_idempotent(postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", postgres_dsn]) == 0
    assert main(["migrate", postgres_dsn]) == 0
    assert capsys.readouterr().out.count("schema up to date") == 2
    with psycopg.connect(postgres_dsn) as conn:
        tables = conn.execute(
            "select count(*) from information_schema.tables where table_schema = 'inturn'"
        ).fetchone()
    assert tables is not None
    assert tables[0] >= 1


def test_migrate_refuses_a_backend_without_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "memory://"]) == 2
    assert "keeps no schema" in capsys.readouterr().err


def test_migrate_reports_a_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "nosuch://x"]) == 1
    assert "accepted schemes" in capsys.readouterr().err
