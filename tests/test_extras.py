"""Optional features as extras: the default install leaves them out, and a feature used without its
extra stops with one line that names the fix, before any worker starts or any run is read."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from scaling_fl import job
from scaling_fl.config import resolve
from scaling_fl.errors import EXIT_BAD_INPUT, UserError
from scaling_fl.tracking import report

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EXTRAS = PROJECT["optional-dependencies"]
OPTIONAL = {"tensorboard": "tensorboard", "matplotlib": "plots", "opacus": "privacy"}  # package: its extra


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() for requirement in requirements}


def _missing(monkeypatch, module: str) -> None:
    """As if `module` were not installed: import raises ImportError, find_spec answers None."""
    for name in [name for name in sys.modules if name == module or name.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def test_tensorboard_dir_without_the_extra_is_one_user_error_in_the_preflight(tmp_path, monkeypatch):
    _missing(monkeypatch, "tensorboard")
    cfg = resolve({"model": "tiny-bert", "runs_dir": str(tmp_path / "runs"), "tensorboard_dir": str(tmp_path / "tb")})
    with pytest.raises(UserError) as error:
        job.preflight(cfg)
    message = str(error.value)
    assert message == "tensorboard_dir needs the tensorboard extra: pip install 'scaling-fl[tensorboard]'"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tb").exists()


def test_dp_without_the_privacy_extra_is_one_user_error_in_the_preflight(tmp_path, monkeypatch):
    _missing(monkeypatch, "opacus")
    cfg = resolve({"model": "tiny-bert", "runs_dir": str(tmp_path / "runs"), "dp": "client", "dp_clip_norm": 1.0})
    with pytest.raises(UserError) as error:
        job.preflight(cfg)
    assert str(error.value) == "dp=client needs the privacy extra (its accountant): pip install 'scaling-fl[privacy]'"
    assert not (tmp_path / "runs").exists()


def test_without_tensorboard_dir_the_extra_is_not_needed(tmp_path, monkeypatch):
    _missing(monkeypatch, "tensorboard")
    job.check_extras(resolve({"model": "tiny-bert", "runs_dir": str(tmp_path / "runs")}))


@pytest.mark.parametrize("prog", ["python -m scaling_fl.report", "plot_runs.py"])
def test_the_report_without_the_plots_extra_exits_2_with_one_line(tmp_path, monkeypatch, capsys, prog):
    _missing(monkeypatch, "matplotlib")
    out = tmp_path / "report"
    code = report.main(["--runs-dir", str(tmp_path / "runs"), "--out", str(out)], prog=prog)
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    hint = "the report's figures need the plots extra: pip install 'scaling-fl[plots]'"
    assert captured.err == f"{prog}: error: {hint}\n"
    assert captured.out == "" and not out.exists()


def test_write_report_without_the_plots_extra_raises_the_same_line(tmp_path, monkeypatch):
    _missing(monkeypatch, "matplotlib")
    run = report.RunRecord(run_id="1", job_name="a", status="COMPLETED", metrics={})
    with pytest.raises(report.ReportError, match=re.escape("pip install 'scaling-fl[plots]'")):
        report.write_report([run], tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_default_dependencies_leave_out_the_optional_features():
    defaults = _names(PROJECT["dependencies"])
    for package, extra in OPTIONAL.items():
        assert package not in defaults
        assert package in _names(EXTRAS[extra])
    assert {"s3fs", "gcsfs", "pymongo"} <= defaults  # the main command's stores stay in the default install


def test_every_extra_an_error_names_exists_and_the_demo_tests_and_image_get_them():
    named = set()
    for path in (ROOT / "scaling_fl").rglob("*.py"):
        for group in re.findall(r"scaling-fl\[([a-z0-9_,-]+)\]", path.read_text(encoding="utf-8")):
            named.update(group.split(","))
    assert named >= set(OPTIONAL.values())
    assert named <= set(EXTRAS), named - set(EXTRAS)
    # dev/setup.sh installs `.[test]`: the test extra brings every optional feature (smollm2's gguf too,
    # which the image leaves out with the model's 98 MB wheel: README, Models)
    assert any(
        requirement.replace(" ", "") == "scaling-fl[tensorboard,plots,privacy,smollm2]"
        for requirement in EXTRAS["test"]
    )
    assert '-e ".[test]"' in (ROOT / "dev" / "setup.sh").read_text(encoding="utf-8")
    # the Docker image reads the same extras from pyproject.toml
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert set(re.findall(r"extras\['([a-z0-9_-]+)'\]", dockerfile)) == set(OPTIONAL.values())
