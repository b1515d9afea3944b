"""`fedsim report`: a fake sweep built from two tiny real runs (ULS and ELS smoke runs), the
statistics, and one-line errors on bad input."""

import json
import shutil
from pathlib import Path

import pytest

from fedsim.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
RUN_FIGURES = ("loss_vs_compute.png", "winner_heatmap.png", "epsilon_vs_steps.png", "clipping.png")
FIGURES = (*RUN_FIGURES, "mean_estimation.png")
# cell -> (ULS loss offset, ELS loss offset) per seed: a clear ULS win, and an overlapping ELS edge
LOSSES = {"dp.epsilon=1,compare.budget=100": ([0.00, 0.02], [0.50, 0.52]),
          "dp.epsilon=8,compare.budget=100": ([0.00, 0.20], [-0.05, 0.10])}


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny real runs: ULS (3 rounds) and ELS (4 steps, k=4 so the mixture accounting is quick)."""
    from fedsim.config import load_config
    from fedsim.loop import run

    out = tmp_path_factory.mktemp("runs")

    def quiet(*args, **kwargs):
        pass

    uls_dir, _ = run(load_config(ROOT / "configs" / "smoke.yaml", [f"run.output_dir={out}", "run.name=uls"]),
                     "ULS", quiet)
    els_dir, _ = run(load_config(ROOT / "configs" / "smoke.yaml",
                                 [f"run.output_dir={out}", "run.name=els", "els.steps=4", "els.k=4",
                                  "els.eval_every=1"]), "ELS", quiet)
    return {"ULS": uls_dir, "ELS": els_dir}


def make_sweep(root: Path, runs: dict[str, Path], losses: dict = LOSSES) -> Path:
    """A sweep directory as `fedsim sweep` writes it: results.json rows built from the real runs'
    summaries (losses perturbed per cell and seed), the run directories reused across rows."""
    rows = []
    for method, src in {**runs, "non-private": runs["ULS"]}.items():
        dst = root / "runs" / method.lower()
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
        summary = json.loads((dst / "summary.json").read_text())
        for cell, (uls, els) in losses.items():
            eps, budget = (float(kv.split("=")[1]) for kv in cell.split(","))
            for seed in range(len(uls)):
                offset = {"ULS": uls[seed], "ELS": els[seed], "non-private": uls[seed] - 0.3}[method]
                rows.append({
                    "cell": cell, "seed": seed, "method": method, "dp.epsilon": eps, "compare.budget": budget,
                    "epsilon": None if method == "non-private" else summary["epsilon"], "target_epsilon": eps,
                    "delta": summary["delta"], "accountant": summary["accountant"], "budget": budget,
                    "compute_examples": summary["compute_examples"], "steps": summary["steps"],
                    "eval_loss_before": summary["eval_loss_before"],
                    "eval_loss_after": 4.0 + offset, "wall_time_s": summary["wall_time_s"],
                    "run_dir": f"runs/{method.lower()}", "status": "completed"})
    rows.append({**rows[0], "seed": 99, "status": "failed: out of memory", "eval_loss_after": None})  # left out
    grid = {"dp.epsilon": sorted({r["dp.epsilon"] for r in rows}),
            "compare.budget": sorted({r["compare.budget"] for r in rows})}
    seeds = max(len(uls) for uls, _ in losses.values())
    (root / "results.json").write_text(json.dumps({"grid": grid, "seeds": seeds, "methods": ["ULS", "ELS", "non-private"],
                                                   "rows": rows}))
    return root


def mean_estimation_json(path: Path) -> Path:
    """A small result in bench/mean_estimation_sweep.py's format."""
    rows = [{"heterogeneity": h, "budget": b, "epsilon": e,
             "uls": {"loss": 1e-3 / e * (4000 / b) ** 0.5, "std": 1e-4}, "els": {"loss": 1.3e-3 / e, "std": 3e-4}}
            for h in (0.0, 0.9) for e in (1.0, 16.0) for b in (4000, 32000)]
    path.write_text(json.dumps({"config": {"seeds": 3}, "delta": 1e-5, "rows": rows}))
    return path


@pytest.fixture(scope="session")
def sweep_report(smoke_runs, tmp_path_factory):
    """`fedsim report DIR --html --mean-estimation JSON` on the fake sweep: (exit code, report directory)."""
    root = make_sweep(tmp_path_factory.mktemp("sweep"), smoke_runs)
    mean_est = mean_estimation_json(tmp_path_factory.mktemp("bench") / "mean_estimation.json")
    return cli_main(["report", str(root), "--html", "--mean-estimation", str(mean_est)]), root / "report"


def test_report_writes_every_figure_and_the_tables(sweep_report, capsys):
    code, out = sweep_report
    assert code == 0
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    md = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"![{name}]({name})" in md
    assert ("| cell | winner | margin (ELS − ULS) | paired 95% half-width | resolved (paired) |"
            " 95% intervals overlap |") in md
    rows = [line for line in md.splitlines() if line.startswith("| dp.epsilon=")]
    assert any(r.startswith("| dp.epsilon=1,compare.budget=100 | ULS | +0.5000 |") and r.endswith("| no |") for r in rows)
    assert any(r.startswith("| dp.epsilon=8,compare.budget=100 | ELS | -0.0750 |") and r.endswith("| yes |") for r in rows)
    assert "outside the differential-privacy guarantee" in md
    assert "| dp.epsilon=1,compare.budget=100 seed 99 ULS | failed: out of memory |" in md
    html = (out / "report.html").read_text()
    assert all(f'<img src="{name}"' in html for name in FIGURES)


def test_epsilon_figure_recomputes_with_other_accountants(smoke_runs, tmp_path, monkeypatch):
    """The other accountants are evaluated; one slower than the limit is dropped and named in report.md."""
    from fedsim import report

    root = make_sweep(tmp_path / "sweep", smoke_runs, {"dp.epsilon=1,compare.budget=100": ([0.0], [0.1])})
    uls, els = report.representative_runs(report.load_results(root)).values()
    curves = report.recomputed_epsilons(uls, [], deadline=float("inf"))
    assert set(curves) == {"rdp", "prv", "edgeworth", "lmo_faithful"}  # all but the run's own (pld)
    assert all(0 < eps < 20 for pts in curves.values() for _, eps in pts)
    assert set(report.recomputed_epsilons(els, [], deadline=float("inf"))) == {"edgeworth"}  # the ELS mixture
    monkeypatch.setattr(report, "ACCOUNTANT_SECONDS", -1.0)  # every evaluation is "too slow"
    report.write_report(root, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "ULS: rdp skipped (one evaluation took" in md and "ELS: edgeworth skipped" in md
    assert "| dp.epsilon=1,compare.budget=100 | ULS | +0.1000 | n/a | n/a | n/a |" in md  # one seed: no interval


def test_t_interval_known_value():
    from fedsim.report import t_interval

    mean, half = t_interval([1, 2, 3])
    assert mean == 2.0 and half == pytest.approx(2.4841, abs=1e-4)  # t(0.975, 2) * 1 / sqrt(3)
    assert t_interval([5.0]) == (5.0, None)


def test_winner_and_overlap():
    from fedsim.report import decide

    clear = decide(uls=(1.0, 0.1), els=(1.5, 0.1))
    assert (clear.winner, clear.margin, clear.overlap) == ("ULS", 0.5, False)
    close = decide(uls=(1.0, 0.2), els=(0.9, 0.2))
    assert close.winner == "ELS" and close.margin == pytest.approx(-0.1) and close.overlap is True
    assert decide((1.0, None), (2.0, 0.1)).overlap is None  # one seed: n/a


MINIMAL_ROW = {"cell": "a", "seed": 0, "method": "ULS", "budget": 100, "eval_loss_before": 3.0,
               "eval_loss_after": 2.0, "run_dir": "nowhere"}


@pytest.mark.parametrize("case", ["missing", "empty", "malformed", "no-rows", "bad-row", "bad-mean-estimation"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    root = tmp_path / "d"
    if case != "missing":
        root.mkdir()
    text = {"malformed": "{not json", "no-rows": json.dumps({"grid": {}, "rows": []}),
            "bad-row": json.dumps({"grid": {}, "rows": [{"cell": "a", "seed": 0, "method": "ULS"}]}),
            "bad-mean-estimation": json.dumps({"grid": {}, "rows": [MINIMAL_ROW]})}.get(case)
    if text is not None:
        (root / "results.json").write_text(text)
    (tmp_path / "me.json").write_text(json.dumps({"config": {"seeds": 3}, "rows": [{"heterogeneity": 0.0}]}))
    before = sorted(tmp_path.rglob("*"))
    assert cli_main(["report", str(root), *(["--mean-estimation", str(tmp_path / "me.json")]
                                            if case == "bad-mean-estimation" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_comparison_directory_is_accepted(smoke_runs, tmp_path, capsys):
    """compare.json is read as a sweep of one cell and one seed; the recorded run paths may be stale."""
    root = tmp_path / "cmp"
    summaries = {}
    for key, method in (("uls", "ULS"), ("els", "ELS"), ("reference", "ULS")):
        shutil.copytree(smoke_runs[method], root / key, ignore=shutil.ignore_patterns("*.safetensors"))
        summaries[key] = json.loads((root / key / "summary.json").read_text())
    summaries["reference"]["epsilon"] = None
    (root / "compare.json").write_text(json.dumps({
        "budget": 100, "epsilon_target": 8.0, **summaries,
        **{f"{k}_dir": f"elsewhere/{k}" for k in summaries}}))
    assert cli_main(["report", str(root), "--out", str(tmp_path / "out")]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| dp.epsilon=8.0,compare.budget=100 | non-private | " in md
    assert all((tmp_path / "out" / name).read_bytes().startswith(PNG) for name in RUN_FIGURES)


def test_missing_run_directories_cost_only_their_figures(tmp_path):
    """Rows whose run directories are gone: the loss figures and tables are still written, the
    per-run figures are left out with a note."""
    (tmp_path / "results.json").write_text(json.dumps({"grid": {}, "rows": [MINIMAL_ROW]}))
    assert cli_main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "epsilon_vs_steps.png not drawn" in md and "clipping.png not drawn" in md
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["loss_vs_compute.png", "report.md",
                                                                         "winner_heatmap.png"]


def test_the_paired_interval_resolves_what_overlapping_intervals_cannot():
    """Seeds that move both methods together (a shared offset) widen each method's interval, not
    the interval of their per-seed differences."""
    from types import SimpleNamespace

    from fedsim import report

    ck = ((), 1.0, 100.0)
    offsets = [0.0, 0.3, -0.2]
    runs = [SimpleNamespace(cell_key=ck, method=m, seed=i, loss_after=base + off + (0.01 * i if m == "ELS" else 0))
            for m, base in (("ULS", 2.0), ("ELS", 2.1)) for i, off in enumerate(offsets)]
    stats = {(ck, m): report.Stat(*report.t_interval([r.loss_after for r in runs if r.method == m]), 3, 1.0, 1.0)
             for m in ("ULS", "ELS")}
    v = report.verdicts(stats, SimpleNamespace(runs=runs))[ck]
    assert v.winner == "ULS" and v.overlap is True  # the unpaired intervals cannot tell
    diffs = [0.1, 0.11, 0.12]
    assert v.paired == pytest.approx(report.t_interval(diffs)[1]) and abs(v.margin) > v.paired
