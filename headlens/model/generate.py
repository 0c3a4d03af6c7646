"""Text generation for decoders, with a key/value cache (TransformerLens' ``generate``).

Shapes: ``B`` batch, ``P`` positions so far, ``V`` vocabulary.

The prompt runs once into an open :class:`headlens.model.kv_cache.KVCache`; each next token then
runs alone against the cache (``use_past_kv_cache=False`` reruns the whole sequence instead, the
reference the cache is tested against). Left-padded prompts count positions from each row's first
real token. Sampling follows TransformerLens' ``sample_logits``: ``temperature`` (0 = greedy),
``freq_penalty``, then ``top_k`` or ``top_p`` (nucleus).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from headlens.errors import check
from headlens.model.kv_cache import KVCache


def sample_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0, tokens: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens ``[B]`` from final logits ``[B, V]``. ``tokens [B, P]``: what came before (for
    ``freq_penalty``, subtracted once per earlier occurrence of a token)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if freq_penalty > 0:
        check(tokens is not None, "freq_penalty needs the tokens so far")
        counts = torch.stack([torch.bincount(row, minlength=logits.shape[-1]) for row in tokens])
        logits = logits - freq_penalty * counts[:, : logits.shape[-1]]
    if top_k is not None:
        check(top_k >= 1, f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        check(0 < top_p <= 1, f"top_p must lie in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


class Generation:
    """Mixin: :meth:`generate`."""

    @torch.no_grad()
    def generate(self, input: Union[str, Sequence[str], torch.Tensor] = "", max_new_tokens: int = 10,
                 stop_at_eos: bool = True, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                 do_sample: bool = True, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 temperature: float = 1.0, freq_penalty: float = 0.0, use_past_kv_cache: bool = True,
                 prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
                 return_type: Optional[str] = "input", verbose: bool = True, seed: Optional[int] = None):
        """Continue ``input`` (text, texts, or token ids ``[B, P]``) by up to ``max_new_tokens``.

        ``do_sample=False`` is greedy; otherwise tokens are drawn with ``temperature``, ``top_k``,
        ``top_p`` and ``freq_penalty`` from torch's global generator (or one seeded by ``seed``).
        With ``stop_at_eos`` a sequence ends at a stop token (``eos_token_id``: an id or a list of
        ids; default the model's EOS) and is padded with it until all have ended. Several texts are
        left-padded. ``return_type``: ``"input"`` (strings for text input, tokens otherwise),
        ``"str"``, ``"tokens"`` (``[B, P + new]``, the prompt included).
        """
        cfg = self.cfg
        check(cfg.causal and self.unembed is not None and cfg.unembed == "lm",
              "generate needs a causal language model")
        check(return_type in ("input", "str", "tokens"), f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
        check(isinstance(max_new_tokens, int) and max_new_tokens >= 0, f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        text = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
        if isinstance(input, str) and input == "":
            check(cfg.bos_token_id is not None, "generate from an empty prompt needs a BOS token")
            tokens, mask = torch.full((1, 1), cfg.bos_token_id, device=self.device), None
        elif text:
            from headlens.model.tokens import encode

            batch = encode(self, input, prepend_bos=prepend_bos, padding_side=padding_side or "left")
            tokens, mask = batch["input_ids"], batch["attention_mask"]
        else:
            tokens = torch.as_tensor(input, device=self.device)
            tokens, mask = (tokens[None] if tokens.ndim == 1 else tokens), None
        check(tokens.shape[1] + max_new_tokens <= cfg.n_ctx,
              f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceed the context of {cfg.n_ctx}")
        stops = self._stop_tokens(eos_token_id) if stop_at_eos else []
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        out = self._decode_loop(tokens, mask, max_new_tokens, stops, use_past_kv_cache, verbose,
                                dict(top_k=top_k, top_p=top_p, temperature=temperature if do_sample else 0.0,
                                     freq_penalty=freq_penalty, generator=generator))
        if return_type == "tokens" or (return_type == "input" and not text):
            return out
        strings = self.to_string(out[:, 1:] if cfg.default_prepend_bos else out)
        return strings[0] if isinstance(input, str) else strings

    def _stop_tokens(self, eos_token_id) -> list[int]:
        if eos_token_id is None:
            eos = self.cfg.eos_token_id
            if eos is None and self.tokenizer is not None:
                eos = self.tokenizer.eos_token_id
            check(eos is not None, "stop_at_eos: this model has no EOS token; pass eos_token_id")
            return [int(eos)]
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]

    def _decode_loop(self, tokens, mask, max_new_tokens, stops, use_cache, verbose, sampling) -> torch.Tensor:
        B = tokens.shape[0]
        cache = KVCache(self.cfg.n_layers) if use_cache else None
        finished = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        stop_ids = torch.tensor(stops, device=tokens.device, dtype=torch.long)
        mask = torch.ones_like(tokens) if mask is None else mask
        new = tokens  # what this step runs: the prompt, then one token at a time against the cache
        for _ in tqdm(range(max_new_tokens), disable=not verbose):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
            logits = self(new, attention_mask=mask, position_ids=positions, past_kv=cache)
            next_tokens = sample_logits(logits[:, -1], tokens=tokens, **sampling)
            if len(stops):
                next_tokens = torch.where(finished, stop_ids[0], next_tokens)
                finished |= torch.isin(next_tokens, stop_ids)
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_tokens[:, None])], dim=1)
            new = next_tokens[:, None] if use_cache else tokens
            if len(stops) and bool(finished.all()):
                break
        return tokens
