"""Regenerate the bundled task files in this folder, deterministically (run from anywhere):

    python headlens/data/tasks/make_tasks.py

- ``paraphrase.jsonl``: (anchor, positive, negative) sentence triples for sentence-embedding
  models such as MiniLM. Three template families (field ``type``): a question and its paraphrase
  against the same question about another object (``topic``); an active sentence and its passive
  paraphrase against the active sentence with another object (``object``) or with the roles
  swapped (``roles``, hard: bag-of-words models prefer the distractor); a sentence and a synonym
  rewrite against the same frame with another subject (``synonym``).
- ``ioi.jsonl``: IOI-style prompts (Wang et al. 2022) for decoders: the right continuation is the
  indirect object, the wrong one the repeated subject; ``corrupted`` replaces the second subject
  mention by a third name (the "ABC" counterfactual) for attribution patching.
- ``word_order.jsonl``: (anchor, positive, negative) triples whose negative has exactly the
  anchor's words in another order, with the roles swapped (who did what to whom): the positive
  is the anchor's passive (``passive``), its comparative turned round (``comparative``) or its
  dative shift (``dative``). A bag-of-words model scores the negative as identical to the anchor,
  so a positive margin needs word order, i.e. attention; the report's uniform-attention control
  measures how much of it a model keeps without.
- ``pydoc_text.txt``: real English prose paragraphs from the Python documentation shipped in the
  standard library (``pydoc_data.topics``), one per line, code examples dropped.
"""
from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

from headlens.data.corpora import pydoc_paragraphs

HERE = Path(__file__).resolve().parent

QUESTIONS = [
    ("How do I reset my {o}?", "What is the way to reset my {o}?"),
    ("Where can I buy a cheap {o}?", "Which shop sells an inexpensive {o}?"),
    ("How long does it take to repair a {o}?", "How much time is needed to fix a {o}?"),
    ("Is it safe to leave my {o} outside overnight?", "Can my {o} stay outdoors during the night?"),
    ("What should I do if my {o} stops working?", "My {o} is broken, how can I fix it?"),
    ("How often should I clean my {o}?", "How frequently does my {o} need cleaning?"),
]
OBJECTS = ["password", "bicycle", "laptop", "washing machine", "car", "phone", "garden hose",
           "printer", "guitar", "coffee maker", "router", "watch"]

AGENTS = ["dog", "cat", "teacher", "doctor", "farmer", "child", "police officer", "lawyer",
          "bird", "horse", "student", "soldier"]
ACTIONS = [("chased", "was chased by"), ("helped", "was helped by"), ("followed", "was followed by"),
           ("called", "was called by"), ("pushed", "was pushed by"), ("found", "was found by")]

SYNONYM_FRAMES = [
    ("The {s} bought a big house near the sea.", "The {s} purchased a large home by the ocean.",
     "The {t} bought a big house near the sea."),
    ("The {s} was very happy with the results.", "The {s} was delighted by the outcome.",
     "The {t} was very happy with the results."),
    ("The {s} started the car and drove away quickly.", "The {s} turned on the vehicle and left fast.",
     "The {t} started the car and drove away quickly."),
    ("The {s} cooked dinner for the whole family.", "The {s} prepared an evening meal for everyone at home.",
     "The {t} cooked dinner for the whole family."),
]
PEOPLE = ["musician", "banker", "nurse", "pilot", "chef", "painter", "scientist", "carpenter"]

NAMES = ["Mary", "John", "Tom", "James", "Anna", "Paul", "Lisa", "Mark", "Sarah", "David",
         "Kate", "Peter", "Emma", "Mike", "Laura", "Daniel"]
PLACES = ["store", "park", "school", "beach", "market", "office", "restaurant", "hospital"]
THINGS = ["drink", "book", "ball", "gift", "key", "letter", "snack", "pen"]
IOI_TEMPLATES = [
    "When {A} and {B} went to the {P}, {S} gave a {T} to",
    "After {A} and {B} arrived at the {P}, {S} handed a {T} to",
    "Then, {A} and {B} had a long day at the {P}. {S} gave a {T} to",
    "While {A} and {B} were working at the {P}, {S} passed a {T} to",
]


def paraphrase_items(rng: random.Random) -> list[dict]:
    items = []
    for (q, p), o in itertools.product(QUESTIONS, OBJECTS):
        other = rng.choice([x for x in OBJECTS if x != o])
        items.append({"type": "topic", "anchor": q.format(o=o), "positive": p.format(o=o),
                      "negative": q.format(o=other)})
    frames = list(itertools.product(ACTIONS, itertools.permutations(AGENTS, 2)))
    for (active, passive), (a, b) in rng.sample(frames, 96):
        c = rng.choice([x for x in AGENTS if x not in (a, b)])
        items.append({"type": "object", "anchor": f"The {a} {active} the {b}.",
                      "positive": f"The {b} {passive} the {a}.", "negative": f"The {a} {active} the {c}."})
    for (active, passive), (a, b) in rng.sample(frames, 32):
        items.append({"type": "roles", "anchor": f"The {a} {active} the {b}.",
                      "positive": f"The {b} {passive} the {a}.", "negative": f"The {b} {active} the {a}."})
    for (anchor, pos, neg), s in itertools.product(SYNONYM_FRAMES, PEOPLE):
        t = rng.choice([x for x in PEOPLE if x != s])
        items.append({"type": "synonym", "anchor": anchor.format(s=s), "positive": pos.format(s=s),
                      "negative": neg.format(t=t)})
    rng.shuffle(items)
    return items


def ioi_items(rng: random.Random, n: int = 320) -> list[dict]:
    items = []
    for i in range(n):
        a, b, c = rng.sample(NAMES, 3)
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        place, thing = rng.choice(PLACES), rng.choice(THINGS)
        if i % 2:  # ABBA: the subject is the second name
            s, io = b, a
        else:  # BABA
            s, io = a, b
        fill = dict(A=a, B=b, P=place, T=thing)
        items.append({"prompt": template.format(S=s, **fill), "right": " " + io, "wrong": " " + s,
                      "corrupted": template.format(S=c, **fill)})
    return items


COMPARATIVES = [("taller", "shorter"), ("older", "younger"), ("faster", "slower"), ("stronger", "weaker"),
                ("richer", "poorer"), ("heavier", "lighter")]
DATIVE = [("gave", "a {t} to"), ("sent", "a {t} to"), ("showed", "a {t} to"), ("handed", "a {t} to")]


def word_order_items(rng: random.Random, n_per_type: int = 96) -> list[dict]:
    items = []
    pairs = list(itertools.permutations(AGENTS, 2))
    for (active, passive), (a, b) in rng.sample(list(itertools.product(ACTIONS, pairs)), n_per_type):
        items.append({"type": "passive", "anchor": f"The {a} {active} the {b}.",
                      "positive": f"The {b} {passive} the {a}.", "negative": f"The {b} {active} the {a}."})
    for (more, less), (a, b) in rng.sample(list(itertools.product(COMPARATIVES, pairs)), n_per_type):
        items.append({"type": "comparative", "anchor": f"The {a} is {more} than the {b}.",
                      "positive": f"The {b} is {less} than the {a}.", "negative": f"The {b} is {more} than the {a}."})
    for (verb, obj), (a, b) in rng.sample(list(itertools.product(DATIVE, pairs)), n_per_type):
        t = rng.choice(THINGS)
        items.append({"type": "dative", "anchor": f"The {a} {verb} the {b} a {t}.",
                      "positive": f"The {a} {verb} {obj.format(t=t)} the {b}.",
                      "negative": f"The {b} {verb} the {a} a {t}."})
    rng.shuffle(items)
    return items


def pydoc_lines(max_lines: int = 400, max_words: int = 48) -> list[str]:
    lines = []
    for text in pydoc_paragraphs():
        words = text.split()
        if len(words) < 12 or not text.endswith("."):
            continue
        if len(words) > max_words:  # keep whole sentences up to max_words
            cut = [m.end() for m in re.finditer(r"\.\s", text) if len(text[:m.end()].split()) <= max_words]
            if not cut:
                continue
            text = text[:cut[-1]].strip()
        lines.append(text)
    return lines[:max_lines]


def main() -> None:
    rng = random.Random(0)
    for name, items in (("paraphrase.jsonl", paraphrase_items(rng)), ("ioi.jsonl", ioi_items(rng))):
        (HERE / name).write_text("".join(json.dumps(x) + "\n" for x in items))
    (HERE / "pydoc_text.txt").write_text("".join(x + "\n" for x in pydoc_lines()))
    # its own generator, so that adding it left the files above byte for byte as they were
    items = word_order_items(random.Random(1))
    (HERE / "word_order.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))


if __name__ == "__main__":
    main()
