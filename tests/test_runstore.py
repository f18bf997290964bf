"""The one JSONL reader of data files: every line of a JSON object, problems named by line."""

from __future__ import annotations

import json
from pathlib import Path

from distill.runstore import jsonl_lines


def test_unicode_line_separators_inside_strings_are_not_line_breaks(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    text = "a\u2028b\u0085c\u2029d"  # characters str.splitlines breaks at
    path.write_text(json.dumps({"output": text}, ensure_ascii=False) + "\n\n[1]\n", encoding="utf-8")
    assert list(jsonl_lines(path)) == [
        (1, {"output": text}, None),
        (3, {}, f"{path} line 3: expected a JSON object"),
    ]
