"""Cells of TransformerLens' Main Demo and Exploratory Analysis Demo (and the Head Detector Demo's
call), as the notebooks write them, each a function of ``model`` that returns the numbers the
cell prints or plots. tests/test_tl_demos.py runs every cell on a headlens model and on a
TransformerBridge over the same weights and compares the results.

Departures from the notebooks, all forced by what the cell asks of the model, not by headlens:
TransformerLens 4.3 has ``transformer_lens.utilities`` where the notebooks import
``transformer_lens.utils``; plotting calls are replaced by returning what they plot; the
notebooks' GPU ``device`` is ``model.cfg.device``; the full OV circuit is written
``model.W_E @ OV @ model.W_U`` (headlens' ``model.embed`` is its embedding method, not TL's
``Embed`` module) and ``generate`` is greedy (sampled tokens depend on each library's sampler). The Exploratory Analysis
Demo's hand-written patching loops over residual components, head outputs, values and patterns
are left out for time: ``patching.get_act_patch_block_every`` and
``get_act_patch_attn_head_all_pos_every`` patch the same activations with the same hooks (and the
Main Demo's residual-stream loop, ``main_residual_patching``, stays).
"""
from functools import partial

import einops
import torch
from fancy_einsum import einsum
from transformer_lens import FactoredMatrix, evals, head_detector, patching
from transformer_lens import utilities as utils

# --- Main Demo -------------------------------------------------------------------------------
MODEL_DESCRIPTION_TEXT = """## Loading Models

HookedTransformer comes loaded with >40 open source GPT-style models. You can load any of them in with `HookedTransformer.from_pretrained(MODEL_NAME)`. See my explainer for documentation of all supported models, and this table for hyper-parameters and the name used to load them. Each model is loaded into the consistent HookedTransformer architecture, designed to be clean, consistent and interpretability-friendly.

For this demo notebook we'll look at GPT-2 Small, an 80M parameter model. To try the model the model out, let's find the loss on this paragraph!"""  # noqa: E501
GPT2_TEXT = ("Natural language processing tasks, such as question answering, machine translation, reading "
             "comprehension, and summarization, are typically approached with supervised learning on taskspecific "
             "datasets.")
CLEAN_PROMPT = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPTED_PROMPT = "After John and Mary went to the store, John gave a bottle of milk to"
DETECTOR_TEXTS = ["The head detector feature for TransformerLens allows users to check for various common heads "
                  "automatically, reducing the cost of discovery.",
                  "Machine learning models, such as transformers, learn patterns from data and repeat them: "
                  "learn patterns from data and repeat them."]
PROMPT_FORMAT = [
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
]
NAMES = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]
ALL_TEXTS = [MODEL_DESCRIPTION_TEXT, GPT2_TEXT, CLEAN_PROMPT, CORRUPTED_PROMPT, *DETECTOR_TEXTS,
             *(p.format(n) for p in PROMPT_FORMAT for pair in NAMES for n in pair)]


def main_loss(model):
    loss = model(MODEL_DESCRIPTION_TEXT, return_type="loss")
    return {"loss": loss}


def main_cache(model):
    gpt2_tokens = model.to_tokens(GPT2_TEXT)
    gpt2_logits, gpt2_cache = model.run_with_cache(gpt2_tokens, remove_batch_dim=True)
    attention_pattern = gpt2_cache["pattern", 0, "attn"]
    gpt2_str_tokens = model.to_str_tokens(GPT2_TEXT)
    return {"tokens": gpt2_tokens, "logits": gpt2_logits, "pattern": attention_pattern, "str_tokens": gpt2_str_tokens,
            "resid_post_last": gpt2_cache["resid_post", -1], "scale": gpt2_cache["blocks.0.ln1.hook_scale"],
            "stack": gpt2_cache.stack_activation("attn_out"), "accumulated": gpt2_cache.accumulated_resid(apply_ln=True)}


def cache_methods(model):
    """ActivationCache's other decompositions (neurons, full residual decomposition)."""
    gpt2_tokens = model.to_tokens(GPT2_TEXT)
    _, cache = model.run_with_cache(gpt2_tokens)
    full, labels = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=True, return_labels=True)
    return {"neurons": cache.get_neuron_results(1, pos_slice=-1), "full": full, "labels": labels,
            "stack_neurons": cache.stack_neuron_results(layer=-1, pos_slice=-1, apply_ln=True),
            "logit_lens": cache.accumulated_resid(incl_mid=True, apply_ln=True, pos_slice=-1)}


def main_head_ablation(model):
    layer_to_ablate = 0
    head_index_to_ablate = 8

    def head_ablation_hook(value, hook):
        value[:, :, head_index_to_ablate, :] = 0.0
        return value

    gpt2_tokens = model.to_tokens(GPT2_TEXT)
    original_loss = model(gpt2_tokens, return_type="loss")
    ablated_loss = model.run_with_hooks(gpt2_tokens, return_type="loss", fwd_hooks=[(
        utils.get_act_name("v", layer_to_ablate), head_ablation_hook)])
    return {"original_loss": original_loss, "ablated_loss": ablated_loss}


def main_residual_patching(model):
    def logits_to_logit_diff(logits, correct_answer=" John", incorrect_answer=" Mary"):
        correct_index = model.to_single_token(correct_answer)
        incorrect_index = model.to_single_token(incorrect_answer)
        return logits[0, -1, correct_index] - logits[0, -1, incorrect_index]

    clean_tokens = model.to_tokens(CLEAN_PROMPT)
    corrupted_tokens = model.to_tokens(CORRUPTED_PROMPT)
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    clean_logit_diff = logits_to_logit_diff(clean_logits)
    corrupted_logits = model(corrupted_tokens)
    corrupted_logit_diff = logits_to_logit_diff(corrupted_logits)

    def residual_stream_patching_hook(resid_pre, hook, position):
        clean_resid_pre = clean_cache[hook.name]
        resid_pre[:, position, :] = clean_resid_pre[:, position, :]
        return resid_pre

    num_positions = len(clean_tokens[0])
    ioi_patching_result = torch.zeros((model.cfg.n_layers, num_positions), device=model.cfg.device)
    for layer in range(model.cfg.n_layers):
        for position in range(num_positions):
            temp_hook_fn = partial(residual_stream_patching_hook, position=position)
            patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[
                (utils.get_act_name("resid_pre", layer), temp_hook_fn)])
            patched_logit_diff = logits_to_logit_diff(patched_logits).detach()
            ioi_patching_result[layer, position] = (patched_logit_diff - corrupted_logit_diff) / (
                clean_logit_diff - corrupted_logit_diff)
    return {"clean": clean_logit_diff, "corrupted": corrupted_logit_diff, "patching": ioi_patching_result}


def main_induction(model):
    torch.manual_seed(0)  # the notebook draws from torch's global generator
    batch_size, seq_len = 10, 50
    size = (batch_size, seq_len)
    input_tensor = torch.randint(1000, 10000, size)
    random_tokens = input_tensor.to(model.cfg.device)
    repeated_tokens = einops.repeat(random_tokens, "batch seq_len -> batch (2 seq_len)")
    repeated_logits = model(repeated_tokens)
    correct_log_probs = model.loss_fn(repeated_logits, repeated_tokens, per_token=True)
    loss_by_position = einops.reduce(correct_log_probs, "batch position -> position", "mean")

    induction_score_store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads), device=model.cfg.device)

    def induction_score_hook(pattern, hook):
        induction_stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        induction_score = einops.reduce(induction_stripe, "batch head_index position -> head_index", "mean")
        induction_score_store[hook.layer(), :] = induction_score

    pattern_hook_names_filter = lambda name: name.endswith("pattern")  # noqa: E731 - as in the notebook
    model.run_with_hooks(repeated_tokens, return_type=None, fwd_hooks=[(pattern_hook_names_filter,
                                                                         induction_score_hook)])
    return {"loss_by_position": loss_by_position, "induction_scores": induction_score_store}


def main_factored_ov(model):
    OV_circuit_all_heads = model.OV
    assert isinstance(OV_circuit_all_heads, FactoredMatrix)
    OV_circuit_all_heads_eigenvalues = OV_circuit_all_heads.eigenvalues
    OV_copying_score = OV_circuit_all_heads_eigenvalues.sum(dim=-1).real / OV_circuit_all_heads_eigenvalues.abs().sum(
        dim=-1)
    return {"shape": tuple(OV_circuit_all_heads.shape), "copying_score": OV_copying_score,
            "norms": OV_circuit_all_heads.norm()}


def main_full_ov(model):
    full_OV_circuit = model.W_E @ model.OV @ model.W_U
    indices = torch.randint(0, 2000, (200,), generator=torch.Generator().manual_seed(0))
    sample = full_OV_circuit.A[:, :, indices, :] @ full_OV_circuit.B[:, :, :, indices]
    top1 = (sample.argmax(dim=-1) == torch.arange(len(indices))).float().mean(-1)
    return {"sample": sample, "copying_top1": top1}


def main_generate(model):
    return {f"kv_cache={kv}": model.generate(CLEAN_PROMPT, max_new_tokens=6, do_sample=False, stop_at_eos=False,
                                             verbose=False, return_type="tokens", use_past_kv_cache=kv)
            for kv in (True, False)}


# --- Exploratory Analysis Demo (IOI) -------------------------------------------------------------
def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
    if per_prompt:
        return answer_logit_diff
    return answer_logit_diff.mean()


def ioi_setup(model) -> dict:
    prompts, answers, answer_tokens = [], [], []
    for i in range(len(PROMPT_FORMAT)):
        for j in range(2):
            answers.append((NAMES[i][j], NAMES[i][1 - j]))
            answer_tokens.append((model.to_single_token(answers[-1][0]), model.to_single_token(answers[-1][1])))
            prompts.append(PROMPT_FORMAT[i].format(answers[-1][1]))
    answer_tokens = torch.tensor(answer_tokens).to(model.cfg.device)
    tokens = model.to_tokens(prompts, prepend_bos=True)
    original_logits, cache = model.run_with_cache(tokens)
    corrupted_prompts = []
    for i in range(0, len(prompts), 2):
        corrupted_prompts.append(prompts[i + 1])
        corrupted_prompts.append(prompts[i])
    corrupted_tokens = model.to_tokens(corrupted_prompts, prepend_bos=True)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, return_type="logits")
    return dict(prompts=prompts, answer_tokens=answer_tokens, tokens=tokens, original_logits=original_logits,
                cache=cache, corrupted_tokens=corrupted_tokens, corrupted_logits=corrupted_logits,
                original_average_logit_diff=logits_to_ave_logit_diff(original_logits, answer_tokens),
                corrupted_average_logit_diff=logits_to_ave_logit_diff(corrupted_logits, answer_tokens))


def ioi_logit_diff(model):
    s = ioi_setup(model)
    return {"tokens": s["tokens"], "per_prompt": logits_to_ave_logit_diff(s["original_logits"], s["answer_tokens"],
                                                                        per_prompt=True),
            "average": s["original_average_logit_diff"], "corrupted": s["corrupted_average_logit_diff"]}


def _logit_diff_directions(model, answer_tokens):
    answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)
    return answer_residual_directions[:, 0] - answer_residual_directions[:, 1]


def residual_stack_to_logit_diff(residual_stack, cache, logit_diff_directions, prompts):
    scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
    return einsum("... batch d_model, batch d_model -> ...", scaled_residual_stack,
                  logit_diff_directions) / len(prompts)


def ioi_direct_logit_attribution(model):
    s = ioi_setup(model)
    cache, prompts = s["cache"], s["prompts"]
    logit_diff_directions = _logit_diff_directions(model, s["answer_tokens"])
    final_residual_stream = cache["resid_post", -1]
    final_token_residual_stream = final_residual_stream[:, -1, :]
    scaled_final_token_residual_stream = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)
    average_logit_diff = einsum("batch d_model, batch d_model -> ", scaled_final_token_residual_stream,
                                logit_diff_directions) / len(prompts)
    return {"directions": logit_diff_directions, "average_logit_diff": average_logit_diff}


def ioi_logit_lens(model):
    s = ioi_setup(model)
    cache, prompts = s["cache"], s["prompts"]
    directions = _logit_diff_directions(model, s["answer_tokens"])
    accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    logit_lens_logit_diffs = residual_stack_to_logit_diff(accumulated_residual, cache, directions, prompts)
    per_layer_residual, layer_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    per_layer_logit_diffs = residual_stack_to_logit_diff(per_layer_residual, cache, directions, prompts)
    return {"logit_lens": logit_lens_logit_diffs, "labels": labels, "per_layer": per_layer_logit_diffs,
            "layer_labels": layer_labels}


def ioi_head_attribution(model):
    s = ioi_setup(model)
    cache, prompts, answer_tokens = s["cache"], s["prompts"], s["answer_tokens"]
    directions = _logit_diff_directions(model, answer_tokens)
    per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head_logit_diffs = residual_stack_to_logit_diff(per_head_residual, cache, directions, prompts)
    per_head_logit_diffs = einops.rearrange(per_head_logit_diffs, "(layer head_index) -> layer head_index",
                                            layer=model.cfg.n_layers, head_index=model.cfg.n_heads)
    attrs = cache.logit_attrs(per_head_residual, tokens=answer_tokens[:, 0], incorrect_tokens=answer_tokens[:, 1],
                              pos_slice=-1)
    return {"per_head": per_head_logit_diffs, "labels": labels, "logit_attrs": attrs}


def ioi_patching_module(model):
    s = ioi_setup(model)

    def ioi_metric(logits, answer_tokens=s["answer_tokens"]):
        return (logits_to_ave_logit_diff(logits, answer_tokens) - s["corrupted_average_logit_diff"]) / (
            s["original_average_logit_diff"] - s["corrupted_average_logit_diff"])

    args = (model, s["corrupted_tokens"], s["cache"], ioi_metric)
    return {"resid_pre": patching.get_act_patch_resid_pre(*args),
            "head_out_all_pos": patching.get_act_patch_attn_head_out_all_pos(*args),
            "block_every": patching.get_act_patch_block_every(*args),
            "head_all_pos_every": patching.get_act_patch_attn_head_all_pos_every(*args)}


def ioi_backward_cache(model):
    s = ioi_setup(model)
    with torch.enable_grad():
        loss, cache = model.run_with_cache(s["tokens"], return_type="loss", incl_bwd=True,
                                           names_filter=lambda name: name.endswith(("hook_z", "hook_resid_pre")))
    model.zero_grad(set_to_none=True)
    grads = [f"blocks.{layer}.{name}_grad" for layer in range(model.cfg.n_layers)
             for name in ("attn.hook_z", "hook_resid_pre")]  # (the bridge also caches aliases of them)
    return {"loss": loss.detach(), **{k: cache[k] for k in grads}}


# --- tools ---------------------------------------------------------------------------------------
def detect_heads(model):
    return {name: head_detector.detect_head(model, DETECTOR_TEXTS, name)
            for name in ("previous_token_head", "duplicate_token_head", "induction_head")}


def prompt_test(model):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        utils.test_prompt(CORRUPTED_PROMPT, " Mary", model, prepend_bos=True)
    return {"printed": out.getvalue()}


def induction_loss(model):
    torch.manual_seed(0)  # evals.induction_loss draws from torch's global generator
    return {"loss": evals.induction_loss(model, batch_size=2, subseq_len=40, device=model.cfg.device)}


CELLS = [main_loss, main_cache, cache_methods, main_head_ablation, main_residual_patching, main_induction, main_factored_ov,
         main_full_ov, main_generate, ioi_logit_diff, ioi_direct_logit_attribution, ioi_logit_lens,
         ioi_head_attribution, ioi_patching_module, ioi_backward_cache,
         detect_heads, prompt_test, induction_loss]
