"""Reading delimited text tables the way spreadsheet programs and instruments write them.

One reader for manifests, plate maps and CellProfiler exports: UTF-8 with or without a byte-order
mark, UTF-16 with one (Excel's "Unicode text") or without, else Windows-1252 (Excel's "CSV" on Windows);
CRLF, CR or LF line ends; the delimiter (comma, semicolon, tab or pipe) detected by the standard
library's csv.Sniffer; surrounding spaces stripped; rows with every cell empty dropped. Every row
keeps the line number it had in the file, so errors can name it.
"""

from __future__ import annotations

import codecs
import csv
import math
import re
import unicodedata
from pathlib import Path

import pandas as pd

from gbm_assets.errors import InputError

DELIMITERS = ",;\t|"
DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
LINE_COLUMN = "_line"  # the 1-based line of the file each row came from
_WORKBOOK_MAGIC = (b"PK\x03\x04", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")  # ZIP (xlsx, ods), OLE2 (xls)


def decode_text(path: Path, data: bytes) -> str:
    """Text of a table file, whatever encoding a spreadsheet program chose, in Unicode NFC.

    Raises InputError (naming the file) for binary content, saying so when it is a spreadsheet
    workbook (.xlsx/.ods are ZIP archives, .xls an OLE2 compound file) whatever its name.
    """
    if data.startswith(_WORKBOOK_MAGIC):
        raise InputError(
            path, "is a spreadsheet workbook (.xlsx, .xls or .ods), not a text table; save it as CSV (File > Save As)"
        )
    if data.startswith(codecs.BOM_UTF8):
        text = data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="strict")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16")
    elif _utf16_without_bom(data):
        text = data.decode(_utf16_without_bom(data), errors="replace")
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("cp1252", errors="replace")
    if "\x00" in text:
        raise InputError(path, "not a text table (binary content)")
    # One text, one spelling: macOS writes accents decomposed (NFD), most programs composed (NFC);
    # "Zürich" in both forms must be one culture, not two.
    return unicodedata.normalize("NFC", text)


def _utf16_without_bom(data: bytes) -> str | None:
    """ "utf-16-le" / "utf-16-be" for UTF-16 text written without a byte-order mark (some
    instruments and scripts do): ASCII text then has a zero in every second byte."""
    if len(data) < 4 or len(data) % 2:
        return None
    head = data[:512]
    even, odd = head[0::2], head[1::2]
    if not any(odd) and all(even):
        return "utf-16-le"
    if not any(even) and all(odd):
        return "utf-16-be"
    return None


def sniff_delimiter(lines: list[str]) -> str:
    """The delimiter of a table from its first lines (comma when only one column is found)."""
    sample = "\n".join(lines[:50])
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        # One-row or irregular samples: the candidate that splits the header into most fields.
        counts = {d: lines[0].count(d) for d in DELIMITERS} if lines else {}
        best = max(counts, key=counts.get, default=",")
        return best if counts.get(best) else ","


def read_delimited(path: str | Path, header_rows: int = 1, what: str = "table") -> pd.DataFrame:
    """Read a delimited table as strings: one column per header field, plus LINE_COLUMN.

    header_rows: 1, or 2 for CellProfiler's combined layout (object name row, then feature row);
    with 2, columns are named "<first>|<second>" with the first row's blanks filled forward.
    The delimiter found is in ``df.attrs["delimiter"]``. Raises InputError naming the file when it
    cannot be read or a row has more fields than the header.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read {what} ({exc.strerror or type(exc).__name__})") from None
    text = decode_text(path, data)
    lines = text.splitlines()
    nonblank = [line for line in lines if line.strip()]
    if len(nonblank) < header_rows:
        raise InputError(path, f"{what} is empty (no header row)")
    hint = re.fullmatch(r"\s*sep=(.)\s*", nonblank[0])  # Excel's "sep=;" first line names the delimiter
    offset = 0  # lines dropped before the table, so that line numbers stay those of the file
    if hint:
        offset = lines.index(nonblank[0]) + 1
        lines = lines[offset:]
        nonblank = nonblank[1:]
        if len(nonblank) < header_rows:
            raise InputError(path, f"{what} is empty (no header row)")
    delimiter = hint.group(1) if hint else sniff_delimiter(nonblank)
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        for fields in reader:
            rows.append([f.strip() for f in fields])
            line_numbers.append(reader.line_num + offset)
    except csv.Error as exc:
        raise InputError(path, f"line {reader.line_num + offset}: malformed {what} ({exc})") from None
    # Leading blank lines before the header are skipped; so are rows with every cell empty.
    keep = [i for i, r in enumerate(rows) if any(r)]
    header, body = keep[:header_rows], keep[header_rows:]
    columns = _column_names([rows[i] for i in header])
    width = len(columns)
    records = []
    for i in body:
        fields = rows[i]
        if len(fields) > width and any(fields[width:]):
            raise InputError(
                path,
                f"line {line_numbers[i]}: {len(fields)} fields but the header has {width} "
                f"(is the {DELIMITER_NAMES[delimiter]} also used inside a value? quote it)",
            )
        records.append(fields[:width] + [""] * (width - len(fields)) + [line_numbers[i]])
    df = pd.DataFrame(records, columns=[*columns, LINE_COLUMN])
    # A spreadsheet's trailing delimiter gives nameless columns with nothing in them: not columns.
    blank = [i for i, name in enumerate(columns) if not name.strip() and not any(r[i] for r in records)]
    if blank:
        df = df.drop(columns=df.columns[blank])
    if df.empty:
        df[LINE_COLUMN] = df[LINE_COLUMN].astype(int)
    df.attrs["delimiter"] = delimiter
    df.attrs["path"] = str(path)
    return df


def _column_names(header: list[list[str]]) -> list[str]:
    if len(header) == 1:
        return header[0]
    first, second = header
    width = max(len(first), len(second))
    first = first + [""] * (width - len(first))
    second = second + [""] * (width - len(second))
    filled, current = [], ""
    for name in first:
        current = name or current
        filled.append(current)
    return [f"{a}|{b}" if a else b for a, b in zip(filled, second, strict=False)]


def describe_header(columns, known) -> str:
    """The header of a table for an error message, naming only the `known` column names found.

    Other names are counted, never quoted: a file linked by mistake (a private text file, say)
    has its first line taken as the header, and an error message must not show its content.
    """
    names = [str(c) for c in columns if c != LINE_COLUMN]
    found = [n for n in names if n in set(known)]
    return f"its header has {len(names)} column(s)" + (
        f", of which {found} are understood" if found else ", none of them understood"
    )


def parse_numbers(
    df: pd.DataFrame,
    column: str,
    kind: type = float,
    what: str = "table",
    decimal_comma: bool | None = None,
    finite: bool = True,
) -> pd.Series:
    """A column of a table read by read_delimited as numbers, or InputError naming line and column.

    decimal_comma: accept "0,5" for 0.5 (default: when the table is not comma-delimited, as a
    European-locale spreadsheet writes it). kind=int refuses fractions ("1.5" is not a replicate);
    finite refuses NaN and infinities.
    """
    path = df.attrs.get("path", what)
    if decimal_comma is None:
        decimal_comma = df.attrs.get("delimiter", ",") != ","
    values = []
    for text, line in zip(df[column], df[LINE_COLUMN], strict=False):
        raw = str(text).strip()
        candidate = raw.replace(",", ".") if decimal_comma and raw.count(",") == 1 and "." not in raw else raw
        try:
            number = float(candidate)
        except ValueError:
            hint = (
                " (a decimal comma? the table is comma-delimited: use '.' or ';' as separator)"
                if "," in raw and not decimal_comma
                else ""
            )
            raise InputError(path, f"line {line}, column {column!r}: {raw!r} is not a number{hint}") from None
        if finite and not math.isfinite(number):
            raise InputError(path, f"line {line}, column {column!r}: {raw!r} is not a finite number")
        if kind is int:
            if not number.is_integer():
                raise InputError(path, f"line {line}, column {column!r}: {raw!r} is not a whole number")
            number = int(number)
        values.append(number)
    return pd.Series(values, index=df.index, dtype="int64" if kind is int else "float64", name=column)
