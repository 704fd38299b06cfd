"""Prompt sheets: `.txt` (one prompt a line), `.csv` / `.tsv` with a prompt column (the
PartiPrompts layout, columns `Prompt`, `Category`, `Challenge`, `Note`, works as is), or
`.jsonl` with `prompt` and optional `id`, `category`, `seed`.

Every bad row is a `SheetError` naming the file and the line. Prompt ids name files, so
they are made file-safe and must be unique; a row without an id gets its 0-based index.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

UNCATEGORISED = "uncategorised"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class SheetError(ValueError):
    """A prompt sheet row that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class PromptRow:
    id: str  # file-safe, unique in the sheet
    prompt: str
    category: str
    seed: int | None  # this row's own base seed, else the run's
    line: int  # 1-based line in the sheet


def derive_seed(seed: int, prompt_id: str, index: int) -> int:
    """The seed of image `index` of a prompt: a hash of (seed, prompt id, index), so any
    image can be regenerated alone, whatever else the run generated."""
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _row(path: Path, line: int, index: int, prompt, category, row_id, seed) -> PromptRow:
    where = f"{path}:{line}"
    if not isinstance(prompt, str) or not prompt.strip():
        raise SheetError(f"{where}: empty prompt")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SheetError(f"{where}: seed must be an integer, got {seed!r}")
    raw_id = str(index) if row_id is None or str(row_id).strip() == "" else str(row_id).strip()
    safe_id = _UNSAFE.sub("_", raw_id).strip("._") or str(index)
    category = str(category).strip() if category is not None and str(category).strip() else UNCATEGORISED
    return PromptRow(safe_id, prompt.strip(), category, seed, line)


def _read_txt(path: Path, text: str) -> list[PromptRow]:
    """Blank lines and `#` comments are skipped; every other line is a prompt."""
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if raw.strip() and not raw.lstrip().startswith("#"):
            rows.append(_row(path, line, len(rows), raw, None, None, None))
    return rows


def _find_column(header: list[str], name: str) -> str | None:
    for column in header:
        if column.strip().lower() == name:
            return column
    return None


def _read_table(path: Path, text: str, delimiter: str) -> list[PromptRow]:
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    header = reader.fieldnames or []
    prompt_col = _find_column(header, "prompt")
    if prompt_col is None:
        raise SheetError(f"{path}:1: no prompt column (a column named 'prompt' or 'Prompt'); header is {header}")
    category_col, id_col, seed_col = (_find_column(header, c) for c in ("category", "id", "seed"))
    rows = []
    for record in reader:
        line = reader.line_num
        if None in record:
            raise SheetError(f"{path}:{line}: {len(header) + len(record[None])} fields, the header has {len(header)}")
        if record[prompt_col] is None:
            raise SheetError(f"{path}:{line}: missing the prompt column '{prompt_col}'")
        seed = record.get(seed_col) if seed_col else None
        if seed is not None and seed.strip():
            try:
                seed = int(seed)
            except ValueError:
                raise SheetError(f"{path}:{line}: seed must be an integer, got {seed!r}") from None
        else:
            seed = None
        rows.append(_row(path, line, len(rows), record[prompt_col], record.get(category_col) if category_col else None,
                         record.get(id_col) if id_col else None, seed))
    return rows


def _read_jsonl(path: Path, text: str) -> list[PromptRow]:
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SheetError(f"{path}:{line}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise SheetError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        if "prompt" not in record:
            raise SheetError(f"{path}:{line}: no 'prompt' key (keys: {sorted(record)})")
        rows.append(_row(path, line, len(rows), record["prompt"], record.get("category"), record.get("id"),
                         record.get("seed")))
    return rows


def read_sheet(path: str | Path) -> list[PromptRow]:
    """The rows of a prompt sheet, by its extension: .txt, .csv, .tsv or .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt sheet not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rows = _read_txt(path, text)
    elif suffix in (".csv", ".tsv"):
        rows = _read_table(path, text, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        rows = _read_jsonl(path, text)
    else:
        raise SheetError(f"{path}: unknown sheet type '{suffix}'; use .txt, .csv, .tsv or .jsonl")
    if not rows:
        raise SheetError(f"{path}: no prompts")
    seen: dict[str, int] = {}
    for row in rows:
        if row.id in seen:
            raise SheetError(f"{path}:{row.line}: prompt id '{row.id}' already used on line {seen[row.id]}")
        seen[row.id] = row.line
    return rows
