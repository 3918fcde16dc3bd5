"""Text files as users write them: one reading rule per kind (lines, CSV, JSON), for every text input the
project reads (prompts files, ``captions.csv``, UCF-101 split lists, configs and model folders' JSON).

What spreadsheet programs and editors write is accepted: UTF-8 with or without a byte-order mark, LF, CRLF or
CR line ends, blank and whitespace-only lines anywhere (trailing ones included), and in CSV quoted fields
(commas, quotes and line breaks inside a caption). What cannot be read is a one-line ValueError naming the
file and, where the fault has a place, its line: ``captions file 'x/captions.csv', line 4: ...``.
"""

import csv
import io
import json
import os
from typing import Any, List, Tuple

ENCODING = "utf-8-sig"  # UTF-8; a byte-order mark at the start is dropped (Excel and Notepad write one)


def _where(what: str, path: str, line: int) -> str:
    return f"{what} {path!r}, line {line}"


def read_text(path: str, what: str = "file") -> str:
    """The whole file as text (a BOM dropped, line ends as written). ValueError naming ``what`` and the
    path when it is missing, a folder, unreadable or UTF-16, and the line of the first NUL byte or byte that
    is not UTF-8."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder, not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path!r}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path!r}: {e.strerror or e}") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # Notepad's "Unicode"
        raise ValueError(f"{what} {path!r} is UTF-16 text: save it as UTF-8")
    if b"\x00" in data:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise ValueError(f"{_where(what, path, line)}: a NUL byte: not a text file")
    try:
        return data.decode(ENCODING)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{_where(what, path, line)}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                         "save it as UTF-8") from None


def read_lines(path: str, what: str = "file") -> List[Tuple[int, str]]:
    """(line number from 1, the line stripped of surrounding whitespace) of each non-blank line."""
    text = read_text(path, what)
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_csv(path: str, what: str = "CSV file") -> List[Tuple[int, List[str]]]:
    """(line number where the row starts, its fields stripped) of each row with a non-empty field, read by
    Python's csv module (the "excel" dialect: quoted fields may hold commas, quotes and line breaks). Rows
    of empty fields (blank lines, a spreadsheet's ``,,``) are skipped. ValueError naming the file and the
    line for a malformed row (e.g. a quote left open)."""
    text = read_text(path, what)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, start = [], 1
    try:
        for row in reader:
            fields = [field.strip() for field in row]
            if any(fields):
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{_where(what, path, start)}: {e}") from None
    return rows


def read_json(path: str, what: str = "JSON file") -> Any:
    """The parsed JSON of a file (a BOM allowed). ValueError naming the file, the line and the column of a
    syntax error."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{_where(what, path, e.lineno)}, column {e.colno}: not valid JSON: {e.msg}") from None
