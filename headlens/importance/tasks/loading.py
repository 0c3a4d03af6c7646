"""Reading tasks: bundled task names, text files (LM / MLM loss, fidelity) and JSONL files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import pandas as pd

from headlens.data import TASKS_DIR
from headlens.data.streams import is_data_file, open_records
from headlens.errors import HeadlensError, check
from headlens.importance.tasks.base import Task
from headlens.importance.tasks.types import (
    ContrastTask,
    EmbeddingContrastTask,
    FidelityTask,
    LMLossTask,
    MLMLossTask,
    RepeatedHalfTask,
)
from headlens.model.tokens import induction_tokens

BUNDLED_TASKS = {
    "paraphrase": ("paraphrase.jsonl", None, "sentence triples (paraphrase vs. distractor) for embedding models"),
    "word-order": ("word_order.jsonl", None, "role-swap sentence triples whose distractor has the anchor's words "
                                             "in another order, for embedding models (needs word order)"),
    "ioi": ("ioi.jsonl", None, "IOI-style indirect-object prompts with ABC counterfactuals, for decoders"),
    "text": ("pydoc_text.txt", None, "Python-docs prose: LM loss, MLM loss or embedding fidelity by model"),
    "lm": ("pydoc_text.txt", "lm", "Python-docs prose, next-token loss"),
    "mlm": ("pydoc_text.txt", "mlm", "Python-docs prose, masked-token loss"),
    "fidelity": ("pydoc_text.txt", "fidelity", "Python-docs prose, faithfulness to the unablated model"),
}
TEXT_TASKS = {"lm": LMLossTask, "mlm": MLMLossTask, "fidelity": FidelityTask}
# tasks generated for the model rather than read from a file
GENERATED_TASKS = {"repeated": "repeated random tokens [BOS, x, x]: next-token loss on the second copy (decoders; "
                               "encoders: faithfulness); the default for models without a tokenizer"}
N_GENERATED = 48  # examples of a generated task unless n_examples says otherwise


def list_tasks() -> pd.DataFrame:
    """The bundled tasks: name, file, description."""
    rows = [(n, f, d) for n, (f, _, d) in BUNDLED_TASKS.items()] + [(n, "", d) for n, d in GENERATED_TASKS.items()]
    return pd.DataFrame(rows, columns=["name", "file", "description"])


def default_task_name(model) -> str:
    """``repeated`` for models without a tokenizer; else ``ioi`` for decoders, ``text`` (MLM
    loss) for MLM encoders, ``paraphrase`` otherwise."""
    if model.tokenizer is None:
        return "repeated"
    if model.cfg.causal:
        return "ioi"
    return "text" if model.unembed is not None else "paraphrase"


def _text_task_type(model) -> str:
    if model is None or (model.cfg.causal and model.unembed is not None):
        return "lm"
    return "mlm" if model.unembed is not None else "fidelity"


def load_task(name_or_path: Union[str, Path, Task], model=None, task_type: Optional[str] = None,
              n_examples: Optional[int] = None, **options) -> Task:
    """A task from a bundled name (see :func:`list_tasks`), a text file (one example per line)
    or a JSONL or Parquet file or saved ``datasets`` folder (records with
    ``prompt/right/wrong[/corrupted]``, ``anchor/positive/negative`` or ``text``), read lazily. ``task_type`` picks the text task (``lm``, ``mlm``, ``fidelity``; default: by
    ``model``); ``n_examples`` keeps the first n; ``options`` go to the task's constructor."""
    if isinstance(name_or_path, Task):
        task = name_or_path
    else:
        name = str(name_or_path)
        if name in GENERATED_TASKS:
            return _repeated_task(model, n_examples or N_GENERATED, options)
        if name in BUNDLED_TASKS:
            path, task_type = TASKS_DIR / BUNDLED_TASKS[name][0], task_type or BUNDLED_TASKS[name][1]
        else:
            path = Path(name)
            if not (path.is_file() or is_data_file(path)):
                raise HeadlensError(f"task {name!r} is neither a bundled task ({', '.join(BUNDLED_TASKS)}) nor a file")
        task = _read_task(path, model, task_type, options)
        task.name = name if name in BUNDLED_TASKS else path.stem
    if n_examples is not None:
        check(n_examples >= 1, f"n_examples must be >= 1, got {n_examples}")
        task = task.subset(range(min(n_examples, len(task))))
    return task


def _repeated_task(model, n: int, options) -> Task:
    check(model is not None, "task 'repeated' is generated for a model: pass model=")
    check(n >= 1, f"n_examples must be >= 1, got {n}")
    tokens, half_len = induction_tokens(model, n, seed=options.pop("seed", 0))
    if model.cfg.causal and model.unembed is not None:
        return RepeatedHalfTask(tokens, half_len, name="repeated", **options)
    options.setdefault("measure", "kl" if model.unembed is not None else "cosine")
    return FidelityTask(tokens.tolist(), name="repeated", **options)


# the record kinds: required fields (in this order), optional fields, and each field's types
RECORDS = [
    (("prompt", "right", "wrong"), ("corrupted",)),
    (("anchor", "positive", "negative"), ()),
    (("text",), ()),
]
ANSWER = (str, int)  # a continuation: text (its first token counts) or a token id
FIELD_TYPES = {"prompt": (str,), "anchor": (str,), "positive": (str,), "negative": (str,), "text": (str,),
               "corrupted": (str,), "right": ANSWER, "wrong": ANSWER + (list,)}


def _read_task(path: Path, model, task_type, options) -> Task:
    """A task from a file of any size, read lazily (:mod:`headlens.data.streams`): a text file's
    lines, or the records of a JSONL or Parquet file or a saved ``datasets`` folder. Two passes
    check every line and every record's fields (a bad one is named by its line), keeping none."""
    records = open_records(path, what="task file")
    check(len(records) > 0, f"task file {str(path)!r} has no non-empty lines: give at least one example")
    for _ in records:  # names the first line that is not UTF-8 (or not JSON), before any other check
        pass
    first = records[0]
    if isinstance(first, str):
        return _text_task(records, model, task_type, options)
    where = (lambda i: f"task file {str(path)!r}, {records.where(i)}")
    check(isinstance(first, dict), f"{where(0)}: a record must be a JSON object {{\"field\": value, ...}}, "
                                   f"got {type(first).__name__}")
    keys = set(first)
    for required, optional in RECORDS:
        if set(required) <= keys:
            break
    else:
        raise HeadlensError(f"{where(0)}: records need the fields prompt/right/wrong, anchor/positive/negative "
                            f"or text; got {sorted(keys)}")
    fields = list(required) + [f for f in optional if f in keys]
    for i, record in enumerate(records):
        for f in fields:
            _check_field(where, i, record, f)
    col = records.column
    if required[0] == "prompt":
        corrupted = col("corrupted") if "corrupted" in fields else None
        return ContrastTask(col("prompt"), col("right"), col("wrong"), corrupted, **options)
    if required[0] == "anchor":
        return EmbeddingContrastTask(col("anchor"), col("positive"), col("negative"), **options)
    return _text_task(col("text"), model, task_type, options)


def _check_field(where_of, i: int, record, field: str) -> None:
    """Record ``i``'s ``field`` is there and of its type (text, or for answers a token id or a
    list); ``where_of(i)`` names the record, and is called only for a message."""
    if not isinstance(record, dict):
        raise HeadlensError(f"{where_of(i)}: a record must be a JSON object, got {type(record).__name__}")
    if field not in record:
        raise HeadlensError(f"{where_of(i)}: the record has no field {field!r} (every record needs the fields "
                            "of the first one)")
    value, types = record[field], FIELD_TYPES[field]
    ok = isinstance(value, types) and not isinstance(value, bool)
    if ok and isinstance(value, list):
        ok = len(value) > 0 and all(isinstance(v, ANSWER) and not isinstance(v, bool) for v in value)
    if ok and isinstance(value, str):
        ok = value.strip() != "" or field in ("right", "wrong")
    if not ok:
        names = {str: "a string", int: "a token id", list: "a list of strings or token ids"}
        raise HeadlensError(f"{where_of(i)}: field {field!r} must be {' or '.join(names[t] for t in types)}"
                            f"{' (not empty)' if isinstance(value, (str, list)) else ''}, "
                            f"got {type(value).__name__} {value!r:.40}")


def _text_task(lines, model, task_type, options) -> Task:
    task_type = task_type or _text_task_type(model)
    check(task_type in TEXT_TASKS, f"task_type must be one of {sorted(TEXT_TASKS)}, got {task_type!r}")
    if task_type == "fidelity" and model is not None and "measure" not in options:
        options = dict(options, measure="kl" if model.unembed is not None else "cosine")
    return TEXT_TASKS[task_type](lines, **options)
