"""``headlens train-toy``: train one of the toy models whose heads' roles are known."""
from __future__ import annotations

DISTRIBUTED = False  # one process: refused under a torchrun job of several (see headlens.cli.app)
NAME = "train-toy"
HELP = "train a small attention-only model whose heads' roles are known (induction, first token)"
DESCRIPTION = ("Train one of headlens' toy decoders from scratch on this CPU, deterministically under "
               "--seed, and write a headlens checkpoint folder with a model card (card.json, card.md) "
               "stating the measured losses and each head's attention and role. Kinds: induction-2l "
               "(previous-token head in layer 0, induction heads in layer 1), induction-1l (its "
               "1-layer control), first-token (a first-token head and a previous-token head). The "
               "folders shipped in headlens/data/models were written by this command with the "
               "defaults.")


def add_arguments(parser) -> None:
    from headlens.synthetic.toys import TOYS

    parser.add_argument("--toy", required=True, choices=sorted(TOYS), help="which toy model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the toy's recipe)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the result depends on it; 1 is fastest on a busy machine)")
    parser.add_argument("--out", required=True, help="folder to write the checkpoint and model card into "
                                                     "(new or empty; see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from headlens.storage.folders import model_output
    from headlens.synthetic.cards import save_toy
    from headlens.synthetic.training import train_toy

    model_output(args.out, args.overwrite, name="--out")  # before the training, not after it
    model, card = train_toy(args.toy, seed=args.seed, steps=args.steps, threads=args.threads,
                            progress=not args.quiet)
    folder = save_toy(model, card, args.out, overwrite=args.overwrite)
    ev = card["eval"]
    losses = ", ".join(f"{k} {v}" for k, v in ev.items() if k.startswith(("loss", "accuracy")))
    print(f"{card['name']}: {card['steps']} steps in {card['train_seconds']} s, final training loss "
          f"{card['final_train_loss']}; {losses}")
    for role, heads in card["roles"].items():
        print(f"  {role}: " + ", ".join(f"L{layer}H{head}" for layer, head in heads))
    print(f"wrote {folder}")
    return 0
