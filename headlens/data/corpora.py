"""Reading text corpora: the non-empty lines of a UTF-8 file, lazily, and the bundled sentences."""
from __future__ import annotations

import os
from typing import Iterator, Optional

from headlens.data import TEXT_DIR
from headlens.errors import HeadlensError, check

SENTENCES_PATH = str(TEXT_DIR / "sentences.txt")


def numbered_lines(path, limit: Optional[int] = None, what: str = "text file") -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of the non-empty lines of a UTF-8 file, stripped, read lazily (at most
    ``limit``). A line that is not UTF-8 raises :class:`HeadlensError` naming the file and the line;
    a missing file raises at once (``what`` names the file in messages, e.g. ``"task file"``)."""
    path = os.fspath(path)
    check(os.path.isfile(path), f"{what} {path!r} does not exist")
    check(limit is None or limit >= 1, f"limit must be >= 1 or None, got {limit}")

    def lines() -> Iterator[tuple[int, str]]:
        n = 0
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise HeadlensError(f"{what} {path!r}, line {number}: not UTF-8 text ({e.reason} at byte "
                                        f"{e.start}); save the file as UTF-8") from None
                if line:
                    yield number, line
                    n += 1
                    if limit is not None and n >= limit:
                        return

    return lines()


def read_lines(path, limit: Optional[int] = None) -> Iterator[str]:
    """The non-empty lines of a UTF-8 text file, stripped, read lazily one at a time (at most
    ``limit``): a dataset larger than memory streams through :func:`batches` (and every analysis
    that takes an iterable of texts). Raises :class:`HeadlensError` at once if the file is missing,
    and naming the line if one is not UTF-8."""
    return (line for _, line in numbered_lines(path, limit))


def read_texts(path: str, n: Optional[int] = None) -> list[str]:
    """The non-empty lines of a UTF-8 text file (the first ``n`` of them if given)."""
    check(n is None or n >= 1, f"n must be >= 1, got {n}")
    texts = list(read_lines(path, n))
    check(len(texts) > 0, f"text file {path!r} has no non-empty lines")
    return texts


def bundled_sentences(n: Optional[int] = None) -> list[str]:
    """The bundled real English sentences (Python documentation prose, see
    ``headlens/data/text/make_sentences.py``): 400 lines, or the first ``n``."""
    return read_texts(SENTENCES_PATH, n)


def pydoc_paragraphs() -> Iterator[str]:
    """The prose paragraphs of Python's documentation (``pydoc_data.topics``, topics in sorted
    order), each joined into one line; code, grammar rules, headings and non-ASCII text left out."""
    import re
    from pydoc_data.topics import topics

    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            raw = para.split("\n")
            if any(x.startswith(" ") for x in raw) or "::" in para or "***" in para or "===" in para:
                continue  # code, grammar rules, headings
            text = " ".join(x.strip() for x in raw).strip()
            if text.isascii():
                yield text
