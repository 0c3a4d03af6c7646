"""What headlens keeps on disk between runs and where it may write: saved results that run no
code when read, results folders it owns, one run per folder, model folders written whole.

Owns: :mod:`~headlens.storage.records` (a value as checked JSON + safetensors + Parquet, each file
checksummed; damaged ones are refused, nothing is unpickled) and :mod:`~headlens.storage.folders`
(a results folder's manifest of the files headlens wrote, the folder's lock shared by the ranks
of one run, and checked, whole-or-nothing model output folders).
May import: :mod:`headlens.errors`, :mod:`headlens.files`. No stage: every stage may use it.
Public names: ``save_record``, ``load_record``, ``DamagedRecord``, ``OwnedFolder``, ``FolderLock``,
``model_output``, ``write_model_folder``.
"""
from headlens.storage.folders import FolderLock, OwnedFolder, model_output, write_model_folder
from headlens.storage.records import DamagedRecord, load_record, save_record

__all__ = ["save_record", "load_record", "DamagedRecord", "OwnedFolder", "FolderLock", "model_output",
           "write_model_folder"]
