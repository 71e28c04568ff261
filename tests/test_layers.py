"""The package layers: a module imports only from its own layer or the layers below it, in this order from the
bottom: model, data, rl, eval, train.py. Every import statement counts, those inside functions too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("model", "data", "rl", "eval", "train")  # bottom to top


def layer_of(module: str) -> str | None:
    """The project layer a dotted module name belongs to (None: not the project's, e.g. torch)."""
    top = module.split(".")[0]
    return top if top in LAYERS else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in a file: top-level, inside functions, under `if`s."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import stays inside its package: the same layer
                continue
            found.append((node.lineno, node.module))  # `from model import load`: the layer is model's
    return found


def violations(root: Path) -> list[str]:
    sources = [root / "train.py"] + sorted(p for layer in LAYERS[:-1] for p in (root / layer).rglob("*.py"))
    bad = []
    for path in sources:
        own = layer_of(path.relative_to(root).with_suffix("").as_posix().replace("/", "."))
        for line, module in imported_modules(path):
            target = layer_of(module)
            if target is not None and LAYERS.index(target) > LAYERS.index(own):
                bad.append(f"{path.relative_to(root)}:{line} ({own}) imports {module} ({target})")
    return bad


def test_no_module_imports_a_higher_layer():
    assert violations(ROOT) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The check itself: a lower layer importing a higher one inside a function, as data/prepare.py once
    imported the sampler from rl/, is found; the other direction is fine."""
    for layer in LAYERS[:-1]:
        (tmp_path / layer).mkdir()
    (tmp_path / "train.py").write_text("import rl.rollout\nfrom eval import bfcl\n")
    (tmp_path / "model" / "sample.py").write_text("import torch\n")
    (tmp_path / "rl" / "rollout.py").write_text("from model.sample import sample\nfrom data.calls import x\n")
    (tmp_path / "data" / "prepare.py").write_text("def judge():\n    if True:\n        from rl.sampler import sample\n")
    (tmp_path / "eval" / "bfcl.py").write_text("import model.sample as s\n\n\ndef f():\n    import train\n")
    assert violations(tmp_path) == ["data/prepare.py:3 (data) imports rl.sampler (rl)",
                                    "eval/bfcl.py:5 (eval) imports train (train)"]


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_every_layer_is_a_package_that_exists(layer):
    assert (ROOT / layer / "__init__.py").is_file()
