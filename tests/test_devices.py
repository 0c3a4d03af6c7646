"""A model larger than one device: device maps (accelerate's ``infer_auto_device_map`` under
``max_memory``, or ``{layer: device}``), the activations moved from block to block, and every
analysis on a placed model.

Without a second device the CPU tests run the same code path: a map resolved for GPUs on a
model on the meta device (nothing is allocated), a model placed block by block on the CPU that
must give every analysis's numbers, and one block put on the meta device, which only runs if the
forward pass moves its inputs there. With CUDA, half the blocks go to the GPU.
"""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

from headlens.errors import HeadlensError
from headlens.importance.gradients import gradient_importance
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import LMLossTask
from headlens.model import HeadlensModel, ModelConfig
from headlens.patterns.capture import capture_patterns
from headlens.pruning.physical import prune_heads
from headlens.runtime.devices import resolve_device_map

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the cat sat on the mat", "a dog ran far away from home", "birds sing in the morning", "it rains"]
SMOLLM2_SHAPE = dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_head=64, n_ctx=2048, vocab_size=49152,
                     d_mlp=1536, norm="rmsnorm", mlp="swiglu", positional="rotary", tie_embeddings=True,
                     qkv_bias=False, out_bias=False, mlp_bias=False)


def module_bytes(model, name) -> int:
    return sum(p.numel() * p.element_size() for p in model.get_submodule(name).parameters())


def test_auto_map_fills_the_devices_in_order_under_max_memory():
    with torch.device("meta"):
        model = HeadlensModel(ModelConfig(**SMOLLM2_SHAPE))
    budget = {0: 300 * 2**20, 1: 300 * 2**20, "cpu": 4 * 2**30}
    dmap = resolve_device_map(model, "auto", max_memory=dict(budget), together=("W_E",))
    blocks = [dmap[f"blocks.{i}"] for i in range(30)]
    assert set(dmap) == {"W_E", "ln_final"} | {f"blocks.{i}" for i in range(30)}
    assert blocks[0] == "cuda:0" and "cuda:1" in blocks  # both GPUs used, in order, no block split
    order = {"cuda:0": 0, "cuda:1": 1, "cpu": 2}
    assert [order[d] for d in blocks] == sorted(order[d] for d in blocks)
    for device, limit in (("cuda:0", budget[0]), ("cuda:1", budget[1])):
        assert sum(module_bytes(model, name) for name, d in dmap.items() if d == device) <= limit
    with pytest.raises(HeadlensError, match="disk offload"):  # no room anywhere but the disk
        resolve_device_map(model, "auto", max_memory={0: "10MB", "disk": "100GB"})


def test_layer_maps_are_completed_and_checked(tiny_gpt2):
    dmap = resolve_device_map(tiny_gpt2, {0: "cpu", 1: "meta", "2": "meta"})
    assert dmap == {"W_E": "cpu", "W_pos": "cpu", "blocks.0": "cpu", "blocks.1": "meta", "blocks.2": "meta",
                    "ln_final": "meta"}  # embeddings with layer 0, the final norm with the last layer
    assert resolve_device_map(tiny_gpt2, {"": "cpu"})["blocks.2"] == "cpu"
    for bad, match in (({0: "cpu", 1: "cpu"}, "every layer"), ({0: "cpu", 1: "cpu", 2: "cpu", 3: "cpu"}, "every layer"),
                       ({"": "cpu", "blocks.0.attn": "meta"}, "does not have|splits"),
                       ({"": "cpu", "no_such": "cpu"}, "does not have"), ({0: "gpu7", 1: "cpu", 2: "cpu"}, "torch device"),
                       ("balanced", "'auto'"), ({"W_E": "cpu"}, "does not say where")):
        with pytest.raises(HeadlensError, match=match):
            resolve_device_map(tiny_gpt2, bad)


def test_activations_move_into_each_blocks_device(tiny_gpt2):
    """Block 1 on the meta device runs only if its input, mask and gate are moved there: its
    output is seen on the meta device (a hook stops the pass before the copy back)."""
    model = copy.deepcopy(tiny_gpt2).place({0: "cpu", 1: "meta", 2: "cpu"})
    assert model.device_map["blocks.1"] == "meta" and model.blocks[1].attn.kv_map.device.type == "meta"
    seen = []

    class Stop(Exception):
        pass

    def record(t, hook):
        seen.append((t.device.type, tuple(t.shape)))
        raise Stop

    ids = model.to_tokens(TEXTS[:2])
    with pytest.raises(Stop), model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", record)]):
        model(ids, head_gate=torch.ones(3, 4))
    assert seen == [("meta", (2, ids.shape[1], 32))]


def analyses(model, task) -> dict:
    return dict(
        logits=model(model.to_tokens(TEXTS)).detach(),
        patterns=capture_patterns(model, TEXTS, batch_size=2)[0].patterns,
        sweep=ablation_sweep(model, task, "mean", batch_size=2, n_bootstrap=0, progress=False),
        gradients=gradient_importance(model, task, batch_size=2),
        pruned=prune_heads(model, {0: [1], 2: [0, 3]})(model.to_tokens(TEXTS)).detach())


def assert_same(got: dict, want: dict, atol: float) -> None:
    for key in ("logits", "patterns", "pruned"):
        torch.testing.assert_close(got[key].cpu(), want[key].cpu(), atol=atol, rtol=0)
    for key in ("sweep", "gradients"):
        pd.testing.assert_frame_equal(got[key], want[key], check_exact=False, atol=atol, rtol=0)


def test_a_placed_model_gives_every_analysis_its_numbers(tiny_gpt2):
    task = LMLossTask(TEXTS)
    placed = copy.deepcopy(tiny_gpt2).place({0: "cpu", 1: "cpu", 2: "cpu"})
    assert_same(analyses(placed, task), analyses(tiny_gpt2, task), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="placing blocks on two devices needs a CUDA device")
def test_blocks_on_gpu_and_cpu_give_the_cpu_numbers(tiny_gpt2):
    task = LMLossTask(TEXTS)
    placed = copy.deepcopy(tiny_gpt2).place({0: "cuda:0", 1: "cpu", 2: "cuda:0"})
    assert placed.device.type == "cuda" and placed.blocks[1].attn.W_O.device.type == "cpu"
    got = analyses(placed, task)
    assert got["logits"].device.type == "cuda"  # results come back on the input device
    assert_same(got, analyses(tiny_gpt2, task), atol=1e-4)
    assert np.isfinite(got["sweep"]["importance"]).all()
