"""benchmarks/gpu_check.py in smoke mode (CPU: the T4 rehearsal and one offline bench row): it runs every part,
reports each, and writes its rows between the markers of a results file, replacing the previous ones."""

from benchmarks import gpu_check


def test_gpu_check_smoke_writes_its_rows_once(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    summary = gpu_check.main(["--smoke", "--out", str(tmp_path / "out"), "--results", str(results)])
    assert [r["case"] for r in summary["t4"]] == ["lora"] and all(r["ok"] for r in summary["t4"])
    (row,) = summary["rows"]
    assert row["method"] == "dreambooth+te+prior" and row["nbkit"]["s_per_step"] > 0
    assert row["reference"]["s_per_step"] > 0 and row["planner_gib"] > 0
    text = results.read_text()
    assert "kept text" in text and text.count(gpu_check.BEGIN) == 1 and text.count(gpu_check.END) == 1
    assert "| lora | ok |" in text and "| dreambooth+te+prior | cpu |" in text
    assert (tmp_path / "out" / "gpu_check-smoke.json").exists()
    gpu_check.write_results(results, f"{gpu_check.BEGIN}\nnewer rows\n{gpu_check.END}")  # a later check replaces it
    text = results.read_text()
    assert "kept text" in text and "newer rows" in text and "| lora | ok |" not in text
    assert text.count(gpu_check.BEGIN) == 1
