"""The paper configs (``experiments/paper/``): each dry-runs, each published row has a run
that reproduces it, and one config runs end to end on a small random model through the
report that puts the paper's figures beside ours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dlm_decode import cli
from dlm_decode.ablate.config import PaperRow, expand_runs, load_config, match_run, validate_config
from dlm_decode.ablate.paper import format_paper_report
from dlm_decode.models.testing import write_char_tokenizer, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "paper"
DATA = ROOT.parent / "shared" / "data"
CONFIGS = sorted(PAPER.glob("*.yaml"))
#: published rows per table (Fast-dLLM++ 2606.02955v2): Table 1 and 4 have 24, 2 and 5 have 18
ROWS = {"table1": 24, "table2": 18, "table4": 24, "table5": 18, "figure2": 3}
TASK_DATA = {"gsm8k": "gsm8k", "math": "math", "humaneval": "humaneval", "mbpp": "mbpp"}


def _local(cfg: dict[str, Any], tmp: Path, name: str) -> Path:
    """A copy of a paper config that runs here: CPU, the shared data, no W&B."""
    cfg = json.loads(json.dumps(cfg))
    cfg["model"]["device"] = "cpu"
    for task in cfg["tasks"]:
        task["data_path"] = str(DATA / TASK_DATA[task["name"]])
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def test_there_is_a_config_per_table() -> None:
    assert {p.stem.split("_")[0] for p in CONFIGS} == set(ROWS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_config_holds_its_table_and_every_row_has_a_run(path: Path) -> None:
    cfg = load_config(path, validate_plugins=False)
    assert cfg.paper is not None and "2606.02955" in cfg.paper.source
    assert len(cfg.paper.rows) == ROWS[path.stem.split("_")[0]]
    assert validate_config(cfg) == []
    runs = expand_runs(cfg)
    for row in cfg.paper.rows:
        run = match_run(cfg, runs, row)
        assert run is not None, row
        assert run.block_length == 32 and not run.early_stop and cfg.batch_size == 1


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data beside the checkout")
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_config_dry_runs(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = _local(yaml.safe_load(path.read_text(encoding="utf-8")), tmp_path, path.name)
    rc = cli.main(["ablate", str(local), "--dry-run", "--no-wandb", "--out", str(tmp_path / "o")])
    _out, err = capsys.readouterr()
    assert rc == 0, err
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_a_row_no_run_reproduces_is_a_config_problem(tmp_path: Path) -> None:
    raw = yaml.safe_load((PAPER / "table2_llada_gsm8k_8shot.yaml").read_text(encoding="utf-8"))
    raw["paper"]["rows"][0]["gen_length"] = 2048
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    problems = validate_config(load_config(path, validate_plugins=False))
    assert problems and problems[0].startswith("paper.rows[0]: no run matches")


def test_report_ratios_follow_the_paper() -> None:
    """The paper's own ratios come out of its figures (Table 1, GSM8K-256)."""
    cfg = load_config(PAPER / "table1_llada_prefix.yaml", validate_plugins=False)
    from dlm_decode.ablate.paper import paper_report

    entries = paper_report(cfg, expand_runs(cfg), [])
    frechet = next(
        e
        for e in entries
        if e["policy"] == "frechet" and e["task"] == "gsm8k" and e["gen_length"] == 256
    )
    assert frechet["paper_speedup"] == pytest.approx(103.8 / 73.8)  # printed 1.41×
    assert frechet["paper_nfe_reduction"] == pytest.approx(0.320, abs=5e-4)  # ↓32.0%
    assert frechet["n"] == 0 and frechet["ours_accuracy"] is None
    text = format_paper_report(entries, cfg.paper.source, cfg.paper.baseline)
    assert "| Table 1 | gsm8k | 5 | 256 | prefix | frechet | 0 | 77.2 | — |" in text


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data beside the checkout")
def test_a_paper_config_runs_end_to_end_through_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Table 1's GSM8K-256 group on a small random model (the shipped tiny model's 256
    positions cannot hold a 5-shot GSM8K prompt), two problems."""
    model = write_char_tokenizer(
        write_random_checkpoint(tmp_path / "model", "llada", max_sequence_length=8192)
    )
    raw = yaml.safe_load((PAPER / "table1_llada_prefix.yaml").read_text(encoding="utf-8"))
    raw["model"]["name"] = str(model)
    raw["model"].pop("dtype", None)
    raw["tasks"] = [{"name": "gsm8k", "shots": 5, "limit": 2}]
    raw["lengths"] = [{"gen_length": 256, "block_length": 32}]
    raw["paper"]["rows"] = [
        r for r in raw["paper"]["rows"] if r["task"] == "gsm8k" and r["gen_length"] == 256
    ]
    path = _local(raw, tmp_path, "smoke.yaml")
    out_dir = tmp_path / "sweep"
    rc = cli.main(
        ["ablate", str(path), "--no-wandb", "--no-plots", "--no-progress", "--out", str(out_dir)]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = (out_dir / "paper.md").read_text(encoding="utf-8")
    lines = [ln for ln in report.splitlines() if ln.startswith("| Table 1 |")]
    assert len(lines) == 3  # threshold, factor, frechet
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[6] == "2"  # n: both problems decoded
        assert cells[8] != "—" and cells[10] != "—" and cells[11] != "—"  # ours, both ways
        assert cells[16] != "—"  # our total NFE
    threshold = next(ln for ln in lines if "| threshold |" in ln)
    assert "| 1.00 | 1.00 | 1.00 |" in threshold  # the baseline against itself
    assert "Published figures from Fast-dLLM++" in out  # printed too
    rows = [json.loads(x) for x in (out_dir / "rows.jsonl").read_text().splitlines()]
    assert all(r["reference_tokens"] >= 0 for r in rows) and len(rows) == 6


def test_paper_row_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError):
        PaperRow(table="T", task="gsm8k", gen_length=256, cache="prefix", policy="x", speed=3)
