"""headlens.load: every kind of source, and a clear HeadlensError for every bad one."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import headlens
from headlens import HeadlensError
from headlens.cli import main as cli_main
from headlens.io import bundled
from headlens.io.native import save_model
from headlens.model.config import parse_dtype


def fresh_gpt2(vocab_size, seed=0, **kw):
    torch.manual_seed(seed)
    config = dict(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=vocab_size,
                  attn_implementation="eager")
    return GPT2LMHeadModel(GPT2Config(**{**config, **kw})).eval()


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


IDS = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 102]])


# --- every source --------------------------------------------------------------------------------
def test_bundled_minilm(minilm):
    model = headlens.load("minilm")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model) == (6, 12, 384)
    assert model.cfg.name == "minilm" and model.tokenizer is not None and model.dtype == torch.float32
    assert same_state(model, minilm)  # the fast safetensors path reads what transformers reads


def test_headlens_folder(tiny_gpt2, tmp_path):
    save_model(tiny_gpt2, tmp_path / "ckpt")
    model = headlens.load(tmp_path / "ckpt")
    assert same_state(model, tiny_gpt2) and model.tokenizer is not None


def test_transformers_folder(tiny_gpt2_hf, bert_tokenizer, tmp_path):
    tiny_gpt2_hf.save_pretrained(tmp_path)
    bert_tokenizer.save_pretrained(tmp_path)
    model = headlens.load(str(tmp_path))
    assert model.tokenizer is not None and model.cfg.family == "gpt2"
    with torch.no_grad():
        assert (model(IDS) - tiny_gpt2_hf(IDS).logits).abs().max() < 1e-4
    half = headlens.load(tmp_path, dtype="bf16")
    assert half.dtype == torch.bfloat16


def test_sharded_transformers_folder_without_tokenizer(tiny_gpt2_hf, tiny_gpt2, tmp_path):
    tiny_gpt2_hf.save_pretrained(tmp_path, max_shard_size="400KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = headlens.load(tmp_path)
    assert model.tokenizer is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_gpt2.state_dict().items())


def test_in_memory_transformers_model(tiny_gpt2_hf, bert_tokenizer):
    model = headlens.load(tiny_gpt2_hf, tokenizer=bert_tokenizer, dtype=torch.float64)
    assert model.dtype == torch.float64 and model.tokenizer is bert_tokenizer
    with torch.no_grad():
        assert (model(IDS).float() - tiny_gpt2_hf(IDS).logits).abs().max() < 1e-4


def test_transformer_bridge(bert_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    # the bridge rewires hf's modules and edits the tokenizer's special tokens: no shared fixtures
    hf = fresh_gpt2(bert_tokenizer.vocab_size, seed=3)
    tokenizer = copy.deepcopy(bert_tokenizer)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer)
    model = headlens.load(bridge)
    assert model.tokenizer is tokenizer
    with torch.no_grad():
        assert (model(IDS) - bridge(IDS)).abs().max() < 1e-4


def test_bridge_in_compatibility_mode_is_refused(bert_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    hf = fresh_gpt2(bert_tokenizer.vocab_size, seed=4)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=copy.deepcopy(bert_tokenizer))
    bridge.enable_compatibility_mode()  # folds LayerNorm and centres weights: not the model's weights
    with pytest.raises(HeadlensError, match="compatibility mode"):
        headlens.load(bridge)


def test_transformers_loading_path(bert_tokenizer, tmp_path):
    """The path hub names take (transformers' from_pretrained with the checkpoint's class), run on a
    local folder: the MLM head comes with it, and missing weights are refused, not made up."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForMaskedLM

    from headlens.io.loading import load_hub

    torch.manual_seed(0)
    config = BertConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=20, max_position_embeddings=32)
    hf = BertForMaskedLM(config).eval()
    hf.save_pretrained(tmp_path)
    bert_tokenizer.save_pretrained(tmp_path)
    model = load_hub(str(tmp_path))
    assert model.cfg.unembed == "mlm" and model.tokenizer is not None
    with torch.no_grad():
        assert (model(IDS) - hf(IDS).logits).abs().max() < 1e-4
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["bert.encoder.layer.1.attention.self.key.bias"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HeadlensError, match="missing weights.*layer.1.attention.self.key.bias"):
        load_hub(str(tmp_path))


def test_headlens_model_passes_through(tiny_gpt2):
    assert headlens.load(tiny_gpt2) is tiny_gpt2


def test_truncate_ctx(tiny_gpt2_hf, bert_tokenizer):
    model = headlens.load(tiny_gpt2_hf, tokenizer=bert_tokenizer, truncate_ctx=8)
    assert model.cfg.n_ctx == 8 and model.W_pos.shape[0] == 8
    with torch.no_grad():
        assert (model(IDS) - tiny_gpt2_hf(IDS).logits).abs().max() < 1e-4
    with pytest.raises(HeadlensError, match="exceeds the model's context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(HeadlensError, match="truncate_ctx"):
        headlens.load(tiny_gpt2_hf, truncate_ctx=0)


# --- bundled registry ----------------------------------------------------------------------------
def test_list_models_and_toy_discovery(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setattr(bundled, "MODELS_DIR", tmp_path)
    save_model(tiny_gpt2, tmp_path / "toy-test", card={"description": "a test toy"})
    (tmp_path / "not-a-model").mkdir()
    table = headlens.list_models()
    assert list(table.columns) == ["name", "family", "n_layers", "n_heads", "description", "available"]
    rows = table.set_index("name")
    assert rows.loc["minilm", "n_heads"] == 12 and bool(rows.loc["minilm", "available"])
    assert rows.loc["toy-test", "description"] == "a test toy" and rows.loc["toy-test", "n_layers"] == 3
    assert "not-a-model" not in rows.index
    assert same_state(headlens.load("toy-test"), tiny_gpt2)


def test_cli_models(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "minilm" in out and "n_heads" in out
    assert cli_main(["models", "--families"]) == 0
    out = capsys.readouterr().out
    assert "gpt2" in out and "bert" in out and "model_types" in out


@pytest.mark.slow
def test_load_minilm_offline_in_a_fresh_interpreter():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    code = "import headlens; m = headlens.load('minilm'); print(m.cfg)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "n_layers=6" in done.stdout and "n_heads=12" in done.stdout


# --- bad sources ----------------------------------------------------------------------------------
def test_unknown_name_offline_names_source_and_bundled():
    with pytest.raises(HeadlensError) as err:
        headlens.load("no-such-org/no-such-model-xyz")
    assert "no-such-org/no-such-model-xyz" in str(err.value) and "minilm" in str(err.value)


@pytest.mark.parametrize("source", ["./no/such/folder", "/no/such/folder", Path("no_such_folder")])
def test_missing_folder(source):
    with pytest.raises(HeadlensError, match="does not exist"):
        headlens.load(source)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HeadlensError, match="no config.json"):
        headlens.load(tmp_path)


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(HeadlensError, match="model_type"):
        headlens.load(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(HeadlensError, match="unsupported architecture") as err:
        headlens.load(tmp_path)
    assert "'t5'" in str(err.value) and "gpt2" in str(err.value) and "bert" in str(err.value)


def test_truncated_safetensors(tiny_gpt2_hf, tmp_path):
    tiny_gpt2_hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(HeadlensError, match="corrupted or truncated"):
        headlens.load(tmp_path)


def test_missing_weight_is_named(tiny_gpt2, bert_tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    from headlens.io.to_hf import save_hf

    save_hf(tiny_gpt2, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["transformer.h.2.mlp.c_fc.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HeadlensError, match="h.2.mlp.c_fc.weight"):
        headlens.load(tmp_path)


def test_tokenizer_vocab_mismatch(bert_tokenizer, tmp_path):
    small = fresh_gpt2(vocab_size=100)
    with pytest.raises(HeadlensError, match="tokenizer has 30522 tokens"):
        headlens.load(small, tokenizer=bert_tokenizer)
    small.save_pretrained(tmp_path)
    bert_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(HeadlensError, match="vocabulary of 100"):
        headlens.load(tmp_path)


def test_source_of_wrong_type_and_file(tmp_path):
    with pytest.raises(HeadlensError, match="source must be"):
        headlens.load(42)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(HeadlensError, match="is a file"):
        headlens.load(tmp_path / "weights.bin")


def test_unsupported_gpt2_variant(bert_tokenizer):
    with pytest.raises(HeadlensError, match="scale_attn_by_inverse_layer_idx"):
        headlens.load(fresh_gpt2(bert_tokenizer.vocab_size, scale_attn_by_inverse_layer_idx=True))


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("float32") is torch.float32 and parse_dtype(None) is None
    for bad in ("int8", torch.int64, 3):
        with pytest.raises(HeadlensError, match="dtype"):
            parse_dtype(bad)
