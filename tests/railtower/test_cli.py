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


def test_rules_dry_run_shows_what_a_new_block_changes(tmp_path):
    import orjson

    from railtower.settings import PROJECT_ROOT

    current = orjson.loads((PROJECT_ROOT / "configs/rules/example.json").read_bytes())
    proposed = {
        **current,
        "version": "next",
        "rules": [*current["rules"], {"kind": "block", "category": "electronics > smartphone"}],
    }
    path = tmp_path / "proposed.json"
    path.write_bytes(orjson.dumps(proposed))
    report = tmp_path / "dry-run.md"
    result = runner.invoke(
        app,
        ["rules-dry-run", str(path), "-d", "rees46", "--requests", "60", "--output", str(report)],
    )
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "`example@2019.11.1` → `example@next`" in text
    changed = int(text.split("| requests changed | ")[1].split(" ")[0])
    blocked = int(text.split("| items newly blocked | ")[1].split(":")[0])
    assert changed > 0 and blocked > 0


def test_rules_dry_run_names_the_broken_field(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x", "version": "1", "rules": [{"kind": "pin", "slot": 0}]}')
    result = runner.invoke(app, ["rules-dry-run", str(path), "-d", "rees46"])
    assert result.exit_code == 1
    assert "slot" in result.output
