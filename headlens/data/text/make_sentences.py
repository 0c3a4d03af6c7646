"""Rebuild ``sentences.txt``: real English sentences from the Python documentation prose that
ships with the standard library (``pydoc_data.topics``), chosen deterministically.

Rule: walk the topics in sorted order; drop headings and indented (code) blocks; join each prose
paragraph, split it into sentences after ``.``/``?``/``!`` followed by a capital letter; keep a
sentence when it starts with a capital letter, ends with a full stop, has 8 to 28 words and no
code-like characters; drop duplicates; take ``N_SENTENCES`` evenly spaced ones from what is left.

Run ``python3 headlens/data/text/make_sentences.py`` (writes ``sentences.txt`` next to this file).
The committed file is the reference: the prose may differ between Python versions.
"""
from __future__ import annotations

import os
import pydoc_data.topics
import re

N_SENTENCES = 400
MIN_WORDS, MAX_WORDS = 8, 28
CODE_CHARS = set("=*`>[]{}_\\/|#@$%^~<;")
SPLIT = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf", "Dr", "Mr")


def prose_paragraphs(text: str):
    """Paragraphs of unindented lines that are not headings or underlines."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.startswith((" ", "\t")) for line in lines):
            continue  # code, grammar or an indented note
        lines = [ln for ln in lines if ln.strip() and not re.fullmatch(r"[*=\-~^]+", ln.strip())]
        if len(lines) < 2 and lines and not lines[0].rstrip().endswith("."):
            continue  # a heading
        yield " ".join(ln.strip() for ln in lines)


def good_sentence(s: str) -> bool:
    words = s.split()
    return (MIN_WORDS <= len(words) <= MAX_WORDS and s[0].isupper() and s.endswith(".")
            and not (set(s) & CODE_CHARS) and not any(a + "." in s for a in ABBREVIATIONS)
            and s.count('"') % 2 == 0 and s.count("(") == s.count(")") and s.isascii())


def sentences() -> list[str]:
    seen, kept = set(), []
    for key in sorted(pydoc_data.topics.topics):
        for paragraph in prose_paragraphs(pydoc_data.topics.topics[key]):
            for s in SPLIT.split(paragraph):
                s = " ".join(s.split())
                if good_sentence(s) and s not in seen:
                    seen.add(s)
                    kept.append(s)
    if len(kept) <= N_SENTENCES:
        return kept
    step = len(kept) / N_SENTENCES
    return [kept[int(i * step)] for i in range(N_SENTENCES)]


if __name__ == "__main__":
    chosen = sentences()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentences.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(chosen) + "\n")
    print(f"wrote {len(chosen)} sentences to {path}")
