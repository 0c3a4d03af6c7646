"""headlens.io.to_hf.save_hf: transformers-layout folders that transformers (unpruned) and headlens
(also pruned) read back; state dicts round-trip bit-identically."""
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
)

import headlens
from headlens import HeadlensError, HeadlensModel
from headlens.io.families import FAMILIES
from headlens.io.native import load_model, save_model
from headlens.io.to_hf import save_hf


def assert_same_state(a: HeadlensModel, b: HeadlensModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def pruned_copy(model: HeadlensModel, kept: list[list[int]]) -> HeadlensModel:
    """``model`` with only the heads ``kept[l]`` in each layer (attention weights sliced)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer, heads in enumerate(kept):
        a = f"blocks.{layer}.attn."
        for n in "QKV":
            state[a + f"W_{n}"] = state[a + f"W_{n}"][:, heads].clone()
            state[a + f"b_{n}"] = state[a + f"b_{n}"][heads].clone()
        state[a + "W_O"] = state[a + "W_O"][heads].clone()
    return HeadlensModel.from_state_dict(model.cfg.replace(kept_heads=kept), state, model.tokenizer)


def gate_of(model: HeadlensModel, kept) -> torch.Tensor:
    gate = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer, heads in enumerate(kept):
        gate[layer, heads] = 1
    return gate


@pytest.fixture(scope="module")
def tiny_bert(bert_tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=bert_tokenizer.vocab_size, max_position_embeddings=32, num_hidden_layers=2,
                        num_attention_heads=4, hidden_size=32, intermediate_size=40,
                        attn_implementation="eager")
    hf = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases and norms
    return hf


def ids_and_mask(vocab_size, seed=0):
    ids = torch.randint(1000, vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_gpt2_export_loads_in_transformers(tiny_gpt2, tiny_gpt2_hf, tmp_path):
    save_hf(tiny_gpt2, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "headlens_kept_heads" not in config
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - tiny_gpt2_hf(ids).logits).abs().max() < 1e-5
        assert (hf(ids).logits - tiny_gpt2(ids)).abs().max() < 1e-4
    assert_same_state(headlens.load(tmp_path), tiny_gpt2)


def test_untied_gpt2_round_trip(bert_tokenizer, tmp_path):
    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_head=3, n_embd=12, n_positions=16, vocab_size=bert_tokenizer.vocab_size,
                        tie_word_embeddings=False, activation_function="relu", n_inner=7,
                        attn_implementation="eager")
    hf = GPT2LMHeadModel(config).eval()
    ours = headlens.load(hf, tokenizer=bert_tokenizer)
    save_hf(ours, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 2000, (1, 8))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() < 1e-5
    assert_same_state(headlens.load(tmp_path), ours)


def test_bert_mlm_export_loads_in_transformers(tiny_bert, bert_tokenizer, tmp_path):
    ours = headlens.load(tiny_bert, tokenizer=bert_tokenizer)
    save_hf(ours, tmp_path)
    back = AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = ids_and_mask(bert_tokenizer.vocab_size)
    with torch.no_grad():
        expected = tiny_bert(input_ids=ids, attention_mask=mask).logits
        assert (back(input_ids=ids, attention_mask=mask).logits - expected).abs().max() < 1e-5
    assert_same_state(headlens.load(tmp_path), ours)


def test_minilm_export_round_trip(minilm, minilm_path, tmp_path):
    from transformers import BertModel

    save_hf(minilm, tmp_path)
    assert_same_state(headlens.load(tmp_path), minilm)
    hf = BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    batch = dict(minilm.tokenizer(["Attention heads differ.", "A second, longer sentence here."],
                                  return_tensors="pt", padding=True))
    with torch.no_grad():
        theirs = hf(**batch).last_hidden_state
        ours = minilm(batch)
    real = batch["attention_mask"].bool()
    assert (theirs[real] - ours[real]).abs().max() < 1e-4


@pytest.mark.parametrize("which", ["gpt2", "bert"])
def test_pruned_export_round_trips_through_headlens(which, tiny_gpt2, tiny_bert, bert_tokenizer, tmp_path):
    model = tiny_gpt2 if which == "gpt2" else headlens.load(tiny_bert, tokenizer=bert_tokenizer)
    kept = [[0, 2, 3], [1]] + [[0, 1, 2, 3]] * (model.cfg.n_layers - 2)
    pruned = pruned_copy(model, kept)
    save_hf(pruned, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["headlens_kept_heads"] == kept
    d = model.cfg.d_head
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        name = ("transformer.h.1.attn.c_attn.weight" if which == "gpt2"
                else "bert.encoder.layer.1.attention.self.query.weight")
        width = f.get_tensor(name).shape
    assert width == ((model.cfg.d_model, 3 * d) if which == "gpt2" else (d, model.cfg.d_model))
    back = headlens.load(tmp_path)
    assert back.cfg.kept_heads == kept and back.head_labels() == pruned.head_labels()
    assert_same_state(back, pruned)
    ids, mask = ids_and_mask(model.cfg.vocab_size, seed=2)
    with torch.no_grad():
        gated = model(ids, attention_mask=mask, head_gate=gate_of(model, kept))
        sliced = back(ids, attention_mask=mask)
    real = mask.bool()
    assert (gated[real] - sliced[real]).abs().max() < 1e-5
    auto_class = AutoModelForCausalLM if which == "gpt2" else AutoModelForMaskedLM
    with pytest.raises(RuntimeError):  # stock transformers cannot build per-layer head counts
        auto_class.from_pretrained(tmp_path)


def test_save_model_round_trip(tiny_gpt2, tmp_path):
    save_model(tiny_gpt2, tmp_path)
    back = load_model(tmp_path)
    assert back.cfg == tiny_gpt2.cfg
    assert_same_state(back, tiny_gpt2)
    assert_same_state(headlens.load(tmp_path), tiny_gpt2)


def test_loaded_model_does_not_share_memory_with_transformers(tiny_gpt2_hf, bert_tokenizer):
    ours = headlens.load(tiny_gpt2_hf, tokenizer=bert_tokenizer)
    with torch.no_grad():
        ours.blocks[0].attn.b_Q.add_(1.0)
        ours.W_E[0, 0] += 1.0
    assert not torch.equal(ours.blocks[0].attn.b_Q.reshape(-1),
                           tiny_gpt2_hf.transformer.h[0].attn.c_attn.bias[: ours.cfg.d_model])
    assert ours.W_E[0, 0] != tiny_gpt2_hf.transformer.wte.weight[0, 0]


def test_export_refuses_what_transformers_cannot_express(tiny_gpt2, tmp_path):
    toy_cfg = headlens.ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=8, vocab_size=10,
                                   mlp="none", family="toy")
    toy = HeadlensModel(toy_cfg).init_weights()
    with pytest.raises(HeadlensError, match="family 'toy'"):
        save_hf(toy, tmp_path / "toy")
    rms = HeadlensModel(tiny_gpt2.cfg.replace(norm="rmsnorm")).init_weights()
    with pytest.raises(HeadlensError, match="norm='rmsnorm'"):
        save_hf(rms, tmp_path / "rms")
    (tmp_path / "file").write_text("x")
    with pytest.raises(HeadlensError, match="is a file"):
        save_hf(tiny_gpt2, tmp_path / "file")


def test_export_detects_a_wrong_inverse(tiny_gpt2, monkeypatch, tmp_path):
    """The round-trip check inside export catches a weight rule whose inverse is wrong."""
    gpt2 = FAMILIES["gpt2"]

    def broken_rules(cfg):
        rules = gpt2.weight_rules(cfg)
        flipped = (lambda w: w.reshape(-1, w.shape[-1]).flip(0))  # rows in the wrong order
        return [r if r[0] != "blocks.{l}.attn.W_O" else (r[0], r[1], r[2], flipped) for r in rules]

    monkeypatch.setitem(FAMILIES, "gpt2", dataclasses.replace(gpt2, weight_rules=broken_rules))
    with pytest.raises(HeadlensError, match="do not invert 'blocks.0.attn.W_O'"):
        save_hf(tiny_gpt2, tmp_path)
