"""The `railtower` commands: real runs on the shared data, and clear failures on bad input."""

from __future__ import annotations

from typer.testing import CliRunner

from railtower.cli import app

runner = CliRunner()


def test_check_config_lists_every_data_set():
    result = runner.invoke(app, ["check-config"])
    assert result.exit_code == 0, result.output
    for name in ("rees46", "amazon_m2", "uci_online_retail", "hm_catalogue"):
        assert f"data set {name}" in result.output


def test_check_config_names_the_bad_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluation:\n  slots: 0\n")
    result = runner.invoke(app, ["check-config", "--config", str(bad)])
    assert result.exit_code == 2
    assert "evaluation.slots" in result.output


def test_evaluate_prints_the_table_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("RAILTOWER_REPORTS_DIR", str(tmp_path))
    monkeypatch.setenv("RAILTOWER_EVALUATION__BOOTSTRAP_SAMPLES", "100")
    result = runner.invoke(app, ["evaluate", "-d", "rees46", "--run-name", "cli"])
    assert result.exit_code == 0, result.output
    assert "| rees46 | pdp_fbt | covisitation |" in result.output
    assert (tmp_path / "cli" / "results.md").exists()
    assert (tmp_path / "latest").resolve() == (tmp_path / "cli").resolve()


def test_validate_reports_a_broken_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("RAILTOWER_DATA_ROOT", str(tmp_path))
    result = runner.invoke(app, ["validate", "-d", "rees46"])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "data_root" in result.output


def test_evaluate_refuses_an_unknown_split():
    result = runner.invoke(app, ["evaluate", "--split", "train"])
    assert result.exit_code != 0
    assert "split" in result.output
