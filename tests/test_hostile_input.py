"""Files a hostile or careless user hands headlens: nothing in them runs code, and each problem is one
line naming the file, the line or the option -- never a traceback.

The first test scans headlens' own source (its AST) for every way Python has to unpickle; the
rest run the cases of issue #20 through the command line (``headlens.cli.main``), in this process,
with a tiny random model, or in a child process where the case is about the interpreter itself
(Ctrl-C while the libraries load).
"""
import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import headlens
from headlens.cli import main
from headlens.io.native import save_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(headlens.__file__).resolve().parent
# calls that unpickle (or can), by their dotted name as written in the source
UNPICKLING = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
              "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
              "shelve.open", "marshal.load", "marshal.loads", "pd.read_pickle", "pandas.read_pickle", "read_pickle",
              "jsonpickle.decode", "torch.serialization.load"}
PICKLE_MODULES = {"dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle", "_pickle", "cPickle"}


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unpickling_calls(source: str) -> list[str]:
    """``line: call`` for every call in ``source`` that may unpickle: the functions above, any use of
    the pickle module but its exception classes, ``torch.load`` without ``weights_only=True``, and
    ``numpy.load`` with ``allow_pickle`` set."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in PICKLE_MODULES for n in names):
                found.append(f"{node.lineno}: import {', '.join(n for n in names if n)}")
            if isinstance(node, ast.ImportFrom) and node.module == "pickle" and any(
                    a.name not in ("UnpicklingError", "PicklingError") for a in node.names):
                found.append(f"{node.lineno}: from pickle import ...")
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization") and any(
                    a.name == "load" for a in node.names):
                found.append(f"{node.lineno}: from {node.module} import load")
            if isinstance(node, ast.Import) and any(a.name == "pickle" and a.asname for a in node.names):
                found.append(f"{node.lineno}: import pickle as ...")  # an alias the scan would not follow
        if isinstance(node, ast.Attribute) and _dotted(node.value) == "pickle" and node.attr not in (
                "UnpicklingError", "PicklingError"):
            found.append(f"{node.lineno}: pickle.{node.attr}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in UNPICKLING or name.endswith(".read_pickle"):
            found.append(f"{node.lineno}: {name}")
        if name == "torch.load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{node.lineno}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load") and "allow_pickle" in keywords and not (
                isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False):
            found.append(f"{node.lineno}: {name}(allow_pickle=...)")
    return found


def test_nothing_in_headlens_unpickles():
    """No module of headlens can run code from a file it reads: no pickle (or pickle-based) loading,
    no ``torch.load`` without ``weights_only=True``, no ``numpy.load(allow_pickle=True)``."""
    bad = {str(p.relative_to(ROOT)): calls for p in sorted(ROOT.rglob("*.py"))
           if (calls := unpickling_calls(p.read_text()))}
    assert bad == {}


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(open('x', 'rb'))", "import pickle\npickle.loads(b'')", "from pickle import load",
    "import pickle as p\n", "from torch import load", "import torch\ntorch.load('x')", "import torch\ntorch.load('x', weights_only=False)",
    "import numpy as np\nnp.load('x', allow_pickle=True)", "import pandas as pd\npd.read_pickle('x')",
    "import joblib\n", "import dill\n", "import shelve\nshelve.open('x')", "import pickle\nu = pickle.Unpickler",
])
def test_the_scan_finds_each_way_to_unpickle(snippet):
    """The scan above is not vacuous: every form it forbids is found, and what is allowed is not."""
    assert unpickling_calls(snippet), snippet
    assert unpickling_calls("import torch\ntorch.load('x', weights_only=True)\nimport pickle\n"
                            "e = pickle.UnpicklingError") == []


# --- the command line on hostile files ---------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_gpt2, tmp_path_factory):
    return save_model(tiny_gpt2, tmp_path_factory.mktemp("m") / "model")


class Evil:
    """A pickle that runs ``touch <sentinel>`` when it is loaded."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # what the test itself printed before
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("headlens: error: "), err[-2000:]
    return lines[0]


def test_a_pickled_pytorch_model_bin_is_refused_and_runs_nothing(tmp_path, tiny_gpt2_hf, capsys):
    folder, sentinel = tmp_path / "evil", tmp_path / "ran"
    tiny_gpt2_hf.config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(sentinel)))
    code, err = run_cli(capsys, "importance", "--model", folder, "--task", "lm", "--no-progress", "--no-gradients")
    assert code == 2 and "refused to load the weights" in one_line(err) and str(folder) in err
    assert not sentinel.exists()


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"prompt": "the cat sat on the", "right": " mat", "wrong": " dog"}


@pytest.mark.parametrize("name, content, pattern", [
    ("missing.jsonl", [GOOD, {"prompt": "a dog ran", "wrong": " far"}], r"missing\.jsonl', line 2: the record has no "
                                                                          r"field 'right'"),
    ("typed.jsonl", [GOOD, GOOD, dict(GOOD, prompt=5)], r"typed\.jsonl', line 3: field 'prompt' must be a string"),
    ("wrong.jsonl", [dict(GOOD, wrong=[])], r"line 1: field 'wrong' must be"),
    ("broken.jsonl", "{\"prompt\": \"x\"}\n{not json\n", r"broken\.jsonl', line 2 is not valid JSON"),
    ("latin1.txt", b"good line\n\xff\xfe caf\xe9\n", r"latin1\.txt', line 2: not UTF-8"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', r"latin1\.jsonl', line 1: not UTF-8"),
    ("empty.txt", "\n  \n", r"empty\.txt' has no non-empty lines"),
])
def test_task_files_name_the_file_and_line(name, content, pattern, model_dir, tmp_path, capsys):
    path = tmp_path / name
    if isinstance(content, list):
        _jsonl(path, content)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = run_cli(capsys, "importance", "--model", model_dir, "--task", path, "--no-progress",
                        "--no-gradients", "--n-bootstrap", "0")
    assert code == 2
    assert __import__("re").search(pattern, one_line(err)), err


def test_text_files_name_the_line_of_bad_or_long_text(model_dir, tmp_path, capsys):
    """``scores --text``: a line that is not UTF-8, or longer than the context (64 tokens), is named
    by its line in the file (not its position after sorting by length); --truncate cuts it."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"one line\n\ntwo \xc3\x28 line\n")
    code, err = run_cli(capsys, "scores", "--model", model_dir, "--text", bad, "--no-clusters")
    assert code == 2 and "bad.txt', line 3: not UTF-8" in one_line(err)
    long = tmp_path / "long.txt"
    long.write_text("a short line\n\n" + "word " * 100 + "\nanother short one\n")
    code, err = run_cli(capsys, "scores", "--model", model_dir, "--text", long, "--no-clusters")
    assert code == 2 and "long.txt', line 3 is" in one_line(err) and "--truncate" in err
    code, err = run_cli(capsys, "scores", "--model", model_dir, "--text", long, "--no-clusters", "--truncate")
    assert code == 0, err


@pytest.mark.parametrize("device, pattern", [("cuda", "'cuda' is not available on this machine"),
                                             ("nonsense", "'nonsense' is not a torch device")])
def test_unavailable_devices_are_one_line(device, pattern, model_dir, capsys):
    if device == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_cli(capsys, "importance", "--model", model_dir, "--task", "lm", "--device", device,
                        "--no-progress", "--no-gradients")
    assert code == 2 and pattern in one_line(err)


def test_wrongly_typed_config_values_name_the_file(model_dir, tmp_path, tiny_gpt2_hf, capsys):
    import shutil

    ours = tmp_path / "ours"
    shutil.copytree(model_dir, ours)
    config = json.loads((ours / "config.json").read_text())
    (ours / "config.json").write_text(json.dumps(dict(config, n_heads="four")))
    code, err = run_cli(capsys, "importance", "--model", ours, "--task", "lm", "--no-progress", "--no-gradients")
    assert code == 2 and "config.json': invalid ModelConfig: n_heads must be an integer, got str 'four'" in one_line(err)
    theirs = tmp_path / "theirs"
    tiny_gpt2_hf.save_pretrained(theirs)
    hf = json.loads((theirs / "config.json").read_text())
    (theirs / "config.json").write_text(json.dumps(dict(hf, n_head="four")))
    code, err = run_cli(capsys, "importance", "--model", theirs, "--task", "lm", "--no-progress", "--no-gradients")
    assert code == 2 and "config.json' could not be read by transformers" in one_line(err) and "n_head" in err


def test_a_one_example_task_is_refused_not_given_nan_intervals(model_dir, tmp_path, capsys):
    task = _jsonl(tmp_path / "one.jsonl", [GOOD])
    code, err = run_cli(capsys, "importance", "--model", model_dir, "--task", task, "--no-progress", "--no-gradients")
    assert code == 2 and "has 1 example" in one_line(err) and "--n-bootstrap 0" in err
    code, err = run_cli(capsys, "importance", "--model", model_dir, "--task", task, "--no-progress", "--no-gradients",
                        "--n-bootstrap", "0")
    assert code == 0, err  # point estimates only, by request


def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path):
    """A KeyboardInterrupt raised while headlens imports torch (a stand-in torch on the path raises
    it on import, deterministically) ends the command with one line and exit status 130."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise KeyboardInterrupt\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ["PYTHONPATH"]]))
    res = subprocess.run([sys.executable, "-m", "headlens", "report", "--out", str(tmp_path / "r")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 130 and res.stderr.strip() == "headlens: interrupted", res.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_prune_heads_reads_the_plan_file_prune_writes(tiny_gpt2, tmp_path):
    """Issue #20: ``prune_heads`` takes the ``prune_plan.json`` that ``headlens prune`` writes (every
    method's plan inside), by its path."""
    from headlens.pruning.physical import prune_heads
    from headlens.pruning.plans import PLAN_FILE, plan_record, write_plan

    plans = {"michel": {0: [1, 2]}, "ablation": {0: [1], 2: [3]}, "random": {1: [0]}}
    path = write_plan(tmp_path / PLAN_FILE, plan_record(plans["ablation"], plans, "ablation", model="tiny",
                                                        n_heads=12, task="lm", metric="lm_loss", floor=None, target=0.5))
    pruned = prune_heads(tiny_gpt2, path)
    assert pruned.cfg.kept_heads == [[0, 2, 3], [0, 1, 2, 3], [0, 1, 2]]
