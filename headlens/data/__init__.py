"""Data headlens ships: real text, task files and trained toy models, and the readers for text files.

Owns: the bundled files under this folder (``text/``, ``tasks/``, ``models/``), the corpus
readers of :mod:`headlens.data.corpora` and the lazy readers of files of any size (text, JSONL,
Parquet, saved ``datasets``) of :mod:`headlens.data.streams`. Imports nothing of headlens but
:mod:`headlens.errors`.
Public names: ``DATA_DIR``, ``TEXT_DIR``, ``TASKS_DIR``, ``MODELS_DIR``.
"""
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
TEXT_DIR = DATA_DIR / "text"
TASKS_DIR = DATA_DIR / "tasks"
MODELS_DIR = DATA_DIR / "models"
