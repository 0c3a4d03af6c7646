"""Regenerate the long-context task data in this folder, deterministically (run from anywhere):

    python headlens/data/longcontext/make_longcontext.py

- ``haystack.txt``: real English prose from the Python documentation shipped in the standard
  library (``pydoc_data.topics``), one paragraph per line, code, grammar rules and headings
  dropped. Its first half is the haystack of the ``select`` split, its second half that of
  ``heldout``: the two splits share no text.
- ``tasks.jsonl``: one record per example. ``kind``: ``passkey`` (Mohtashami & Jaggi 2023's pass
  key, said twice in one needle), ``needle`` (one "special magic number" fact, as in RULER's
  single-key needle), ``multikey`` (four such facts for different cities, one asked for),
  ``lm`` (the document's last ``n_answer`` tokens are scored); ``length``: 512 to 8192 tokens;
  ``split``: select / heldout; ``offset``: where in ``haystack.txt`` the prose starts; ``needles``:
  texts and depths (fraction of the haystack); ``asked``: which needle the question is about;
  ``question``, ``answer``.

The records hold no tokens: :func:`headlens.longcontext.tasks.build_example` builds each example
for a model's tokenizer to exactly ``length`` tokens.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from headlens.data.corpora import pydoc_paragraphs

HERE = Path(__file__).resolve().parent
LENGTHS = (512, 1024, 2048, 4096, 8192)
PER_GROUP = {512: 16, 1024: 16, 2048: 16, 4096: 8, 8192: 8}  # examples per (kind, length, split)
CHARS_PER_TOKEN = 6  # the records' prose windows hold 6 * length characters: enough for any tokenizer
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hanoi", "Dakar", "Perth", "Bergen", "Cusco",
          "Tbilisi", "Leeds", "Accra", "Austin", "Malmo", "Sapporo", "Porto", "Zagreb", "Halifax", "Mysore"]


def paragraphs() -> list[str]:
    return [text for text in pydoc_paragraphs() if len(text.split()) >= 8]


def magic_needle(city: str, number: int) -> str:
    return f" The special magic number for {city} is {number}."


def records(halves: list[tuple[int, int]], rng: random.Random) -> list[dict]:
    out = []
    for length in LENGTHS:
        for split, (lo, hi) in zip(("select", "heldout"), halves):
            window = CHARS_PER_TOKEN * length
            if hi - lo < window:
                raise SystemExit(f"haystack half too short for {length} tokens")
            for kind in ("passkey", "needle", "multikey", "lm"):
                n = PER_GROUP[length]
                for i in range(n):
                    rec = dict(id=f"{kind}-{length}-{split}-{i:02d}", kind=kind, length=length, split=split,
                               offset=rng.randrange(lo, hi - window))
                    depth = round(0.1 + 0.8 * (i + rng.random()) / n, 3)  # spread over the haystack
                    if kind == "lm":
                        rec.update(n_answer=64)
                    elif kind == "passkey":
                        key = rng.randrange(10000, 100000)
                        rec.update(needles=[dict(text=f" The pass key is {key}. Remember it. {key} is the pass key.",
                                                 depth=depth)], asked=0,
                                   question="\nWhat is the pass key? The pass key is", answer=f" {key}")
                    elif kind == "needle":
                        city, number = rng.choice(CITIES), rng.randrange(1000000, 10000000)
                        rec.update(needles=[dict(text=magic_needle(city, number), depth=depth)], asked=0,
                                   question=f"\nWhat is the special magic number for {city}? "
                                            f"The special magic number for {city} is", answer=f" {number}")
                    else:
                        cities = rng.sample(CITIES, 4)
                        numbers = [rng.randrange(1000000, 10000000) for _ in cities]
                        depths = sorted(round(0.05 + 0.9 * (k + rng.random()) / 4, 3) for k in range(4))
                        asked = rng.randrange(4)
                        rec.update(needles=[dict(text=magic_needle(c, x), depth=d)
                                            for c, x, d in zip(cities, numbers, depths)], asked=asked,
                                   question=f"\nWhat is the special magic number for {cities[asked]}? "
                                            f"The special magic number for {cities[asked]} is",
                                   answer=f" {numbers[asked]}")
                    out.append(rec)
    return out


def main() -> None:
    text = "\n".join(paragraphs()) + "\n"
    (HERE / "haystack.txt").write_text(text, encoding="utf-8")
    half = len(text) // 2
    half = text.index("\n", half) + 1  # the second half starts at a paragraph
    recs = records([(0, half), (half, len(text))], random.Random(17))
    (HERE / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    print(f"haystack: {len(text)} characters; {len(recs)} records")


if __name__ == "__main__":
    main()
