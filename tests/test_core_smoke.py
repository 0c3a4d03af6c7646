"""The core model matches transformers on a tiny GPT-2 (the full parity suite is in test_parity*)."""
import torch


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
