"""The privacy audit's numbers: reported epsilon against the one-shot estimates and the one-run
lower bound, for ULS and ELS, Gaussian and LMO noise, on the Shakespeare default and on the
mean-estimation task; the four broken mechanisms and their flags; the audit's wall-time overhead.

    python bench/audit_table.py [--parts audits,broken,overhead] [--canaries 1000] [--reps 2]

Every audit is a fresh `fedsim audit` (or `fedsim run`) process, as a user would run it; each
writes its run directory under bench/out/audit/. Prints JSON and writes bench/out/audit_table.json.

* audits: `fedsim audit` with 1000 gradient canaries (secure mode: fresh keys, as configured),
  configs/default.yaml at its epsilon (8), and configs/mean_estimation.yaml at epsilon 1 and 8
  with d = 32 (the study's) and d = 1024 (canaries nearly orthogonal, as the one-shot estimate
  assumes); LMO noise with its faithful accountant.
* broken: the switches of fedsim/privacy/sabotage.py and a leaked sampling key on the small
  configuration of tests/test_audit.py (smoke model, 20 real users, epsilon 1, delta 1e-6).
* overhead: `fedsim run` against `fedsim audit` of the same config (default, ULS and ELS),
  interleaved, `--reps` times; wall time of the process and of the training loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "audit"
LMO = ["--set", "dp.mechanism=lmo", "--set", "dp.accountant=lmo_faithful", "--set", "dp.adaptive_clip=null"]


def fedsim(args: list[str]) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: an audit that found a violation
        raise RuntimeError(f"fedsim {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return time.time() - t0


def newest(pattern: str) -> Path:
    return max(OUT.glob(pattern), key=lambda p: p.stat().st_mtime)


def audit_row(audit_json: Path, **labels) -> dict:
    r = json.loads(audit_json.read_text())
    return {**labels, "method": r["method"], "noise": r["noise"], "reported_epsilon": r["reported_epsilon"],
            "delta": r["delta"], "one_shot_final": r["one_shot"].get("final-model", {}).get("epsilon"),
            "one_shot_final_interval": r["one_shot"].get("final-model", {}).get("interval_95"),
            "one_shot_all_iterates": r["one_shot"].get("all-iterates", {}).get("epsilon"),
            "one_shot_all_iterates_interval": r["one_shot"].get("all-iterates", {}).get("interval_95"),
            "lower_bound": r["lower_bound"]["epsilon"], "lower_bound_statistic": r["lower_bound"]["statistic"],
            "verdict": r["verdict"], "eval_loss_before": r["diagnostics"]["eval_loss_before"],
            "eval_loss_after": r["diagnostics"]["eval_loss_after"],
            "audit_wall_time_s": r["wall_time_s"], "run_dir": r["run_dir"]}


def audits(canaries: int) -> list[dict]:
    rows = []
    for method in ("uls", "els"):
        for mech, extra in (("gaussian", []), ("lmo", LMO)):
            name = f"shakespeare-{method}-{mech}"
            fedsim(["audit", "configs/default.yaml", "--method", method, "--canaries", str(canaries),
                    "--set", f"run.output_dir={OUT}", "--set", f"run.name={name}", *extra])
            rows.append(audit_row(newest(f"{name}-audit-{method}*") / "audit.json", task="shakespeare",
                                  mechanism=mech))
            print(json.dumps(rows[-1]), flush=True)
    for eps in (1.0, 8.0):
        for dim in (32, 1024):
            for method in ("uls", "els"):
                for mech, extra in (("gaussian", []), ("lmo", LMO)):
                    name = f"mean-{method}-{mech}-eps{eps:g}-d{dim}"
                    fedsim(["audit", "configs/mean_estimation.yaml", "--task", "mean-estimation", "--method", method,
                            "--canaries", str(canaries), "--set", f"run.output_dir={OUT}", "--set", f"run.name={name}",
                            "--set", f"dp.epsilon={eps}", "--set", f"mean_estimation.dim={dim}", *extra])
                    rows.append(audit_row(newest(f"{name}-audit-{method}*") / "audit.json", task="mean-estimation",
                                          mechanism=mech, dim=dim))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def broken() -> list[dict]:
    """tests/test_audit.py's configurations, in this process (the switches are Python-only)."""
    sys.path.insert(0, str(ROOT))
    from fedsim.auditing.auditor import run_audit
    from fedsim.config import load_config
    from fedsim.privacy import sabotage

    dense = ["run.rounds=10", "uls.expected_cohort=10", "els.steps=10", "els.expected_batch=20"]
    sparse = ["run.rounds=100", "uls.expected_cohort=0.2", "els.steps=100", "els.expected_batch=0.4"]
    cases = [("none", dense, (), False, 500), ("no-clip", dense, ("no-clip",), False, 500),
             ("weak-noise", dense, ("weak-noise",), False, 500), ("reused-noise", dense, ("reused-noise",), False, 500),
             ("none (sparse)", sparse, (), False, 1000), ("leaked sampling key", sparse, (), True, 1000)]
    rows = []
    for method in ("ULS", "ELS"):
        for label, shape, kinds, knows, m in cases:
            cfg = load_config(ROOT / "configs" / "smoke.yaml", [
                f"run.output_dir={OUT / 'broken'}", "dp.epsilon=1", "dp.delta=1e-6", "els.k=2", "run.eval_every=1000",
                "els.eval_every=1000", *shape, "dp.reproducible=true"])
            with sabotage.sabotaged(*kinds):
                _, r = run_audit(cfg, method, canaries=m, say=lambda *a: None, auditor_knows_sampling=knows)
            by = r["lower_bound"]["by_statistic"]
            rows.append({"method": method, "broken": label, "reported_epsilon": r["reported_epsilon"],
                         "lower_bound": r["lower_bound"]["epsilon"], "statistic": r["lower_bound"]["statistic"],
                         "by_statistic": {k: v["epsilon_lower_bound"] for k, v in by.items()},
                         "one_shot_final": r["one_shot"]["final-model"]["epsilon"], "verdict": r["verdict"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def overhead(canaries: int, reps: int) -> list[dict]:
    rows = []
    for method in ("uls", "els"):
        times: dict[str, list[float]] = {"run": [], "audit": []}
        loop: dict[str, list[float]] = {"run": [], "audit": []}
        for rep in range(reps):
            for variant in ("run", "audit") if rep % 2 == 0 else ("audit", "run"):  # interleaved
                name = f"overhead-{method}-{variant}-{rep}"
                args = ["--set", f"run.output_dir={OUT}", "--set", f"run.name={name}"]
                if variant == "run":
                    times[variant].append(fedsim(["run", "configs/default.yaml", "--method", method, *args]))
                    summary = json.loads((newest(f"{name}*") / "summary.json").read_text())
                else:
                    times[variant].append(fedsim(["audit", "configs/default.yaml", "--method", method, "--canaries",
                                                  str(canaries), *args]))
                    summary = json.loads((newest(f"{name}-audit-{method}*") / "summary.json").read_text())
                loop[variant].append(summary["wall_time_s"])
        ratio = [a / r for a, r in zip(times["audit"], times["run"])]
        loop_ratio = [a / r for a, r in zip(loop["audit"], loop["run"])]
        rows.append({"method": method.upper(), "canaries": canaries, "reps": reps, "process_s": times, "loop_s": loop,
                     "process_ratio_mean": statistics.mean(ratio), "process_ratio_range": [min(ratio), max(ratio)],
                     "loop_ratio_mean": statistics.mean(loop_ratio), "loop_ratio_range": [min(loop_ratio), max(loop_ratio)]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="audits,broken,overhead")
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    result: dict = {"canaries": args.canaries}
    path = ROOT / "bench" / "out" / "audit_table.json"
    if path.is_file():  # parts run separately accumulate
        result = {**json.loads(path.read_text()), **result}
    if "broken" in parts:
        result["broken"] = broken()
    if "audits" in parts:
        result["audits"] = audits(args.canaries)
    if "overhead" in parts:
        result["overhead"] = overhead(args.canaries, args.reps)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
