"""The package's layers, as its folders promise: imports go down only.

cmd -> loops -> kernel -> text -> errors. text is pure; only cmd imports the
runtime (cli); api, the daemon's side, uses kernel and text.
"""

import ast
import pathlib

import fdlaunch

PACKAGE = pathlib.Path(fdlaunch.__file__).parent

# What each layer may import of ours, besides its own layer.
ALLOWED = {
    "text": {"errors"},
    "kernel": {"errors", "text"},
    "loops": {"errors", "text", "kernel"},
    "api": {"errors", "text", "kernel"},
    "cli": {"errors", "text", "kernel", "__init__"},
    "cmd": {"errors", "text", "kernel", "loops", "cli"},
    "__main__": {"cli"},
    "__init__": {"api"},
    "errors": set(),
}


def layer(module):
    """'text' for fdlaunch.text.spec, 'cli' for fdlaunch.cli, '__init__' for fdlaunch itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def ours_imported(path):
    """The fdlaunch modules path imports, at any depth in the file (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fdlaunch":
            if node.module == "fdlaunch":  # a module of ours, or a name of the package itself (__version__)
                found.update(f"fdlaunch.{a.name}" if is_module(a.name) else "fdlaunch" for a in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "fdlaunch")
    return found


def is_module(name):
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        yield ".".join(relative.parts).removesuffix(".__init__"), path


def test_every_module_is_in_a_known_layer():
    assert {layer(name) for name, _ in modules()} <= ALLOWED.keys()


def test_imports_go_down_only():
    wrong = []
    for name, path in modules():
        own = layer(name)
        for target in ours_imported(path):
            if layer(target) not in ALLOWED[own] | {own}:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_a_lazy_import_inside_a_function_is_seen(tmp_path):
    source = tmp_path / "loop.py"
    source.write_text("def run():\n    from fdlaunch import cli\n    import fdlaunch.kernel.fds\n")
    assert ours_imported(source) == {"fdlaunch.cli", "fdlaunch.kernel.fds"}
    assert layer("fdlaunch.cli") not in ALLOWED[layer("fdlaunch.loops.overlap")]


def speaking(path):
    """Where path's code prints by itself: imports warn, calls print, touches sys.stderr or sys.stdout."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and any(alias.name == "warn" for alias in node.names):
            found.append(f"{path.name}:{node.lineno} imports warn")
        elif isinstance(node, ast.Attribute) and node.attr == "warn" and isinstance(node.value, ast.Name) and node.value.id == "errors":
            found.append(f"{path.name}:{node.lineno} uses errors.warn")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append(f"{path.name}:{node.lineno} calls print")
        elif isinstance(node, ast.Attribute) and node.attr in ("stderr", "stdout") and isinstance(node.value, ast.Name):
            if node.value.id == "sys":
                found.append(f"{path.name}:{node.lineno} touches sys.{node.attr}")
    return found


def test_loops_never_print():
    """A loop is handed a say(kind, text): what it says, and under which name, is its tool's to decide."""
    wrong = [place for name, path in modules() if layer(name) == "loops" for place in speaking(path)]
    assert wrong == []


def test_speaking_is_seen(tmp_path):
    source = tmp_path / "loop.py"
    source.write_text(
        "import sys\nfrom fdlaunch.errors import Fatal, warn\nfrom fdlaunch import errors\n"
        "def run():\n    print('x')\n    sys.stderr.write('y')\n    sys.stdout.flush()\n    errors.warn('t', 'info', 'z')\n"
    )
    said = sorted(place.split(" ", 1)[1] for place in speaking(source))
    assert said == ["calls print", "imports warn", "touches sys.stderr", "touches sys.stdout", "uses errors.warn"]


MAIN_LINES = 25


def test_every_main_reads_as_a_recipe():
    """Each tool's main has at most MAIN_LINES lines below its def: the mechanics live in helpers."""
    long = []
    for name, path in modules():
        if layer(name) != "cmd":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "main" and node.end_lineno - node.lineno > MAIN_LINES:
                long.append(f"{name}.main: {node.end_lineno - node.lineno} lines")
    assert long == []
