"""The core model matches transformers on a tiny GPT-2 (the full parity suite is in test_parity*)."""
import pytest
import torch

from headlens.errors import HeadlensError


def test_tiny_gpt2_matches_transformers(tiny_gpt2, tiny_gpt2_hf):
    ids = torch.randint(0, tiny_gpt2.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tiny_gpt2(ids)
        theirs = tiny_gpt2_hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_gate_zero_removes_head(tiny_gpt2):
    ids = torch.randint(0, tiny_gpt2.cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    gate = torch.ones(3, 4)
    gate[1, 2] = 0

    def zero_z(z, hook):
        z[:, :, 2] = 0
        return z

    with torch.no_grad():
        gated = tiny_gpt2(ids, head_gate=gate)
        hooked = tiny_gpt2.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_z)])
        clean = tiny_gpt2(ids)
    assert (gated - hooked).abs().max() < 1e-6
    assert (gated - clean).abs().max() > 1e-4


def test_per_example_gate_equals_each_example_with_its_own_gate(tiny_gpt2):
    """head_gate [B, L, H]: row b gates example b only (as one [L, H] gate on that example alone)."""
    ids = torch.randint(0, tiny_gpt2.cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(4))
    gates = torch.rand(3, 3, 4, generator=torch.Generator().manual_seed(5))
    gates[1, 2] = 0
    with torch.no_grad():
        together = tiny_gpt2(ids, head_gate=gates)
        alone = torch.cat([tiny_gpt2(ids[b:b + 1], head_gate=gates[b]) for b in range(3)])
        assert (together - alone).abs().max() < 1e-5
        assert (together[0] - tiny_gpt2(ids[:1])[0]).abs().max() > 1e-3  # the gate matters
    with pytest.raises(HeadlensError, match="one row per example"):
        tiny_gpt2(ids, head_gate=gates[:2])
