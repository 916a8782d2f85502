"""The config's single source of truth: the declarations in scaling_fl/config.py, and what is
derived from them (DEFAULTS, per-key validation, the `help` listing, the README's reference)."""

from __future__ import annotations

import ast
import math
import subprocess
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from scaling_fl import config
from scaling_fl.config import DEFAULTS, KEYS, Choice, Config, ConfigError, Flag, Int, Number, resolve
from tests.cli import cli_command

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "python -m scaling_fl.config --readme README.md"


def test_readme_config_reference_is_the_one_rendered_from_the_declarations():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = config.readme_table(readme)
    assert table is not None, f"README.md lost the config reference markers; put them back and run: {REGENERATE}"
    assert table == config.markdown_table(), (
        f"README.md's config reference differs from scaling_fl/config.py's declarations; regenerate it with: "
        f"{REGENERATE}"
    )


def test_every_key_is_declared_once_with_type_default_section_and_one_line_help():
    assert list(KEYS) == [declared.name for declared in fields(Config)]
    assert DEFAULTS == {name: spec.default for name, spec in KEYS.items()}
    hints = typing.get_type_hints(Config)
    assert set(hints) == set(KEYS)  # every annotation evaluates: the types stay useful to the rest of the code
    for name, spec in KEYS.items():
        assert spec.help.strip() and "\n" not in spec.help, name
        assert spec.section, name
        assert spec.allowed and spec.short, name
    assert set(config.ORIGINAL_KEYS) <= set(KEYS)
    assert set(config.SECTION_LINKS) <= set(config.sections())


def test_every_default_validates_and_the_defaults_resolve():
    for name, spec in KEYS.items():
        spec.validate(spec.default)  # raises ConfigError naming the key if not
    resolved = resolve({})
    assert resolved.as_dict().keys() == KEYS.keys()


def _bounds_cases():
    """(key, value, accepted) at and around every declared bound, choice and flag."""
    for name, spec in KEYS.items():
        rule = spec.rule
        if isinstance(rule, Int):
            yield name, rule.minimum, True
            yield name, rule.minimum - 1, False
            yield name, rule.minimum + 0.5, False
            yield name, True, False
        elif isinstance(rule, Number):
            yield name, rule.low, not rule.low_open
            yield name, rule.high, not rule.high_open
            yield name, (rule.low + rule.high) / 2, True
            yield name, rule.low - 1, False
            yield name, rule.high * 2 + 1, False
            yield name, math.nan, False
            yield name, "1", False
        elif isinstance(rule, Choice):
            for choice in rule.choices:
                yield name, choice, True
            yield name, "no-such-choice", False
        elif isinstance(rule, Flag):
            yield name, True, True
            yield name, False, True
            yield name, "yes", False
            yield name, 1, False
        yield name, None, spec.optional


@pytest.mark.parametrize("name, value, accepted", list(_bounds_cases()))
def test_declared_bounds_and_choices_are_enforced(name, value, accepted):
    spec = KEYS[name]
    if accepted:
        spec.validate(value)
        return
    with pytest.raises(ConfigError) as error:
        spec.validate(value)
    assert str(error.value) == f"{name}={value!r} is not allowed: {spec.allowed}"
    with pytest.raises(ConfigError) as error:  # and resolve refuses it with the same line
        resolve({name: value})
    assert str(error.value) == f"{name}={value!r} is not allowed: {spec.allowed}"


def test_rules_between_keys_stay_explicit():
    assert resolve({"split": None, "iid_split": False}).split == "label_sorted"
    assert resolve({"max_grad_norm": None}).max_grad_norm == 0.0
    with pytest.raises(ConfigError, match="comm_period=None is not allowed"):
        resolve({"sync": "periodic"})
    assert resolve({"sync": "periodic", "comm_period": 2}).comm_period == 2
    with pytest.raises(ConfigError, match="min_fit_sites=5 is not allowed: at most the number of sites"):
        resolve({"min_fit_sites": 5})
    with pytest.raises(ConfigError, match="unknown config key"):
        resolve({"num_round": 3})


def test_declared_choices_are_the_ones_the_package_implements():
    from scaling_fl.data import TASK_NAMES
    from scaling_fl.exchange.dynamic import SYNC_MODES
    from scaling_fl.exchange.factory import EXCHANGES
    from scaling_fl.exchange.sparse import CRITERIA, SCOPES, SPARSE_AVERAGES
    from scaling_fl.round_buffers import ROUND_BUFFER_OFFLOADS
    from scaling_fl.site_state import OFFLOADS
    from scaling_fl.strategies.factory import STRATEGIES
    from scaling_fl.strategies.robust import RULES
    from scaling_fl.train.faults import BYZANTINE_MODES

    assert config.TASK_NAMES == TASK_NAMES
    assert config.SYNC_MODES == SYNC_MODES
    assert config.EXCHANGES == EXCHANGES
    assert (config.CRITERIA, config.SCOPES, config.SPARSE_AVERAGES) == (CRITERIA, SCOPES, SPARSE_AVERAGES)
    assert config.STRATEGIES == STRATEGIES
    assert config.SITE_STATE_OFFLOADS == OFFLOADS
    assert config.ROUND_BUFFER_OFFLOADS == ROUND_BUFFER_OFFLOADS
    assert config.AGGREGATIONS == RULES
    assert config.BYZANTINE_MODES == BYZANTINE_MODES


@pytest.mark.parametrize("module, allowed", [("config", {"scaling_fl.errors"}), ("errors", set())])
def test_config_module_imports_nothing_from_the_package(module, allowed):
    """config.py imports nothing but scaling_fl.errors, a leaf (the base class of user errors)."""
    tree = ast.parse((ROOT / "scaling_fl" / f"{module}.py").read_text(encoding="utf-8"))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name.split(".")[0] == "scaling_fl" and name not in allowed], imported


def test_help_listing_has_every_key_default_and_help_and_parses_as_sacred_usage():
    from docopt import docopt
    from sacred.arg_parser import format_usage

    text = config.help_text()
    flat = " ".join(text.split())
    for name, spec in KEYS.items():
        assert f"  {name}=" in text, name
        assert " ".join(spec.help.replace("`", "").split()) in flat, name
        assert f"{name}={spec.default_text}" in text or spec.shown_default, name
    sections = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert [line.split(" (README")[0] for line in sections[2:]] == list(config.sections())
    # Sacred prints it as the usage's description, and docopt parses that whole text on every start:
    # no line may look like an option definition or a second usage section.
    assert not [line for line in text.splitlines() if line.lstrip().startswith("-") or "usage:" in line.lower()]
    usage = format_usage("dummy", text, {"print_config": print}, [])
    assert docopt(usage, ["help"], default_help=False)["help"]
    assert docopt(usage, ["with", "num_rounds=3"], default_help=False)["UPDATE"] == ["num_rounds=3"]


def test_module_entry_point_prints_the_listing_and_the_table(capsys):
    config.main([])
    assert "collective_timeout_s=60" in capsys.readouterr().out
    config.main(["--markdown"])
    assert capsys.readouterr().out.strip() == config.markdown_table()


def test_update_readme_rewrites_only_the_generated_part(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{config.README_START}\n| stale |\n{config.README_END}\n\nafter\n")
    assert config.update_readme(str(readme))
    assert readme.read_text() == f"# x\n\nbefore\n\n{config.markdown_table()}\n\nafter\n"
    assert not config.update_readme(str(readme))


@pytest.mark.parametrize(
    "argv, main",
    [
        ([], True),
        (["with", "num_rounds=2"], True),
        (["-F", "runs", "with", "num_rounds=2"], True),
        (["help"], False),
        (["help", "print_config"], False),
        (["--help"], False),
        (["-h"], False),
        (["with", "num_rounds=2", "--help"], False),
        (["print_config", "with", "num_rounds=2"], False),
    ],
)
def test_help_and_other_commands_do_not_start_the_fork_server(argv, main):
    from scaling_fl.cli import _runs_main_command

    assert _runs_main_command(["train_federated.py", *argv]) is main


@pytest.mark.slow
def test_cli_help_lists_every_key_and_starts_nothing(tmp_path):
    result = subprocess.run(cli_command("help"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    for name in KEYS:
        assert f"  {name}=" in result.stdout, name
    assert "Started run" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # no run record, no claim
