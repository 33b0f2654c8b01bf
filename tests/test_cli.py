import ast
import dataclasses
import importlib

import pytest

from chatforge import cli


def test_help_lists_every_stage_module_with_its_docstring(capsys):
    cli.main(["--help"])
    listing = capsys.readouterr().out
    modules = sorted(p.stem for p in cli.STAGES_DIR.glob("*.py") if p.stem != "__init__")
    assert len(modules) == 25
    for module in modules:
        stage = module.replace("_", "-")
        first_line = importlib.import_module(f"chatforge.stages.{module}").__doc__.strip().splitlines()[0]
        assert f"  {stage.ljust(12)}  {first_line.rstrip('.')}" in listing


def test_stage_modules_hold_only_config_and_run():
    for path in cli.STAGES_DIR.glob("*.py"):
        if path.stem == "__init__":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        module = importlib.import_module(f"chatforge.stages.{path.stem}")
        assert "Config" in defined and "run" in defined, path
        # besides run, only config dataclasses (the speedrun's option groups extend other stages' configs)
        for name in set(defined) - {"run"}:
            assert dataclasses.is_dataclass(getattr(module, name)), f"{path.name}: {name} is not a config"
        assert not [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))], f"{path.name} holds constants"


@pytest.mark.parametrize("stage", ["data", "sft-data", "ppo", "speedrun", "serve"])
def test_stage_help_shows_docstring_and_options(stage, capsys):
    cli.main([stage, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: chatforge {stage} ")
    assert "options:" in out and "  --" in out


def test_unknown_stage_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["pretrian"])
    assert exc.value.code == 2
    assert "unknown stage 'pretrian'" in capsys.readouterr().err
