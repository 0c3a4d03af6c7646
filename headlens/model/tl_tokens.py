"""TransformerLens' token helpers on :class:`~headlens.model.HeadlensModel`.

They follow TransformerLens 4.3's definitions (``TransformerBridge.to_tokens`` ...), with two
headlens rules on top: text longer than the context is an error unless ``truncate=True`` (TL
truncates silently by default), and every misuse raises :class:`~headlens.errors.HeadlensError`
(TL asserts). ``prepend_bos``: None uses ``cfg.default_prepend_bos`` (True for decoders with a
BOS token), True puts the BOS token first, False removes one the tokenizer put there.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from headlens.errors import HeadlensError, check
from headlens.model.tokens import encode


class TokenHelpers:
    """Mixin: ``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``,
    ``to_single_str_token``, ``get_token_position``."""

    def to_tokens(self, input, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
                  move_to_device: bool = True, truncate: bool = False) -> torch.Tensor:
        """Text (a string or a list of strings) -> token ids ``[B, P]`` (right-padded unless
        ``padding_side="left"``). For the attention mask too, use
        :func:`headlens.model.tokens.encode`, which returns the batch dict."""
        batch = encode(self, input, truncate=truncate, prepend_bos=prepend_bos,
                       padding_side=padding_side or "right")
        return batch["input_ids"] if move_to_device else batch["input_ids"].cpu()

    def _tokenizer(self):
        if self.tokenizer is None:
            raise HeadlensError("this model has no tokenizer: token strings need one")
        return self.tokenizer

    def to_string(self, tokens) -> Union[str, list[str]]:
        """Token ids ``[P]`` -> one string; ``[B, P]`` -> one string per row."""
        tok = self._tokenizer()
        tokens = torch.as_tensor(tokens)
        check(tokens.ndim <= 2, f"to_string takes [pos] or [batch, pos] token ids, got shape {tuple(tokens.shape)}")
        if tokens.ndim == 2:
            return tok.batch_decode(tokens.tolist(), clean_up_tokenization_spaces=False)
        return tok.decode(tokens.reshape(-1).tolist(), clean_up_tokenization_spaces=False)

    def to_str_tokens(self, input, prepend_bos: Optional[bool] = None,
                      padding_side: Optional[str] = None) -> Union[list[str], list[list[str]]]:
        """Each token as a string: a text or ids ``[P]`` (or ``[1, P]``) -> ``list[str]``; a list of
        texts, or ids ``[B, P]`` with ``B > 1``, -> one list per item."""
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(x, prepend_bos, padding_side) for x in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        elif isinstance(input, (torch.Tensor, np.ndarray, list, tuple)):
            tokens = torch.as_tensor(np.asarray(input) if isinstance(input, np.ndarray) else input)
            check(not tokens.is_floating_point(), "to_str_tokens takes text or integer token ids")
            if tokens.ndim == 2 and tokens.shape[0] > 1:
                return [self.to_str_tokens(row) for row in tokens]
            tokens = tokens.reshape(-1)
        else:
            raise HeadlensError(f"to_str_tokens takes text or token ids, got {type(input).__name__}")
        return self._tokenizer().batch_decode([[int(t)] for t in tokens.tolist()],
                                              clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of ``string``, which must be exactly one token (no BOS added)."""
        check(isinstance(string, str), f"to_single_token takes a string, got {type(string).__name__}")
        token = self.to_tokens(string, prepend_bos=False)[0]
        check(token.numel() == 1, f"{string!r} is not a single token: it is {token.numel()} tokens "
                                  f"{self.to_str_tokens(token)}")
        return int(token.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The string of token id ``int_token``."""
        check(isinstance(int_token, (int, np.integer)), f"to_single_str_token takes an int, got {int_token!r}")
        return self.to_str_tokens(torch.tensor([int(int_token)]))[0]

    def get_token_position(self, single_token: Union[str, int], input, mode: str = "first",
                           prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None) -> int:
        """Position of ``single_token`` (a string of one token, or an id) in ``input`` (text, or ids
        ``[P]`` / ``[1, P]``); ``mode`` "first" or "last" occurrence."""
        check(mode in ("first", "last"), f"mode must be 'first' or 'last', got {mode!r}")
        tokens = (self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
                  if isinstance(input, str) else torch.as_tensor(input))
        if tokens.ndim == 2:
            check(tokens.shape[0] == 1, f"token ids of rank 2 must have shape [1, pos], got {tuple(tokens.shape)}")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, torch.Tensor):
            single_token = int(single_token.item())
        where = (tokens == single_token).nonzero().flatten()
        check(len(where) > 0, f"token {single_token} does not occur in the input")
        return int(where[0] if mode == "first" else where[-1])
