"""How long the README's main command takes from a fresh process, and what it reports: `harli replay` at its
defaults (the real model, the bundled trace, harli and decode-only at one SLO), run twice, each in a new process
with its own report directory: first with an empty JAX compilation cache (cold), then with the cache the first run
filled (warm). The result keeps each run's wall time, exit status, the share of the CPUs other processes used just
before it, and its report's figures per policy.

    python bench/replay_default.py               # writes bench/results/replay_default-<device>.json
    python bench/replay_default.py --out /tmp/r  # elsewhere
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path

FIGURES = ("slo_attainment", "tpot_p99_ms", "tbt_attainment", "ttft_p50_ms", "decode_tokens_per_s",
           "finetune_tokens_per_s", "harvest_ratio", "fused_steps", "finetune_steps", "exact_match_before",
           "exact_match_after", "eval_loss_before", "eval_loss_after")


def replay(cache: Path, out: Path) -> dict:
    """One `harli replay` at its defaults in a new process; its wall time and report."""
    quiet = common.other_cpu_share(5.0)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harli_jax.cli", "replay", "--compilation-cache", str(cache),
                           "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    run = {"wall_s": round(wall, 1), "returncode": done.returncode, "other_cpu_share_before": quiet,
           "load_after": common.load_now(), "stdout": done.stdout.splitlines(),
           "stderr_tail": done.stderr.splitlines()[-12:]}
    if done.returncode == 0:
        report = json.loads((out / "summary.json").read_text())
        run["slo"] = {k: report["slo"][k] for k in ("tpot_slo_ms", "tbt_slo_ms", "solo_decode_step_ms", "solo_batch")}
        run["policies"] = {s["policy"]: {k: s.get(k) for k in FIGURES} for s in report["summary"]}
        run["standalone_tokens_per_s"] = report["setup"]["standalone_tokens_per_s"]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the JSON result (default bench/results)")
    parser.add_argument("--keep", default=None, help="keep the two runs' report directories here (cold/, warm/)")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="harli-replay-default-") as work:
        cache, reports = Path(work) / "xla", Path(args.keep or work)
        for label in ("cold", "warm"):
            runs[label] = replay(cache, reports / label)
            figures = runs[label].get("policies", {})
            common.say(f"{label}: {runs[label]['wall_s']} s, exit {runs[label]['returncode']}, "
                       + "; ".join(f"{p} {f['slo_attainment']:.1%} within the SLO, harvest {f['harvest_ratio']:.1%}, "
                                   f"exact {f['exact_match_before']:.0%} -> {f['exact_match_after']:.0%}"
                                   for p, f in figures.items()))
    payload = {"command": "harli replay --compilation-cache <empty, then warm> --out <new directory>",
               "runs": runs}
    common.say(f"wrote {common.write_result('replay_default', payload, args.out)}")


if __name__ == "__main__":
    main()
