"""Build a JSONL demo corpus from the Python standard library, so the quickstart needs no download.

Every machine with Python has the standard library's source: each .py file becomes one document
(its source code), followed by one document of its docstrings in prose form (module, classes, functions,
each under its qualified name). Files are visited in a seeded shuffle of their sorted paths, so the
corpus is the same on every run with the same Python, and the validation split (the last documents) is
a sample of the whole library rather than its alphabetical tail.

    python tools/build_demo_corpus.py --output data/demo.jsonl --max-mb 8

For benchmarks, --site-packages adds the installed packages and --min-mb repeats the corpus until it
reaches a size (the repetition is a benchmark device, not something to train on).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class CorpusConfig:
    output: str
    max_mb: float = 8.0
    min_mb: float = 0.0
    site_packages: bool = False
    docstrings: bool = True
    seed: int = 1234


def source_files(site_packages: bool) -> list[tuple[str, str]]:
    """(path, name shown in the corpus) of every .py file of the standard library (and site-packages)."""
    paths = sysconfig.get_paths()
    stdlib = paths["stdlib"]
    roots = [("stdlib", stdlib)]
    if site_packages:
        roots.append(("site-packages", paths["purelib"]))
    # The stdlib root holds the interpreter's own site-packages, which is the environment's only outside a venv:
    # inside one, purelib is the venv's and the interpreter's packages would pass for the standard library, so the
    # corpus would change with whatever is installed there (the quickstart's validation loss moved from 4.45 to 5.13
    # between two machines, the second's interpreter holding sympy and others; session 28). Packages are read only
    # when asked for, from purelib, under their own label.
    skip = {os.path.realpath(paths[key]) for key in ("purelib", "platlib")}
    skip |= {os.path.realpath(os.path.join(stdlib, name)) for name in ("site-packages", "dist-packages")}
    files = []
    for label, root in roots:
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = sorted(
                d for d in subdirectories if d != "__pycache__"
                and (label != "stdlib" or os.path.realpath(os.path.join(directory, d)) not in skip))
            for name in sorted(names):
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    files.append((path, f"{label}/{os.path.relpath(path, root)}"))
    return files


def docstrings(tree: ast.Module, module: str) -> Iterator[str]:
    """'qualified.name' followed by its docstring, for the module and every class and function in it."""
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, name = stack.pop(0)
        text = ast.get_docstring(node)
        if text:
            yield f"{name}\n\n{text}"
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((child, f"{name}.{child.name}"))


def documents(config: CorpusConfig) -> Iterator[dict]:
    files = source_files(config.site_packages)
    random.Random(config.seed).shuffle(files)
    for path, shown in files:
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        if not source.strip():
            continue
        yield {"text": source, "source": shown}
        if config.docstrings:
            try:
                tree = ast.parse(source)
            except (SyntaxError, ValueError):
                continue  # test files with deliberate syntax errors
            module = shown.removesuffix(".py").replace("/", ".")
            prose = "\n\n".join(docstrings(tree, module))
            if prose:
                yield {"text": prose, "source": shown + " (docstrings)"}


def build(config: CorpusConfig) -> tuple[int, int]:
    """Write the corpus; returns (documents, bytes). Stops at max_mb; repeats the library to reach min_mb."""
    limit = int(config.max_mb * 1e6) if config.max_mb > 0 else sys.maxsize
    target = int(config.min_mb * 1e6)
    count, size = 0, 0
    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    temporary = config.output + ".tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        while True:
            added = 0
            for document in documents(config):
                line = json.dumps(document, ensure_ascii=False) + "\n"
                encoded = len(line.encode("utf-8"))
                if size + encoded > limit:
                    break
                out.write(line)
                count, size, added = count + 1, size + encoded, added + 1
            if size >= target or added == 0 or size >= limit:
                break
    os.replace(temporary, config.output)
    return count, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write (one {'text', 'source'} object per line)")
    parser.add_argument("--max-mb", type=float, default=8.0, help="stop before the corpus exceeds this many MB (0: no limit)")
    parser.add_argument("--min-mb", type=float, default=0.0, help="repeat the library until the corpus has this many MB (benchmarks)")
    parser.add_argument("--site-packages", action="store_true", help="also read the installed packages (site-packages)")
    parser.add_argument("--no-docstrings", action="store_true", help="source files only, no docstring documents")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the file order")
    args = parser.parse_args(argv)
    config = CorpusConfig(args.output, args.max_mb, args.min_mb, args.site_packages, not args.no_docstrings, args.seed)
    count, size = build(config)
    print(f"wrote {count} documents, {size / 1e6:.1f} MB to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
