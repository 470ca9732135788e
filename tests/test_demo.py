"""Smoke test of the demo's whole path (``python -m cmbn_ext.demo --quick``): training every method at
every micro-batch size, then the table, the plot and the JSON. No accuracy is asserted."""
import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from cmbn_ext import demo  # noqa: E402  (after the skips: the demo needs the optional extras)


def test_quick_demo_writes_table_plot_and_json(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0

    table = (tmp_path / "results.md").read_text()
    png = (tmp_path / "accuracy.png").read_bytes()
    record = json.loads((tmp_path / "results.json").read_text())
    assert png.startswith(b"\x89PNG")
    assert "| method |" in table and "CmBN cumulative, renorm" in table
    assert "| method |" in capsys.readouterr().out

    protocol = demo.QUICK
    expected = {(model, method.name, micro) for model in protocol.models for method in demo.METHODS
                for micro in protocol.micro_batches}
    summary = {(e["model"], e["method"], e["micro_batch"]): e for e in record["summary"]}
    assert set(summary) == expected
    for entry in summary.values():
        assert entry["seeds"] == len(protocol.seeds)
        for key in ("test_accuracy", "test_accuracy_std", "test_loss", "test_loss_std"):
            assert math.isfinite(entry[key]), (entry["model"], entry["method"], entry["micro_batch"], key)
    assert all(math.isfinite(run["test_accuracy"]) and math.isfinite(run["test_loss"])
               for run in record["runs"])
