"""The house by role, as docs/architecture.md describes it: which subpackage may import which,
the library never importing a command line, and a README whose commands exist as written."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower layers first: a subpackage imports only the ones before it (and itself).
LAYERS = ["utils", "core", "config", "data", "checkpoint", "sample", "evaluation", "train", "ablation", "cli"]
SCRIPTS = ("train", "sample", "evaluate", "export", "phema", "ablation")  # unet/cli/NAME.py, NAME.py at the root
COMMAND_LINES = {*SCRIPTS, "benchmarks", "scripts"}
CORE_THIRD_PARTY = {"torch", "numpy", "einops"}  # torch and its array helpers: no accelerate, diffusers, data


def imports(path):
    """(absolute module names imported, relative-import levels) of one file."""
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            names.append("unet." + "(parent)")
    return names


def library_files():
    return sorted((ROOT / "unet").rglob("*.py"))


def is_alias(path):
    """``python -m unet.evaluate`` and ``python -m unet.ablation``: one-line command aliases."""
    rel = path.relative_to(ROOT / "unet").parts
    return path.name == "__main__.py" or (len(rel) == 1 and path.stem in SCRIPTS)


def test_subpackages_import_only_lower_layers():
    bad = []
    for path in library_files():
        rel = path.relative_to(ROOT / "unet").parts
        if len(rel) == 1 or is_alias(path):
            continue  # the package's own __init__ and the one-line command aliases
        layer = LAYERS.index(rel[0])
        for name in imports(path):
            if name.startswith("unet."):
                target = name.split(".")[1]
                if target == "(parent)" or target not in LAYERS or LAYERS.index(target) > layer:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_core_needs_torch_only():
    stdlib = set(sys.stdlib_module_names)
    for path in (ROOT / "unet" / "core").glob("*.py"):
        for name in imports(path):
            top = name.split(".")[0]
            assert top in stdlib or top in CORE_THIRD_PARTY or top == "unet", f"{path.name} imports {name}"


def test_the_library_never_imports_a_command_line():
    for path in library_files():
        for name in imports(path):
            assert name.split(".")[0] not in COMMAND_LINES, f"{path.relative_to(ROOT)} imports {name}"
            if not (is_alias(path) or path.parent.name == "cli" or path.name == "__init__.py" and len(
                    path.relative_to(ROOT / "unet").parts) == 1):
                assert not name.startswith("unet.cli"), f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_root_scripts_are_thin_wrappers(script):
    # train.py and the others only call the installed command line's main()
    assert set(imports(ROOT / f"{script}.py")) == {"sys", f"unet.cli.{script}"}


def test_console_scripts_name_the_command_lines():
    tomllib = pytest.importorskip("tomllib")  # 3.11+; the project supports 3.10, where this check is skipped
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"unet-{s}": f"unet.cli.{s}:main" for s in SCRIPTS}


# The command lines that read a trained model take nothing from the training layer: the config is
# unet.config's, the held-out split unet.data's, the judges unet.evaluation's, loading unet.checkpoint's.
MODEL_READERS = ("sample.py", "evaluate.py", "export.py", "phema.py")


@pytest.mark.parametrize("script", MODEL_READERS)
def test_model_readers_do_not_import_training(script):
    path = ROOT / "unet" / "cli" / script
    train_imports = {n for n in imports(path) if n == "unet.train" or n.startswith("unet.train.")}
    assert not train_imports, f"{script} imports {sorted(train_imports)}"
    assert "unet.checkpoint.load" in imports(path) or script == "phema.py"


def test_architecture_doc_names_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for path in library_files():
        rel = path.relative_to(ROOT).as_posix()
        if path.name != "__init__.py":
            assert f"`{rel}`" in doc, f"docs/architecture.md does not mention {rel}"
    assert " -> ".join(LAYERS) in doc  # the import order the test above enforces, written down


def readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("command", [c for c in readme_commands() if "python" in c or "accelerate" in c])
def test_readme_commands_name_scripts_and_flags_that_exist(command):
    # Each command's script answers --help, and every --flag the README gives it is one it takes.
    for part in command.split("&&"):
        words = part.split()
        script = next((w for w in words if w.endswith(".py")), None)
        if script is None:
            continue  # pip, ruff, python -m pytest: the set-up and test commands CI itself runs
        argv = [sys.executable, script]
        if script == "evaluate.py":
            argv.append(words[words.index(script) + 1])  # its subcommand
        out = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "WANDB_MODE": "offline"})
        assert out.returncode == 0, out.stderr
        after = part[part.index(script):]  # the launcher's own flags come before the script
        for flag in re.findall(r"(?<!\S)--[a-z_]+", after):
            assert flag in out.stdout, f"{script} --help does not list {flag}"


def test_module_aliases_run_the_command_lines():
    for alias in ("unet.evaluate", "unet.export", "unet.phema", "unet.ablation"):
        out = subprocess.run([sys.executable, "-m", alias, "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (alias, out.stderr)


def train_commands():
    """Every ``train.py`` command written in README.md and docs/, as the argv after the script."""
    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    out = []
    for text in texts:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                words = line.split()
                if ("train.py" in words and words[0] in ("python", "python3", "accelerate", "srun", "torchrun")
                        and "--help" not in words):
                    out.append(words[words.index("train.py") + 1:])
    return out


@pytest.mark.parametrize("argv", train_commands(), ids=" ".join)
def test_every_documented_train_command_passes_the_config_checks(argv, tmp_path):
    # The whole config (file, flags, the keys that follow the dataset) is built and checked, as
    # train.py does before any work; a command that names a placeholder folder is checked as written.
    from unet.config import load_config

    argv = [a for a in argv if a not in ("&&",)]
    cfg = load_config([a.replace("path/to/images", str(tmp_path)) for a in argv])
    assert cfg.output_dir


def boundary_functions():
    """Functions of the package that another subpackage imports: the boundaries between layers."""
    defs, used = {}, set()
    for path in library_files():
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        defs.update({(mod, n.name): n for n in tree.body if isinstance(n, ast.FunctionDef)})
        here = path.relative_to(ROOT / "unet").parts[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("unet."):
                if node.module.split(".")[1] != here:
                    used |= {(node.module, a.name) for a in node.names}
    return {f"{m}.{name}": defs[(m, name)] for m, name in sorted(used) if (m, name) in defs}


def test_functions_at_the_boundaries_between_subpackages_have_type_hints():
    untyped = [name for name, fn in boundary_functions().items()
               if fn.returns is None or any(a.annotation is None for a in fn.args.args + fn.args.kwonlyargs
                                            if a.arg not in ("self", "cls"))]
    assert not untyped, f"{len(untyped)} functions without type hints: {', '.join(untyped)}"
