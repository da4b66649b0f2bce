"""Reading raw corpora: input file lists, JSONL lines with clear errors, plain text.

A corpus is one or more JSONL files (one JSON object per line, optionally .gz compressed) whose
``--json-keys`` fields hold the text. Plain-text files (any other extension) are read line by line,
which only the tokenizer trainer accepts. Blank lines are skipped. Every parse problem raises
DataError as ``FILE:LINE: what is wrong``.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator

from megatron_gdn.data.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Paths and glob patterns -> files, each pattern's matches sorted, in the order the patterns came."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
            if not matches:
                raise DataError(f"{pattern}: no file matches this input pattern")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise DataError(f"{pattern}: no such input file")
    if not files:
        raise DataError("no input files given")
    return files


def is_gzip(path: str) -> bool:
    return path.endswith(".gz")


def is_json(path: str) -> bool:
    return path.endswith(JSON_SUFFIXES)


def open_binary(path: str):
    """The file's (decompressed) bytes as a binary stream."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


class BadLine(Exception):
    """What is wrong with one line; the caller adds the file and line number (known only there)."""


def _utf8_reason(line: bytes, error: UnicodeDecodeError) -> str:
    return f"byte 0x{line[error.start]:02x} at column {error.start + 1} is not valid UTF-8"


def parse_json_line(line: bytes, json_keys: list[str]) -> list[str]:
    """The texts under ``json_keys`` of one JSONL line; raises BadLine saying what is wrong."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError as error:
        raise BadLine(_utf8_reason(line, error)) from None
    except json.JSONDecodeError as error:
        raise BadLine(f"malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object per line, got {type(record).__name__}")
    texts = []
    for key in json_keys:
        if key not in record:
            keys = ", ".join(sorted(record)[:10])
            raise BadLine(f"no key {key!r} in this JSON object (its keys: {keys}); see --json-keys")
        text = record[key]
        if not isinstance(text, str):
            raise BadLine(f"the value of {key!r} is {type(text).__name__}, expected a string")
        texts.append(text)
    return texts


def iter_texts(paths: list[str], json_keys: list[str]) -> Iterator[str]:
    """Every text of a corpus: the json_keys fields of JSONL files, the lines of plain-text files."""
    for path in paths:
        with open_binary(path) as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    if is_json(path):
                        yield from parse_json_line(line, json_keys)
                    else:
                        try:
                            yield line.decode("utf-8").rstrip("\r\n")
                        except UnicodeDecodeError as error:
                            raise BadLine(_utf8_reason(line, error)) from None
                except BadLine as error:
                    raise DataError(f"{path}:{number}: {error}") from None
