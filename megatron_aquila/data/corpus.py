"""A deterministic English sample corpus built offline from the Python standard library.

Documents, in this order: every ``pydoc_data.topics`` help topic (sorted by name), then for each
stdlib ``.py`` file (sorted by path, ``site-packages`` excluded) one document of its docstrings
(module, classes, functions; read with ``ast``, nothing is imported) and one of its comment
paragraphs. The same Python installation always yields the same bytes.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

_SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__"}
_COMMENT_LINE = re.compile(r"^[ \t]*#+ ?(.*)$")
_MIN_COMMENT_PARAGRAPH_CHARS = 80


def _stdlib_files() -> Iterator[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIPPED_DIRECTORIES)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory) / name


def _docstrings(source: str) -> list[str]:
    try:
        with warnings.catch_warnings():  # old stdlib sources hold invalid escapes; not ours to report
            warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
            tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib test files are deliberately invalid
        return []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, nodes))
    return [text for text in found if text]


def _comment_paragraphs(source: str) -> list[str]:
    """Runs of consecutive full-line comments, joined into paragraphs of prose."""
    paragraphs, current = [], []
    for line in source.splitlines() + [""]:
        match = _COMMENT_LINE.match(line)
        if match and not line.lstrip().startswith("#!"):
            current.append(match.group(1).strip())
            continue
        text = " ".join(part for part in current if part)
        if len(text) >= _MIN_COMMENT_PARAGRAPH_CHARS and sum(c.isalpha() for c in text) > len(text) // 2:
            paragraphs.append(text)
        current = []
    return paragraphs


def iter_documents() -> Iterator[str]:
    """Every document of the corpus in its fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    for path in _stdlib_files():
        try:
            source = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for parts in (_docstrings(source), _comment_paragraphs(source)):
            if parts:
                yield "\n\n".join(parts)


def write_sample_corpus(output: str | os.PathLike, target_mb: float = 4.0) -> tuple[int, int]:
    """Write documents as JSONL ``{"text": ...}`` lines until ``target_mb`` x 10^6 bytes.

    Writes to a temporary file and renames it into place. Returns (documents, bytes); fewer bytes
    than asked when the standard library runs out of text.
    """
    output = Path(output)
    target_bytes = int(target_mb * 1_000_000)
    fd, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    documents = written = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for text in iter_documents():
                if written >= target_bytes:
                    break
                line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
                handle.write(line)
                documents += 1
                written += len(line)
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return documents, written
