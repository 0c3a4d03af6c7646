"""Parity of headlens with transformers (eager attention) and TransformerLens' TransformerBridge on
the same weights, float32, tolerance 1e-4: logits / final hidden states and every head's pattern.

Random models get all parameters drawn with a large spread (std 0.3, norms 1 +- 0.3, random biases)
so patterns are peaked rather than near uniform and every weight, bias and map matters.
"""
import copy

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel

import headlens
from headlens.data import TEXT_DIR

TOL = 1e-4
SENTENCES_FILE = TEXT_DIR / "sentences.txt"
WRITTEN = [
    "The cat sat quietly on the warm windowsill while the rain fell outside.",
    "Researchers found that most attention heads can be removed without hurting accuracy.",
    "She asked whether the train to Edinburgh would leave on time.",
    "Paris is the capital of France.",
]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        is_norm_weight = p.ndim == 1 and name.endswith("weight")
        p.copy_(1 + noise if is_norm_weight else noise)
    return model.eval()


def boot_bridge(name: str, hf, tokenizer) -> TransformerBridge:
    """Boot TransformerLens' bridge around ``hf`` (which it rewires: run ``hf`` itself first). The
    bridge adds special tokens to the tokenizer it gets, so it gets a copy."""
    return TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=copy.deepcopy(tokenizer))


def real_sentences(n: int = 6) -> list[str]:
    lines = SENTENCES_FILE.read_text().splitlines()[:2] if SENTENCES_FILE.is_file() else []
    return (WRITTEN + lines)[:n]


def pattern_errors(ours_cache, their_patterns, n_layers, mask=None):
    """Max |difference| of each layer's patterns ``[B, H, P, S]`` over real queries and keys."""
    errors = []
    for layer in range(n_layers):
        a, b = ours_cache[f"blocks.{layer}.attn.hook_pattern"], their_patterns[layer]
        assert a.shape == b.shape
        if mask is not None:
            keep = (mask[:, None, :, None] * mask[:, None, None, :]).bool().expand_as(a)
            a, b = a[keep], b[keep]
        errors.append(float((a - b).abs().max()))
    return errors


def bridge_patterns(cache, n_layers):
    return [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(n_layers)]


# --- (a) GPT-2 -----------------------------------------------------------------------------------
GPT2_SHAPES = [
    dict(n_layer=1, n_head=1, n_embd=8),
    dict(n_layer=3, n_head=5, n_embd=40),
    dict(n_layer=2, n_head=7, n_embd=28, n_inner=20, activation_function="relu"),
    dict(n_layer=2, n_head=2, n_embd=12, tie_word_embeddings=False, scale_attn_weights=False,
         activation_function="gelu"),
]


def gpt2_pair(shape, tokenizer, seed):
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32, bos_token_id=tokenizer.cls_token_id,
                        eos_token_id=tokenizer.sep_token_id, attn_implementation="eager", **shape)
    torch.manual_seed(seed)
    hf = randomize(GPT2LMHeadModel(config), seed)
    return hf, headlens.load(hf, tokenizer=tokenizer, dtype="float32")


@pytest.mark.parametrize("shape", GPT2_SHAPES, ids=lambda s: f"{s['n_layer']}x{s['n_head']}x{s['n_embd']}")
def test_gpt2_matches_transformers_and_bridge(shape, bert_tokenizer):
    hf, ours = gpt2_pair(shape, bert_tokenizer, seed=shape["n_embd"])
    ids = torch.randint(0, hf.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(0))
    L = shape["n_layer"]
    with torch.no_grad():
        logits, cache = ours.run_with_cache(ids)
        out = hf(ids, output_attentions=True)  # before booting: the bridge rewires hf's modules
    assert float(logits.std()) > 0.5, "test model too tame to show differences"
    # uniform causal attention over 13 positions has a mean row maximum of 0.24
    assert float(cache["blocks.0.attn.hook_pattern"].max(-1).values.mean()) > 0.35, "patterns near uniform"
    assert (logits - out.logits).abs().max() < TOL
    assert max(pattern_errors(cache, out.attentions, L)) < TOL
    if not shape.get("scale_attn_weights", True):
        pytest.skip("TransformerBridge (transformer-lens 4.3) ignores GPT-2's scale_attn_weights=False: "
                    "it always divides scores by sqrt(d_head); parity with transformers is checked above")
    with torch.no_grad():
        bridge = boot_bridge("gpt2", hf, bert_tokenizer)
        bridge_logits, bridge_cache = bridge.run_with_cache(ids)
    assert (logits - bridge_logits).abs().max() < TOL
    assert max(pattern_errors(cache, bridge_patterns(bridge_cache, L), L)) < TOL


def test_gpt2_gate_equals_zeroing_z_on_bridge(bert_tokenizer):
    """A head removed by the gate equals that head's hook_z zeroed on the bridge."""
    hf, ours = gpt2_pair(GPT2_SHAPES[1], bert_tokenizer, seed=1)
    bridge = boot_bridge("gpt2", hf, bert_tokenizer)
    ids = torch.randint(0, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    for layer, head in [(0, 0), (1, 3), (2, 4)]:
        gate = torch.ones(3, 5)
        gate[layer, head] = 0

        def zero_head(z, hook, head=head):
            z[:, :, head] = 0
            return z

        with torch.no_grad():
            gated = ours(ids, head_gate=gate)
            hooked = bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
            clean = ours(ids)
        assert (gated - hooked).abs().max() < TOL
        assert (gated - clean).abs().max() > 1e-2  # the head mattered, so the check can fail


# --- (b) BERT with padding ----------------------------------------------------------------------
BERT_SHAPES = [
    dict(num_hidden_layers=1, num_attention_heads=1, hidden_size=8, intermediate_size=16),
    dict(num_hidden_layers=2, num_attention_heads=3, hidden_size=24, intermediate_size=50),
    dict(num_hidden_layers=3, num_attention_heads=5, hidden_size=40, intermediate_size=24),
]


def padded_batch(vocab_size, lengths, seed=0):
    """Random ids ``[B, P]`` right-padded with 0, attention mask, token types (segment 1 in the middle)."""
    gen = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.randint(1000, vocab_size, (len(lengths), P), generator=gen)
    mask = (torch.arange(P)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    types = ((torch.arange(P)[None] >= P // 2) & mask.bool()).long().expand_as(ids).contiguous()
    return ids, mask, types


@pytest.mark.parametrize("shape", BERT_SHAPES,
                         ids=lambda s: f"{s['num_hidden_layers']}x{s['num_attention_heads']}")
def test_bert_with_padding_matches_transformers_and_bridge(shape, bert_tokenizer):
    config = BertConfig(vocab_size=bert_tokenizer.vocab_size, max_position_embeddings=32,
                        attn_implementation="eager", **shape)
    hf = randomize(BertForMaskedLM(config), seed=shape["hidden_size"])
    ours = headlens.load(hf, tokenizer=copy.deepcopy(bert_tokenizer))
    assert ours.cfg.unembed == "mlm"
    ids, mask, types = padded_batch(config.vocab_size, [11, 6, 3])
    L = shape["num_hidden_layers"]
    with torch.no_grad():
        logits, cache = ours.run_with_cache(ids, attention_mask=mask, token_type_ids=types)
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True)
        bridge = boot_bridge("google-bert/bert-base-uncased", hf, bert_tokenizer)
        bridge_logits, bridge_cache = bridge.run_with_cache(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (logits[real] - out.logits[real]).abs().max() < TOL
    assert (logits[real] - bridge_logits[real]).abs().max() < TOL
    assert max(pattern_errors(cache, out.attentions, L, mask)) < TOL
    assert max(pattern_errors(cache, bridge_patterns(bridge_cache, L), L, mask)) < TOL
    # padded keys get no attention from real queries
    pattern = cache[f"blocks.{L - 1}.attn.hook_pattern"]
    assert pattern[2, :, :3, 3:].abs().max() == 0


def test_bert_without_mlm_head_returns_hidden_states(bert_tokenizer):
    config = BertConfig(vocab_size=bert_tokenizer.vocab_size, max_position_embeddings=32, num_hidden_layers=2,
                        num_attention_heads=4, hidden_size=16, intermediate_size=20, hidden_act="relu",
                        attn_implementation="eager")
    hf = randomize(BertModel(config, add_pooling_layer=False), seed=5)
    ours = headlens.load(hf, tokenizer=copy.deepcopy(bert_tokenizer))
    ids, mask, types = padded_batch(config.vocab_size, [9, 4], seed=1)
    with torch.no_grad():
        hidden = ours(ids, attention_mask=mask, token_type_ids=types)
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert hidden.shape == (2, 9, 16)
    assert (hidden[mask.bool()] - theirs[mask.bool()]).abs().max() < TOL


# --- (c) the real MiniLM weights on real sentences ----------------------------------------------
@pytest.fixture(scope="module")
def minilm_mlm(minilm_path):
    """MiniLM's real encoder inside BertForMaskedLM (the class the bridge supports for BERT); the
    MLM head, absent from the checkpoint, is seeded random."""
    torch.manual_seed(0)
    return BertForMaskedLM.from_pretrained(minilm_path, attn_implementation="eager").eval()


def test_minilm_matches_transformers(minilm, minilm_path, bert_tokenizer):
    hf = BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    batch = dict(bert_tokenizer(real_sentences(), return_tensors="pt", padding=True))
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the sentences should need padding"
    with torch.no_grad():
        hidden, cache = minilm.run_with_cache(batch)
        out = hf(**batch, output_attentions=True)
    real = mask.bool()
    assert (hidden[real] - out.last_hidden_state[real]).abs().max() < TOL
    assert max(pattern_errors(cache, out.attentions, 6, mask)) < TOL


@pytest.mark.slow
def test_minilm_matches_bridge(minilm_mlm, bert_tokenizer):
    """The bridge boots the real MiniLM encoder weights inside a BertForMaskedLM (its BERT adapter
    needs the MLM class); patterns, logits and a gated head are compared."""
    ours = headlens.load(minilm_mlm, tokenizer=copy.deepcopy(bert_tokenizer))
    batch = dict(bert_tokenizer(real_sentences(), return_tensors="pt", padding=True))
    mask = batch["attention_mask"]
    with torch.no_grad():
        logits, cache = ours.run_with_cache(batch)
        hf_logits = minilm_mlm(**batch).logits  # before booting: the bridge rewires hf's modules
        bridge = boot_bridge("google-bert/bert-base-uncased", minilm_mlm, bert_tokenizer)
        bridge_logits, bridge_cache = bridge.run_with_cache(
            batch["input_ids"], attention_mask=mask, token_type_ids=batch["token_type_ids"])
    real = mask.bool()
    assert (logits[real] - hf_logits[real]).abs().max() < TOL
    assert (logits[real] - bridge_logits[real]).abs().max() < TOL
    assert max(pattern_errors(cache, bridge_patterns(bridge_cache, 6), 6, mask)) < TOL

    gate = torch.ones(6, 12)
    gate[3, 7] = 0

    def zero_head(z, hook):
        z[:, :, 7] = 0
        return z

    with torch.no_grad():
        gated = ours(batch, head_gate=gate)
        hooked = bridge.run_with_hooks(batch["input_ids"], attention_mask=mask,
                                       token_type_ids=batch["token_type_ids"],
                                       fwd_hooks=[("blocks.3.attn.hook_z", zero_head)])
    assert (gated[real] - hooked[real]).abs().max() < TOL
    assert (gated[real] - logits[real]).abs().max() > 1e-3
