"""Toy models with known heads: the data, the training loop (re-trained at reduced length, same
qualitative result as the shipped checkpoints), determinism, the CLI and the shipped cards."""
import json

import pytest
import torch

from headlens import HeadlensError
from headlens.cli import main
from headlens.data import MODELS_DIR
from headlens.io.native import load_model, read_card
from headlens.synthetic import cards
from headlens.synthetic import toys as toy
from headlens.synthetic.training import train_toy

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

MODELS = MODELS_DIR
SHIPPED = {spec.name: name for name, spec in toy.TOYS.items()}


def heads_of(card_or_table, layer=None):
    rows = card_or_table["heads"] if isinstance(card_or_table, dict) else card_or_table.to_dict("records")
    return [r for r in rows if layer is None or r["layer"] == layer]


# --- data ---------------------------------------------------------------------------------------
def test_repeated_segments_repeat_with_one_period_per_sequence():
    gen = torch.Generator().manual_seed(0)
    tokens = toy.repeated_segment_tokens(50, 40, 30, gen, min_half=3)
    assert tokens.shape == (50, 40)
    assert (tokens[:, 0] == toy.BOS).all() and (tokens[:, 1:] >= 1).all() and (tokens < 30).all()
    periods = set()
    for row in tokens[:, 1:]:
        period = next(T for T in range(3, 20) if torch.equal(row[T:], row[:-T]))
        periods.add(period)
    assert len(periods) > 5  # the copy distance varies: no positional shortcut


def test_repeated_segments_are_deterministic_and_checked():
    a = toy.repeated_segment_tokens(4, 20, 10, torch.Generator().manual_seed(1))
    b = toy.repeated_segment_tokens(4, 20, 10, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(HeadlensError, match="min_half"):
        toy.repeated_segment_tokens(4, 20, 10, torch.Generator(), min_half=10)


def test_unknown_toy_and_bad_arguments_raise():
    with pytest.raises(HeadlensError, match="toy must be one of"):
        toy.toy_spec("induction-3l")
    with pytest.raises(HeadlensError, match="steps"):
        train_toy("induction-1l", steps=0)
    model = load_model(MODELS / "toy-induction-1l")
    with pytest.raises(HeadlensError, match="half_len"):
        toy.eval_tokens(model, half_len=40)


def test_readout_losses_score_a_perfect_model():
    tokens = torch.randint(0, 8, (3, 6), generator=torch.Generator().manual_seed(0))
    logits = torch.full((3, 6, 16), -30.0)
    logits[:, 1:, :8].scatter_(-1, tokens[:, :1, None].expand(-1, 5, 1), 30.0)
    logits[:, 1:, 8:].scatter_(-1, tokens[:, :-1, None], 30.0)
    out = toy.readout_losses(logits, tokens)
    assert out["first_token"].max() < 1e-6 and out["previous_token"].max() < 1e-6
    assert out["first_token_accuracy"].min() == 1 and out["previous_token_accuracy"].min() == 1


# --- training -----------------------------------------------------------------------------------
def test_training_is_deterministic_under_the_seed():
    a, card = train_toy("first-token", seed=3, steps=4)
    b, _ = train_toy("first-token", seed=3, steps=4)
    c, _ = train_toy("first-token", seed=4, steps=4)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.W_E, c.W_E)
    assert card["steps"] == 4 and card["seed"] == 3 and torch.get_num_threads() >= 1


@pytest.fixture(scope="module")
def short_2l():
    return train_toy("induction-2l", seed=0, steps=400)


@pytest.mark.slow
def test_short_two_layer_run_forms_previous_token_and_induction_heads(short_2l):
    model, card = short_2l
    layer0, layer1 = heads_of(card, 0), heads_of(card, 1)
    chance = layer0[0]
    assert max(h["previous_token"] for h in layer0) > 2.5 * chance["previous_token_chance"]
    assert sum(h["induction"] > 10 * chance["induction_chance"] for h in layer1) >= 2
    assert max(h["induction"] for h in layer0) < 2 * chance["induction_chance"]
    ev = card["eval"]
    assert ev["loss_repeated_half"] < ev["loss_first_half"] - 1.5
    assert not model.training


@pytest.mark.slow
def test_short_one_layer_control_has_no_induction_head():
    _, card = train_toy("induction-1l", seed=0, steps=200)
    chance = card["heads"][0]["induction_chance"]
    assert max(h["induction"] for h in card["heads"]) < 2 * chance
    assert card["eval"]["loss_repeated_half"] > card["eval"]["log_n_tokens"] - 0.5
    assert "induction" not in card["roles"]


@pytest.mark.slow
def test_short_first_token_run_forms_a_first_token_head():
    _, card = train_toy("first-token", seed=0, steps=200)
    assert max(h["first_token"] for h in card["heads"]) > 0.9
    assert card["eval"]["accuracy_first_token"] > 0.9


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_writes_a_loadable_checkpoint_with_card(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["train-toy", "--toy", "first-token", "--steps", "3", "--seed", "1", "--out", str(out),
                 "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_model(out)
    card = read_card(out)
    assert card["steps"] == 3 and card["seed"] == 1 and card["name"] == "toy-first-token"
    assert model.cfg.n_layers == 1 and model.cfg.mlp == "none"
    assert (out / "card.md").read_text().startswith("# toy-first-token")
    assert main(["train-toy", "--toy", "first-token", "--steps", "0", "--out", str(out), "--quiet"]) == 2


# --- the shipped checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_still_shows_its_documented_behaviour(name):
    folder = MODELS / name
    card = read_card(folder)
    model = load_model(folder)
    assert card["name"] == name and card["config"] == model.cfg.to_dict()
    assert (folder / "model.safetensors").stat().st_size < 2_000_000
    heads, metrics = cards.measure(model, card["task"])
    for row, documented in zip(heads.to_dict("records"), card["heads"]):
        for key, value in documented.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, abs=2e-3), (name, row["layer"], row["head"], key)
            else:
                assert row[key] == value, (name, key)
    for key, value in card["eval"].items():
        if isinstance(value, float):
            assert metrics[key] == pytest.approx(value, abs=2e-3), (name, key)
    assert json.loads(json.dumps(card)) == card


def test_shipped_cards_state_the_known_roles():
    two, one, first = (read_card(MODELS / n) for n in ("toy-induction-2l", "toy-induction-1l", "toy-first-token"))
    assert [h for _, h in two["roles"]["induction"]] == [0, 1, 2, 3]
    assert all(layer == 1 for layer, _ in two["roles"]["induction"])
    best_prev = max(heads_of(two, 0), key=lambda h: h["previous_token"])
    assert best_prev["previous_token"] > 0.85 and [0, best_prev["head"]] in two["roles"]["previous-token"]
    assert two["eval"]["loss_repeated_half"] < 0.1 < 4.0 < two["eval"]["loss_first_half"]
    assert "induction" not in one["roles"]
    assert one["eval"]["loss_repeated_half"] > one["eval"]["log_n_tokens"] - 0.5
    assert sorted(first["roles"]) == ["first-token sink", "previous-token"]
    assert first["eval"]["accuracy_first_token"] > 0.99 and first["eval"]["accuracy_previous_token"] > 0.99


def test_shipped_models_load_by_name():
    import headlens

    listed = set(headlens.list_models()["name"])
    for name in SHIPPED:
        assert name in listed
        model = headlens.load(name)
        assert model.cfg.name == name
