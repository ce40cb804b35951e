"""CSV files that a spreadsheet opens as text, never as formulas (OWASP "CSV Injection").

A culture, plate or image name is data typed by a person or taken from a file name. Written raw
into a CSV, a name such as ``=HYPERLINK("http://x","y")``, ``@SUM(A1)`` or ``-2+cmd|' /C calc'!A0``
is run as a formula by Excel, LibreOffice or Google Sheets when a colleague opens the file.
Following OWASP's "CSV Injection" recommendation (https://owasp.org/www-community/attacks/CSV_Injection),
every text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab (0x09) or a carriage return
(0x0D) is prefixed with a single quote ``'``, which spreadsheets show as text; pandas' CSV
quoting takes care of the field separator and double quotes.

Numbers are never touched: numeric columns keep their values (-0.5 stays the number -0.5), and
a text cell that is a plain number as Python writes one ("-0.5", "-3", "-1e-05") stays as it is,
since a spreadsheet reads it as that number and nothing else. Everything else that starts with a
trigger character, "+1" included, is neutralised.

This module is part of the pure core: it imports pandas only.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

# OWASP "CSV Injection": characters that make a spreadsheet cell a formula (or a DDE call).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"
# A number as Python / pandas writes one: an optional minus, digits, a decimal part, an exponent.
_PLAIN_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def neutralise_cell(value: Any) -> Any:
    """value with a leading ``'`` if it is a str that a spreadsheet would run as a formula.

    Non-str values (numbers, None, NaN, timestamps) and strings that are plain numbers
    ("-0.5") are returned unchanged.
    """
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS) and not _PLAIN_NUMBER.fullmatch(value):
        return ESCAPE + value
    return value


def _is_text(values: pd.Series | pd.Index) -> bool:
    dtype = values.dtype
    return (
        pd.api.types.is_object_dtype(dtype)
        or pd.api.types.is_string_dtype(dtype)
        or isinstance(dtype, pd.CategoricalDtype)
    )


def _neutralise_values(values: pd.Series) -> pd.Series:
    if isinstance(values.dtype, pd.CategoricalDtype):
        return values.cat.rename_categories([neutralise_cell(c) for c in values.cat.categories])
    return values.map(neutralise_cell, na_action="ignore")


def neutralise_formulas(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of table whose text cells, text index labels and column names cannot run as formulas.

    Only object, string and categorical columns are changed, and in them only str cells starting
    with a formula trigger (FORMULA_TRIGGERS) that are not plain numbers; numeric, boolean and
    datetime columns are returned with identical values and dtypes. Raises TypeError if table
    is not a DataFrame.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(table).__name__}")
    out = table.copy()
    for k in range(out.shape[1]):
        column = out.iloc[:, k]
        if _is_text(column):
            out.isetitem(k, _neutralise_values(column))
    out.columns = out.columns.map(neutralise_cell)
    if not isinstance(out.index, pd.MultiIndex) and _is_text(out.index):
        out.index = out.index.map(neutralise_cell)
    return out


def to_csv_safe(table: pd.DataFrame, path_or_buf=None, **to_csv_kwargs) -> str | None:
    """DataFrame.to_csv of neutralise_formulas(table): the CSV text if path_or_buf is None.

    Lines end in CRLF (RFC 4180) unless lineterminator is given: the csv writer quotes only
    fields holding a character of the line terminator, and with pandas' default "\n" a carriage
    return inside a name was written unquoted, so a spreadsheet started a new row there, whose
    first cell ("x\r=cmd") was no longer neutralised. to_csv_kwargs are passed to pandas
    (index=False, float_format=...); errors are pandas'.
    """
    to_csv_kwargs.setdefault("lineterminator", "\r\n")
    return neutralise_formulas(table).to_csv(path_or_buf, **to_csv_kwargs)
