"""Tokenizers beside the weights: reading the one stored with a model, and checking it fits the model."""
from __future__ import annotations

import os
from pathlib import Path

from headlens.errors import HeadlensError

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json")


def load_tokenizer(where, required: bool = False):
    """The tokenizer stored in folder (or hub name) ``where``; None if it has none (an error if
    ``required``)."""
    from transformers import AutoTokenizer

    if isinstance(where, Path) or os.path.isdir(str(where)):
        if not any((Path(where) / f).is_file() for f in TOKENIZER_FILES):
            if required:
                raise HeadlensError(f"folder {str(where)!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
            return None
        try:
            return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        except (OSError, ValueError) as e:
            raise HeadlensError(f"tokenizer files in {str(where)!r} could not be read: {e}") from e
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError):
        return None


def check_vocab(model) -> None:
    """The tokenizer must not produce ids outside the model's embedding matrix."""
    tok = model.tokenizer
    if tok is not None and len(tok) > model.cfg.vocab_size:
        raise HeadlensError(f"tokenizer has {len(tok)} tokens but model {model.cfg.name!r} has a "
                            f"vocabulary of {model.cfg.vocab_size}: they do not belong together")
