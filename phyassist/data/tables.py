"""Read CSV/TSV/JSON/JSONL files strictly: a bad file fails with its name, line and field,
never with a pandas traceback and never by silently skipping rows."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from phyassist.data.records import DataError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")


def read_text_utf8(path: Path) -> str:
    """File contents as text; a non-UTF-8 byte is reported with its line."""
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                        "re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _read_delimited(path: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
        start = reader.line_num + 1
        if not any(h.strip() for h in header):
            raise DataError(f"{path}: line 1: empty header row")
        seen = [h for h in header if h]
        if len(set(seen)) != len(seen):
            dup = sorted({h for h in seen if seen.count(h) > 1})
            raise DataError(f"{path}: line 1: duplicate column name(s) {dup}")
        rows = []
        for fields in reader:
            if not fields:  # blank line between records
                start = reader.line_num + 1
                continue
            if len(fields) != len(header):
                raise DataError(f"{path}: line {start}: expected {len(header)} fields "
                                f"({', '.join(header)}), found {len(fields)}; check the quoting")
            rows.append((start, dict(zip(header, fields))))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: has a header but no data rows")
    return rows


def _as_record(path: Path, where: str, item) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{path}: {where}: expected an object with named fields, got {type(item).__name__}")
    return {k: "" if v is None else (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                                     if isinstance(v, (dict, list)) else str(v)) for k, v in item.items()}


def _read_json(path: Path, text: str) -> list[tuple[int, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of records")
    return [(i, _as_record(path, f"item {i}", item)) for i, item in enumerate(data, 1)]


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {i}: not valid JSON ({exc.msg})") from None
        rows.append((i, _as_record(path, f"line {i}", item)))
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def read_table(path: str | Path) -> list[tuple[int, dict]]:
    """``[(line, {column: text})]`` for a CSV, TSV, JSON or JSONL file (by suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(TABLE_SUFFIXES)}")
    text = read_text_utf8(path)
    if suffix == ".json":
        return _read_json(path, text)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    return _read_delimited(path, text, "\t" if suffix == ".tsv" else ",")


def columns_of(rows: list[tuple[int, dict]]) -> list[str]:
    cols: dict[str, None] = {}
    for _, r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def require_columns(path: Path, rows: list[tuple[int, dict]], needed: list[str]) -> None:
    """Every needed column present (in every record, for JSON lines)."""
    have = columns_of(rows)
    missing = [c for c in needed if c not in have]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {have}")
    for line, r in rows:
        gone = [c for c in needed if c not in r]
        if gone:
            raise DataError(f"{path}: line {line}: record has no field {gone[0]!r}")
