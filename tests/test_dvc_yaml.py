"""dvc.yaml says what each stage runs: a change to any source file a stage executes must re-run
that stage, and nothing else listed may (DVC trusts these lists; the code is checked here)."""

import ast

import yaml

from pipeline.config import Params
from stages._common import PACKAGES, source_files
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _stage(name: str) -> tuple[str, list[str]]:
    body = STAGES[name].get("do", STAGES[name])  # foreach stages keep theirs under do:
    module = body["cmd"].split("python -m ", 1)[1].split()[0]
    return module, [d for d in body.get("deps", []) if d.split("/")[0] in PACKAGES]


def test_every_stage_depends_on_each_source_file_it_runs_and_on_no_other():
    for name in STAGES:
        module, deps = _stage(name)
        files = [path.as_posix() for path in source_files(module)]
        missing = [f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
        assert not missing, f"dvc.yaml: stage {name} runs {missing} but does not depend on it"
        stale = [d for d in deps if not any(f == d or f.startswith(d.rstrip("/") + "/") for f in files)]
        assert not stale, f"dvc.yaml: stage {name} depends on {stale}, which {module} never imports"


def test_the_import_closure_follows_lazy_imports_and_packages():
    files = {path.as_posix() for path in source_files("stages.attack")}
    # jobs imports the attack's modules; the metrics module arrives through invert (MLCO's pairing)
    assert {
        "pipeline/attack/__init__.py",
        "pipeline/attack/jobs.py",
        "pipeline/attack/invert.py",
        "pipeline/metrics.py",
        "stages/__init__.py",
        "stages/_common.py",
    } <= files
    assert "pipeline/train.py" not in files and "stages/extract.py" not in files


def _declared_reads(module: str) -> tuple[str, ...]:
    """The `reads=` a stage module passes to stages._common.run (what its MLflow run logs)."""
    tree = ast.parse((REPO / source_module_file(module)).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run":
            (reads,) = [k.value for k in node.keywords if k.arg == "reads"]
            return tuple(ast.literal_eval(reads))
    raise AssertionError(f"{module} never calls run(..., reads=...)")


def source_module_file(module: str) -> str:
    return module.replace(".", "/") + ".py"


# What a method of Params reads: p.setting(name) the client and that setting, and so on.
METHODS = {"setting": ("client", "settings."), "attack_for": ("attack", "settings."), "scheme": ("schemes.",)}
PLACEHOLDERS = {"setting": "{setting}", "scheme": "{scheme}"}


def _params_reads(module: str) -> set[str]:
    """The params sections a stage reads, by reading its code: attribute accesses and Params
    methods on `p`, `params` or `stage.params` in the stage module, and on an argument annotated
    `Params` in the library modules it runs. A method's argument that is not the stage's own
    setting or scheme reads the whole section ("settings.*")."""
    sections = set(Params.model_fields)
    found: set[str] = set()
    for path in source_files(module):
        tree = ast.parse((REPO / path).read_text())
        scopes = [(tree, {"p", "params"})] if path.as_posix() == source_module_file(module) else []
        scopes += [
            (
                fn,
                {
                    a.arg
                    for a in fn.args.args
                    if a.annotation is not None
                    and "Params" == getattr(a.annotation, "id", getattr(a.annotation, "value", None))
                },
            )
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef)
        ]
        for scope, names in scopes:

            def is_params(node) -> bool:
                return (isinstance(node, ast.Name) and node.id in names) or (
                    isinstance(node, ast.Attribute)
                    and node.attr == "params"
                    and getattr(node.value, "id", "") == "stage"
                    and bool(names)
                )

            for node in ast.walk(scope):
                if isinstance(node, ast.Attribute) and is_params(node.value) and node.attr in sections:
                    found.add(node.attr)
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and is_params(node.func.value)
                    and node.func.attr in METHODS
                ):
                    arg = node.args[0]
                    own = arg.id if isinstance(arg, ast.Name) else getattr(arg, "attr", None)
                    for read in METHODS[node.func.attr]:
                        found.add(read + PLACEHOLDERS.get(own, "*") if read.endswith(".") else read)
    return found


def _covers(declared: str, read: str) -> bool:
    section, _, key = read.partition(".")
    return declared == read or declared == section or (key == "*" and declared.startswith(section + "."))


def test_each_stage_declares_exactly_the_params_it_reads_and_logs_them():
    for name in STAGES:
        module, _ = _stage(name)
        body = STAGES[name].get("do", STAGES[name])
        in_dvc = {
            p.replace("${key}", "{setting}" if "{setting}" in str(_declared_reads(module)) else "{scheme}")
            for p in body.get("params", [])
        }
        logged = set(_declared_reads(module))
        assert in_dvc == logged, f"stage {name}: dvc.yaml declares params {sorted(in_dvc)}, it logs {sorted(logged)}"
        reads = _params_reads(module)
        undeclared = sorted(r for r in reads if not any(_covers(d, r) for d in in_dvc))
        assert not undeclared, f"stage {name} reads {undeclared}, which dvc.yaml does not declare"
        unread = sorted(d for d in in_dvc if not any(_covers(d, r) or _covers(r, d) for r in reads))
        assert not unread, f"stage {name}: dvc.yaml declares {unread}, which it never reads"


def test_the_committed_lock_records_the_source_files_as_they_are():
    """A source change committed without `dvc repro` (or `dvc commit`) leaves dvc.lock naming code
    that no longer exists, and a fresh clone's `./run.sh` then rewrites the lock."""
    import hashlib

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    stale = sorted(
        {
            dep["path"]
            for stage in lock["stages"].values()
            for dep in stage["deps"]
            if dep["path"].endswith(".py") and hashlib.md5((REPO / dep["path"]).read_bytes()).hexdigest() != dep["md5"]
        }
    )
    assert stale == [], f"dvc.lock is stale for {stale}: run `dvc repro` (or `dvc commit` if no output changes)"
