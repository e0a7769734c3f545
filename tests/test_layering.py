"""Imports go downward only (docs/architecture.md): a module may import from its own package and
from the layers below it, never from a layer above. Checked on the source with ast, so a stray
import inside a function counts too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. Config modules, errors, progress and the kernels' expert spec form the ground floor
# every layer may use; each package lists the packages it may import from (besides itself and
# the ground floor).
MAY_IMPORT = {
    "kernels": set(),
    "model": {"kernels"},
    "data": set(),
    "parallel": {"model", "kernels"},
    "train": {"model", "kernels", "data", "parallel"},
    # the top floor: entry points, analysis and hand-over
    "eval": {"model", "kernels", "data", "parallel", "train", "export"},
    "export": {"model", "kernels", "data", "parallel", "train"},
    "profiling": {"model", "kernels", "data", "parallel", "train"},
    "launcher": {"model", "kernels", "data", "parallel", "train"},
}
GROUND = {"competesmoe", "competesmoe.errors", "competesmoe.progress", "competesmoe.config", "competesmoe.kernels.spec"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":  # installed as competesmoe.kernels
        parts = ["competesmoe", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor(module: str) -> str:
    """'ground', or the package of the layer the module belongs to."""
    if module in GROUND or module.endswith(".config"):
        return "ground"
    return module.split(".")[1]


def sources() -> list[Path]:
    return sorted(ROOT.glob("competesmoe/**/*.py")) + sorted(ROOT.glob("kernels/*.py"))


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import of ours in `source`, the code of `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("competesmoe")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's package
                parts = module.split(".")
                base = parts[:len(parts) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("competesmoe"):
                found.append((node.lineno, target))
    return found


def test_every_package_is_placed():
    packages = {floor(module_name(p)) for p in sources() if module_name(p).count(".") >= 1}
    assert packages - {"ground"} <= set(MAY_IMPORT), packages - set(MAY_IMPORT)


def test_imports_go_downward_only():
    wrong = []
    for path in sources():
        module = module_name(path)
        mine = floor(module) if module.count(".") >= 1 else "ground"
        allowed = {"ground", mine} if mine == "ground" else {"ground", mine} | MAY_IMPORT[mine]
        for line, target in imports_in(path.read_text(), module, path.name == "__init__.py"):
            theirs = floor(target) if target.count(".") >= 1 else "ground"
            if mine == "ground" and theirs != "ground":
                wrong.append(f"{path.relative_to(ROOT)}:{line} (ground floor) imports {target}")
            elif theirs not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_upward_and_relative_imports():
    assert imports_in("import os\nfrom competesmoe.train.trainer import train\n", "competesmoe.model.x") == [
        (2, "competesmoe.train.trainer")]
    assert floor("competesmoe.train.trainer") == "train" and "train" not in MAY_IMPORT["model"]
    assert imports_in("from .competition import f\n", "competesmoe.kernels.grouped_mlp") == [
        (1, "competesmoe.kernels.competition")]
    assert imports_in("from . import configs\n", "competesmoe.kernels", is_package=True) == [(1, "competesmoe.kernels")]
    assert floor("competesmoe.parallel.config") == floor("competesmoe.kernels.spec") == "ground"
