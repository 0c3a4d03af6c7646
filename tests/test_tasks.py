"""Tasks compute the metrics their definitions say, checked against transformers' own outputs."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import headlens
from headlens.errors import HeadlensError
from headlens.importance.tasks import (
    CallableTask,
    ContrastTask,
    EmbeddingContrastTask,
    FidelityTask,
    LMLossTask,
    MLMLossTask,
    RepeatedHalfTask,
    default_task_name,
    list_tasks,
    load_task,
    mean_pool,
)
from headlens.model.tokens import encode

TEXTS = ["the cat sat on the mat", "a dog ran far away from home today", "birds sing", "it rains"]


@pytest.fixture(scope="module")
def tiny_bert(bert_tokenizer):
    """A random BERT with an MLM head (2 layers x 4 heads) and its transformers twin."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(3)
    cfg = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                     vocab_size=bert_tokenizer.vocab_size, max_position_embeddings=64, initializer_range=0.2,
                     architectures=["BertForMaskedLM"], attn_implementation="eager")
    hf = BertForMaskedLM(cfg).eval()
    return headlens.from_hf_model(hf, bert_tokenizer), hf


def test_bundled_tasks_load(tiny_gpt2, minilm):
    names = set(list_tasks()["name"])
    assert {"paraphrase", "ioi", "text", "lm", "mlm", "fidelity"} <= names
    ioi = load_task("ioi", tiny_gpt2)
    assert isinstance(ioi, ContrastTask) and 300 <= len(ioi) and ioi.corrupted is not None
    para = load_task("paraphrase", minilm)
    assert isinstance(para, EmbeddingContrastTask) and 200 <= len(para)
    assert isinstance(load_task("text", tiny_gpt2), LMLossTask)
    fid = load_task("text", minilm, n_examples=5)
    assert isinstance(fid, FidelityTask) and fid.measure == "cosine" and len(fid) == 5
    assert default_task_name(minilm) == "paraphrase" and default_task_name(tiny_gpt2) == "ioi"


def test_lm_loss_matches_transformers(tiny_gpt2, tiny_gpt2_hf):
    task = LMLossTask(TEXTS)
    ours = task.evaluate(tiny_gpt2, batch_size=3)
    for i, text in enumerate(TEXTS):  # one text at a time, no padding: transformers' own loss
        enc = encode(tiny_gpt2, [text], add_special_tokens=False)  # decoders: BOS + text
        with torch.no_grad():
            loss = tiny_gpt2_hf(enc["input_ids"], labels=enc["input_ids"]).loss
        assert abs(ours[i] - float(loss)) < 1e-4
    assert task.higher_is_better is False and task.metric_name == "lm_loss"


def test_lm_loss_equals_the_transposed_cross_entropy_formula(tiny_gpt2):
    """The flat [R*(P-1), V] cross-entropy gives the per-text loss of the original formula (over
    logits.transpose(1, 2)), padding excluded, texts of different lengths in one batch. In float64:
    in float32 the two reduction orders differ by ~2 ulp of a ~10-nat loss (2e-6)."""
    model = copy.deepcopy(tiny_gpt2).double()
    task = LMLossTask(TEXTS)
    batch = task.batches(model, 4)[0]
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert (mask == 0).any()  # padding in the batch
    with torch.no_grad():
        hidden = model(batch.inputs, return_type="hidden")
        logits = model.unembed(hidden[:, :-1], model.W_E)
    assert logits.dtype == torch.float64
    loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].to(loss.dtype)
    expect = (loss * m).sum(1) / m.sum(1)
    ours = task.score(model, hidden, batch)
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, expect, rtol=0, atol=1e-6)


def test_repeated_half_loss_matches_the_toy_measurement():
    """Per sequence, the loss predicting x[1:] in the second copy of [BOS, x, x]: its mean is what
    headlens.synthetic.toys.repeat_losses measures, and the 2-layer induction toy predicts the copy."""
    from headlens.synthetic import toys as toy

    model = headlens.load("toy-induction-2l")
    tokens, T = toy.eval_tokens(model, half_len=12, n_seqs=6, seed=1)
    task = RepeatedHalfTask(tokens, T)
    values = task.evaluate(model, batch_size=4)
    expect = toy.repeat_losses(model, tokens, T)
    assert values.shape == (6,) and task.higher_is_better is False
    assert abs(values.mean() - expect["loss_repeated_half"]) < 1e-5
    assert values.max() < 0.5 < 2.5 < expect["loss_first_half"]
    with torch.no_grad():  # each row on its own: x[0] of the copy is at P - T
        nll = F.cross_entropy(model(tokens)[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    np.testing.assert_allclose(values, nll[:, -(T - 1):].mean(1).numpy(), atol=1e-5)
    with pytest.raises(HeadlensError, match="half_len"):
        RepeatedHalfTask(tokens, tokens.shape[1])
    with pytest.raises(HeadlensError, match="integer token ids"):
        RepeatedHalfTask(tokens.float(), T)


def test_mlm_loss_matches_transformers_and_masks_deterministically(tiny_bert):
    model, hf = tiny_bert
    task = MLMLossTask(TEXTS, mask_prob=0.3, seed=1)
    batch = task.batches(model, 4)[0]
    labels = batch.targets["labels"]
    assert ((labels != -100).sum(1) >= 1).all()
    assert (batch.inputs["input_ids"][labels != -100] == model.tokenizer.mask_token_id).all()
    with torch.no_grad():
        logits = hf(**batch.inputs).logits
    expect = [F.cross_entropy(logits[r][labels[r] != -100], labels[r][labels[r] != -100]) for r in range(4)]
    assert np.allclose(task.evaluate(model), [float(x) for x in expect], atol=1e-4)
    # masks depend on the seed and the example, not on the batch or the subset
    again = task.subset([2, 3]).batches(model, 1)[1].targets["labels"][0]
    assert (again != -100).nonzero().tolist() == (labels[3] != -100).nonzero().tolist()
    other = MLMLossTask(TEXTS, mask_prob=0.3, seed=2).batches(model, 4)[0].targets["labels"]
    assert not torch.equal(other, labels)


def test_contrast_logit_difference(tiny_gpt2, tiny_gpt2_hf):
    prompts = ["when mary and john went to the store john gave a drink to", "the cat sat on the"]
    task = ContrastTask(prompts, [" mary", " mat"], [" john", [" dog", " table"]])
    tok = tiny_gpt2.tokenizer
    values = task.evaluate(tiny_gpt2)
    for i, p in enumerate(prompts):
        ids = encode(tiny_gpt2, [p], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            last = tiny_gpt2_hf(ids).logits[0, -1]
        right = last[tok.convert_tokens_to_ids(task.right[i].strip())]
        wrong = max(last[tok.convert_tokens_to_ids(w.strip())] for w in task.wrong[i])
        assert abs(values[i] - float(right - wrong)) < 1e-4
    acc = ContrastTask(prompts, [" mary", " mat"], [" john", " dog"], metric="accuracy").evaluate(tiny_gpt2)
    assert set(acc) <= {0.0, 1.0}


def test_contrast_at_mask_position_for_mlm_encoders(tiny_bert):
    model, hf = tiny_bert
    task = ContrastTask(["the [MASK] sat on the mat ."], [" cat"], [" dog"])
    enc = encode(model, task.prompts)
    with torch.no_grad():
        logits = hf(**enc).logits[0]
    pos = int((enc["input_ids"][0] == model.tokenizer.mask_token_id).nonzero()[0, 0])
    tok = model.tokenizer
    expect = logits[pos, tok.convert_tokens_to_ids("cat")] - logits[pos, tok.convert_tokens_to_ids("dog")]
    assert abs(task.evaluate(model)[0] - float(expect)) < 1e-4


def test_embedding_contrast_uses_sentence_transformers_pooling(minilm, minilm_path):
    from transformers import AutoModel

    task = load_task("paraphrase", minilm, n_examples=4)
    hf = AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    ours = task.evaluate(minilm, batch_size=3)
    for i in range(4):
        enc = encode(minilm, task.rows(i))
        with torch.no_grad():
            emb = mean_pool(hf(**enc).last_hidden_state, enc["attention_mask"])
        expect = F.cosine_similarity(emb[0], emb[1], dim=0) - F.cosine_similarity(emb[0], emb[2], dim=0)
        assert abs(ours[i] - float(expect)) < 1e-5
    assert ours.mean() > 0.1  # MiniLM puts paraphrases closer than distractors


def test_fidelity_is_perfect_unablated_and_drops_when_gated(tiny_gpt2, tiny_bert):
    gate = torch.ones(3, 4)
    gate[0] = 0
    kl = FidelityTask(TEXTS, measure="kl")
    assert np.abs(kl.evaluate(tiny_gpt2)).max() < 1e-6
    assert (kl.evaluate(tiny_gpt2, head_gate=gate) > 1e-6).all()
    cos = FidelityTask(TEXTS, measure="cosine")
    assert np.allclose(cos.evaluate(tiny_bert[0]), 1, atol=1e-6)
    assert (cos.evaluate(tiny_bert[0], head_gate=torch.zeros(2, 4)) < 1 - 1e-4).all()
    assert cos.higher_is_better and not kl.higher_is_better


def test_callable_task_and_hooks(tiny_gpt2):
    task = CallableTask(TEXTS, lambda logits, inputs: logits[:, 0].max(-1).values, metric_name="top")
    clean = task.evaluate(tiny_gpt2)

    def zero(z, hook):
        return torch.zeros_like(z)

    hooked = task.evaluate(tiny_gpt2, fwd_hooks=[("blocks.0.attn.hook_z", zero)])
    assert clean.shape == (4,) and not np.allclose(clean, hooked)
    assert not any(hp.fwd_hooks for hp in tiny_gpt2.hook_dict.values())


def test_files_and_splits(tmp_path, tiny_gpt2, minilm):
    (tmp_path / "lines.txt").write_text("one two three four\n\nfive six seven\n")
    assert len(load_task(str(tmp_path / "lines.txt"), tiny_gpt2)) == 2
    rec = [{"prompt": "a b c", "right": " d", "wrong": " e"}] * 3
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec))
    assert isinstance(load_task(str(tmp_path / "c.jsonl")), ContrastTask)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "hello there world"}) + "\n")
    assert isinstance(load_task(str(tmp_path / "t.jsonl"), minilm), FidelityTask)
    first, second = load_task("ioi", n_examples=20).split(0.25, seed=1)
    assert len(first) == 5 and len(second) == 15 and not set(first.ids) & set(second.ids)


def test_bad_input_is_named(tmp_path, tiny_gpt2, minilm):
    with pytest.raises(HeadlensError, match="empty"):
        LMLossTask([])
    with pytest.raises(HeadlensError, match="same length"):
        ContrastTask(["a b", "c d"], [" x"], [" y", " z"])
    with pytest.raises(HeadlensError, match="same length"):
        EmbeddingContrastTask(["a"], ["b", "c"], ["d"])
    with pytest.raises(HeadlensError, match="NaN"):
        CallableTask(TEXTS, lambda o, i: torch.full((o.shape[0],), float("nan"))).evaluate(tiny_gpt2)
    with pytest.raises(HeadlensError, match="one value per example"):
        CallableTask(TEXTS, lambda o, i: o.mean()).evaluate(tiny_gpt2)
    with pytest.raises(HeadlensError, match="neither a bundled task"):
        load_task("no-such-task")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(HeadlensError, match="records need"):
        load_task(str(tmp_path / "bad.jsonl"))
    with pytest.raises(HeadlensError, match="output head"):
        load_task("ioi", n_examples=2).evaluate(minilm)
    with pytest.raises(HeadlensError, match="needs a decoder"):
        RepeatedHalfTask(torch.arange(8).repeat(2, 2), 8).evaluate(minilm)
    with pytest.raises(HeadlensError, match="different number of tokens"):
        ContrastTask(["a b c"], [" d"], [" e"], corrupted=["a b c d e"]).batches(tiny_gpt2)
