"""The block extractor of tests/docs: fences, markers and indentation as Markdown has them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs._blocks import extract, fence_lines

PAGE = """\
# A page

<!-- not run: installs packages -->
```sh
pip install inturn
```

Text.

```python
x = 1
```

<!-- continues -->

```python
print(x)
```

- a list item:

  ```text
  an indented block
  ```

~~~~python
a = "```"
~~~~
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "README.md"  # page_name needs a path under the repository root
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr("tests.docs._blocks.ROOT", tmp_path)
    return write(tmp_path, PAGE)


def test_every_block_is_found_with_its_language_and_marker(page: Path) -> None:
    """Fences of backticks or tildes, indented or not; the marker is the comment before."""
    blocks = extract(page)
    assert [(b.lang, b.marker) for b in blocks] == [
        ("sh", "not run: installs packages"),
        ("python", None),
        ("python", "continues"),
        ("text", None),
        ("python", None),
    ]
    assert 2 * len(blocks) == fence_lines(page)


def test_text_keeps_its_lines_without_the_list_indent(page: Path) -> None:
    """An indented block loses the fence's indentation; a longer fence can hold ```."""
    blocks = extract(page)
    assert blocks[3].text == "an indented block\n"
    assert blocks[4].text == 'a = "```"\n'


def test_markers_read_as_reasons(page: Path) -> None:
    """`not run` carries its reason, `continues` chains."""
    blocks = extract(page)
    assert blocks[0].not_run == "installs packages"
    assert blocks[2].continues
    assert blocks[2].not_run is None
    assert blocks[1].not_run is None
    assert not blocks[1].continues


def test_an_unclosed_fence_is_an_error(page: Path) -> None:
    """A fence left open would swallow the rest of the page: refused, not guessed."""
    write(page.parent, "```python\nprint(1)\n")
    with pytest.raises(ValueError, match="never closed"):
        extract(page)
