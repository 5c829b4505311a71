"""Compare the runs of a sweep: loss curves, throughput, step-time breakdown, and a table of arm differences.

    python recipes/compare_runs.py outputs/multirun/2025-01-31/12-00-00            # writes into the sweep dir
    python recipes/compare_runs.py outputs/multirun/2025-01-31/12-00-00 --out report --last-k 10
    python recipes/compare_runs.py outputs/abl/muon_vs_adamw_tuning/muon_split --best-overrides  # "optim.lr=0.02 ..."

A *run* is any directory below the sweep dir with a `metrics.jsonl` and a resolved config (`config.json`, or
Hydra's `.hydra/config.yaml`). Runs are grouped into *arms* by the command-line overrides that differ between
runs (Hydra's `.hydra/overrides.yaml`), `seed` excluded: the seeds of one arm are its repeats. A run that stopped
before its `train.steps` (killed, timed out, aborted) is left out with a note. The question an
ablation asks is whether arm B beats arm A by more than the seed-to-seed noise, so every number comes with its
spread over seeds, and every difference with its standard error, Welch's t and a 95% interval.

Definitions (the same in `summary.md`, `summary.json` and the notebook `notebooks/compare_runs.ipynb`):

* final loss of a run: mean of its last k logged training losses (k = `--last-k`), which averages out the
  step-to-step noise of a single batch;
* final eval loss of a run: its last logged `eval_loss`; final eval bpb: its last logged `eval_bpb` (bits per
  byte of held-out text, which compares across tokenizers and corpora where nats per token do not);
* tokens/s and step time of a run: medians over its logged steps, the first one excluded (it pays for warm-up
  and compilation) and, for step time, steps that also ran an evaluation excluded;
* arm value: mean over its runs (seeds), with the sample standard deviation (ddof 1) and n;
* difference of arm B to the baseline arm A: mean_B - mean_A, standard error sqrt(s_A^2/n_A + s_B^2/n_B),
  Welch's t = difference / SE with Welch-Satterthwaite degrees of freedom, and the 95% interval
  difference +- t_{0.975, dof} * SE (B. L. Welch, "The generalization of Student's problem when several
  different population variances are involved", Biometrika 1947).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from muon_recipes.sweep import NOT_ARM_KEYS  # noqa: E402  (where or how a run is logged or launched: never an arm)

CONFIG_FILES = ("config.json", ".hydra/config.yaml")
PLOTS = ("loss_vs_step.png", "loss_vs_wall_time.png", "eval_loss.png", "eval_bpb.png", "step_time_breakdown.png",
         "tokens_per_s.png")


class NoRunsError(ValueError):
    """The directory holds no run that can be compared."""


# ----------------------------------------------------------------------------------------------------------------
# Loading runs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    config: dict
    overrides: dict  # key -> value as typed on the command line ("optim" -> "muon_fused")
    rows: list  # the metrics.jsonl records, in order
    arm: str = ""

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def column(self, key: str, rows: Optional[list] = None) -> tuple[np.ndarray, np.ndarray]:
        """(step, value) for the rows that have a finite `key`."""
        rows = self.rows if rows is None else rows
        pairs = [(r["step"], r[key]) for r in rows if _finite(r.get(key)) and r.get("step") is not None]
        if not pairs:
            return np.empty(0), np.empty(0)
        steps, values = zip(*pairs)
        return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _natural_key(path: Path) -> list:
    """Sort `.../10` after `.../9` (Hydra job numbers)."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", str(path))]


def parse_overrides(lines: Sequence[str]) -> dict:
    """Hydra override strings (`optim=muon_fused`, `+x=1`, `++y=2`) -> {key: value}; deletions (`~k`) dropped."""
    out = {}
    for line in lines:
        line = str(line)
        if line.startswith("~") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.lstrip("+")] = value
    return out


def _load_config(run_dir: Path) -> Optional[dict]:
    if (run_dir / "config.json").is_file():
        with open(run_dir / "config.json") as f:
            return json.load(f)
    if (run_dir / ".hydra" / "config.yaml").is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # interpolations that need Hydra (${hydra:...}, ${now:...}): keep them unresolved
            return OmegaConf.to_container(cfg, resolve=False)
    return None


def _load_overrides(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return parse_overrides(OmegaConf.to_container(OmegaConf.load(path)) or [])


def _load_rows(path: Path) -> list:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
                    continue
    return rows


def find_runs(root: Path) -> list[Run]:
    """Every run directory below `root` (or `root` itself), in natural path order."""
    root = Path(root)
    if not root.is_dir():
        raise NoRunsError(f"sweep dir {str(root)!r} does not exist or is not a directory")
    runs = []
    for metrics in sorted(root.rglob("metrics.jsonl"), key=lambda p: _natural_key(p.parent)):
        run_dir = metrics.parent
        if "wandb" in run_dir.relative_to(root).parts:
            continue
        config = _load_config(run_dir)
        rows = _load_rows(metrics)
        if config is None:
            print(f"compare_runs: skipping {run_dir}: no config.json or .hydra/config.yaml", file=sys.stderr)
            continue
        if not rows:
            print(f"compare_runs: skipping {run_dir}: metrics.jsonl is empty (the run logged nothing)",
                  file=sys.stderr)
            continue
        planned = (config.get("train") or {}).get("steps")
        last = rows[-1].get("step")
        if isinstance(planned, int) and isinstance(last, int) and last < planned:
            print(f"compare_runs: skipping {run_dir}: it stopped at step {last} of {planned} (its final numbers "
                  f"would not compare with finished runs)", file=sys.stderr)
            continue
        runs.append(Run(run_dir, config, _load_overrides(run_dir), rows))
    if not runs:
        raise NoRunsError(f"no runs found under {str(root)!r}: expected directories with a non-empty metrics.jsonl "
                          f"and a config ({' or '.join(CONFIG_FILES)}), e.g. the output of "
                          f"`python train.py -m experiment=<name>`")
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Arms
# ----------------------------------------------------------------------------------------------------------------
def _config_value(config: dict, key: str) -> Any:
    """The resolved value behind an override key; for a config group (`optim`) its `name`."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):
        return node.get("name")
    return node


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value differs between runs (in first-seen order), the NOT_ARM_KEYS excluded."""
    keys: list[str] = []
    for run in runs:
        for key in run.overrides:
            if key not in keys and key not in NOT_ARM_KEYS and not key.startswith("hydra."):
                keys.append(key)
    return [k for k in keys if len({_arm_value(run, k) for run in runs}) > 1]


def _arm_value(run: Run, key: str) -> str:
    if key in run.overrides:
        return run.overrides[key]
    value = _config_value(run.config, key)  # a run that kept the default: say what the default was
    return "default" if value is None else str(value)


def assign_arms(runs: Sequence[Run]) -> list[str]:
    """Label every run with its arm (`optim=muon_fused` or `k1=a,k2=b`); return the arms in first-seen order."""
    keys = swept_keys(runs)
    arms: list[str] = []
    for run in runs:
        run.arm = ",".join(f"{k}={_arm_value(run, k)}" for k in keys) or "all runs"
        if run.arm not in arms:
            arms.append(run.arm)
    return arms


# ----------------------------------------------------------------------------------------------------------------
# Per-run and per-arm statistics
# ----------------------------------------------------------------------------------------------------------------
def final_loss(run: Run, last_k: int) -> float:
    _, loss = run.column("loss")
    return float(np.mean(loss[-last_k:])) if loss.size else math.nan


def final_eval(run: Run, key: str = "eval_loss") -> float:
    """The last logged value of an evaluation metric (eval_loss, eval_bpb), NaN if never logged."""
    _, ev = run.column(key)
    return float(ev[-1]) if ev.size else math.nan


def _steady_rows(run: Run, skip_eval: bool) -> list:
    rows = run.rows[1:] if len(run.rows) > 1 else run.rows
    if skip_eval:
        no_eval = [r for r in rows if r.get("eval_loss") is None]
        rows = no_eval or rows
    return rows


def _median(run: Run, key: str, skip_eval: bool) -> float:
    _, v = run.column(key, _steady_rows(run, skip_eval))
    return float(np.median(v)) if v.size else math.nan


def tokens_per_s(run: Run) -> float:
    return _median(run, "tokens_per_s", skip_eval=True)


def step_time_s(run: Run) -> float:
    return _median(run, "step_time_s", skip_eval=True)


def step_time_breakdown(run: Run) -> dict:
    """Median seconds per step in: forward/backward, Newton-Schulz, optimizer communication, rest of the
    optimizer, everything else (data, clipping, logging). Components a run did not log are NaN."""
    total = step_time_s(run)
    fb = _median(run, "forward_backward_s", skip_eval=True)
    opt = _median(run, "optim_time_s", skip_eval=True)
    ns = _median(run, "optim_ns_s", skip_eval=True)
    comm = _median(run, "optim_comm_s", skip_eval=True)
    parts = {"forward/backward": fb, "Newton-Schulz": ns, "optimizer communication": comm}
    known = [x for x in (ns, comm) if _finite(x)]
    parts["optimizer, other"] = opt - sum(known) if _finite(opt) else math.nan
    used = [x for x in (fb, opt) if _finite(x)]
    parts["rest (data, clip, log)"] = max(total - sum(used), 0.0) if _finite(total) else math.nan
    return parts


METRICS = {  # name in the tables -> (per-run function taking (run, last_k), better when lower?)
    "final loss": (lambda run, k: final_loss(run, k), True),
    "final eval loss": (lambda run, k: final_eval(run, "eval_loss"), True),
    "final eval bpb": (lambda run, k: final_eval(run, "eval_bpb"), True),
    "tokens/s": (lambda run, k: tokens_per_s(run), False),
    "step time (s)": (lambda run, k: step_time_s(run), True),
}


@dataclass
class Stat:
    mean: float
    std: float  # sample std (ddof 1); NaN when n < 2
    n: int
    values: list = field(default_factory=list)


def describe(values: Sequence[float]) -> Stat:
    v = np.asarray([x for x in values if _finite(x)], dtype=float)
    if v.size == 0:
        return Stat(math.nan, math.nan, 0, [])
    std = float(np.std(v, ddof=1)) if v.size > 1 else math.nan
    return Stat(float(np.mean(v)), std, int(v.size), v.tolist())


# ----------------------------------------------------------------------------------------------------------------
# Welch's t-test, with Student's t distribution from the regularized incomplete beta function
# ----------------------------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 3rd ed., 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom: 1 - I_{dof/(dof+t^2)}(dof/2, 1/2) / 2 for t > 0."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_ppf(p: float, dof: float) -> float:
    """The p-quantile of Student's t (bisection on the CDF; |t| < 1e4 covers dof >= 1 down to p = 1e-8)."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class Difference:
    diff: float
    se: float
    t: float
    dof: float
    low: float
    high: float
    p: float


def welch(a: Stat, b: Stat) -> Difference:
    """b - a with Welch's unequal-variance standard error; NaN where n < 2 in either arm."""
    diff = b.mean - a.mean
    nan = math.nan
    if a.n < 2 or b.n < 2:
        return Difference(diff, nan, nan, nan, nan, nan, nan)
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Difference(diff, 0.0, nan, nan, diff, diff, nan)
    dof = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    t = diff / se
    q = student_t_ppf(0.975, dof)
    p = 2.0 * (1.0 - student_t_cdf(abs(t), dof))
    return Difference(diff, se, t, dof, diff - q * se, diff + q * se, p)


# ----------------------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    root: Path
    runs: list
    arms: list
    keys: list
    last_k: int
    baseline: str
    stats: dict  # arm -> metric -> Stat
    diffs: dict  # arm -> metric -> Difference (arms other than the baseline)
    rank_by: str = "final eval bpb"

    def runs_of(self, arm: str) -> list:
        return [r for r in self.runs if r.arm == arm]


def compare(root: Path | str, last_k: int = 5, baseline: Optional[str] = None,
            rank_by: str = "final eval bpb") -> Comparison:
    """Load every run below `root`, group into arms, and compute the per-arm statistics and differences."""
    if last_k < 1:
        raise ValueError(f"last_k={last_k}: must be an integer >= 1")
    if rank_by not in METRICS:
        raise ValueError(f"rank_by={rank_by!r}: must be one of {', '.join(METRICS)}")
    runs = find_runs(Path(root))
    arms = assign_arms(runs)
    if baseline is None:
        baseline = arms[0]
    elif baseline not in arms:
        raise ValueError(f"baseline={baseline!r}: must be one of the arms: {', '.join(arms)}")
    arms = [baseline] + [a for a in arms if a != baseline]
    stats = {arm: {name: describe([fn(r, last_k) for r in runs if r.arm == arm]) for name, (fn, _) in METRICS.items()}
             for arm in arms}
    diffs = {arm: {name: welch(stats[baseline][name], stats[arm][name]) for name in METRICS}
             for arm in arms if arm != baseline}
    return Comparison(Path(root), runs, arms, swept_keys(runs), last_k, baseline, stats, diffs, rank_by)


def ranking(c: Comparison, metric: str) -> list:
    """(arm, Stat) of the arms that logged `metric`, best mean first (lowest for losses, highest for tokens/s)."""
    lower_is_better = METRICS[metric][1]
    logged = [(arm, c.stats[arm][metric]) for arm in c.arms if c.stats[arm][metric].n]
    return sorted(logged, key=lambda item: item[1].mean if lower_is_better else -item[1].mean)


def best_overrides(c: Comparison) -> list[str]:
    """The swept `key=value` overrides of the arm ranked first by `c.rank_by`, as typed on a command line.

    This turns a tuning sweep into the settings of the next sweep (`recipes/gpu_ablations.sh` picks each arm's
    lr this way). Keys a run left at its default are omitted: the next run keeps that default too.
    """
    ranked = ranking(c, c.rank_by)
    if not ranked:
        raise NoRunsError(f"no run under {str(c.root)!r} logged {c.rank_by!r}: nothing to rank")
    best = c.runs_of(ranked[0][0])[0]
    return [f"{key}={best.overrides[key]}" for key in c.keys if key in best.overrides]


def _fmt(x: float, digits: int) -> str:
    return "—" if not _finite(x) else f"{x:.{digits}f}"


DIGITS = {"final loss": 4, "final eval loss": 4, "final eval bpb": 4, "tokens/s": 1, "step time (s)": 4}


def summary_markdown(c: Comparison) -> str:
    seeds = {arm: sorted({str(r.seed) for r in c.runs_of(arm)}) for arm in c.arms}
    lines = [f"# Sweep comparison: `{c.root}`", "",
             f"{len(c.runs)} runs in {len(c.arms)} arms; swept keys: "
             f"{', '.join(f'`{k}`' for k in c.keys) or 'none (one arm)'}; seeds are repeats of an arm.",
             f"Final loss = mean of the last {c.last_k} logged training losses of a run; tokens/s and step time = "
             "median over logged steps (first step and evaluation steps excluded). Each cell: mean ± sample std "
             "over the arm's runs.", "",
             "| arm | n | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for arm in c.arms:
        cells = []
        for name in METRICS:
            s = c.stats[arm][name]
            cells.append(f"{_fmt(s.mean, DIGITS[name])} ± {_fmt(s.std, DIGITS[name])}")
        lines.append(f"| {arm} | {c.stats[arm]['final loss'].n} | {' '.join(seeds[arm])} | " + " | ".join(cells) + " |")
    ranked = ranking(c, c.rank_by)
    if ranked:
        lines += ["", f"## Arms ranked by {c.rank_by} ({'lowest' if METRICS[c.rank_by][1] else 'highest'} first)", ""]
        lines += [f"{i}. `{arm}`: {_fmt(s.mean, DIGITS[c.rank_by])} ± {_fmt(s.std, DIGITS[c.rank_by])} (n={s.n})"
                  for i, (arm, s) in enumerate(ranked, start=1)]
    if c.diffs:
        lines += ["", f"## Differences vs `{c.baseline}`", "",
                  "Difference = arm − baseline (negative is lower). SE = sqrt(s_a²/n_a + s_b²/n_b); Welch's t with "
                  "Welch–Satterthwaite dof; 95% interval = diff ± t(0.975, dof)·SE; p two-sided. "
                  "— where an arm has fewer than 2 runs.", "",
                  "| metric | arm | diff | SE | t | dof | 95% interval | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in METRICS:
            dg = DIGITS[name]
            for arm, per_metric in c.diffs.items():
                d = per_metric[name]
                interval = f"[{_fmt(d.low, dg)}, {_fmt(d.high, dg)}]" if _finite(d.low) else "—"
                lines.append(f"| {name} | {arm} | {_fmt(d.diff, dg)} | {_fmt(d.se, dg)} | {_fmt(d.t, 2)} | "
                             f"{_fmt(d.dof, 1)} | {interval} | {_fmt(d.p, 3)} |")
    lines += ["", "## Runs", "", "| run | arm | seed | logged steps | last step |", "|---|---|---|---|---|"]
    for r in c.runs:
        steps, _ = r.column("loss")
        rel = r.path.relative_to(c.root) if r.path != c.root else Path(".")
        lines.append(f"| {rel} | {r.arm} | {r.seed} | {len(r.rows)} | {int(steps[-1]) if steps.size else '—'} |")
    return "\n".join(lines) + "\n"


def summary_dict(c: Comparison) -> dict:
    """Full-precision numbers of summary.md (NaN as null)."""
    def clean(x: Any) -> Any:
        return x if not isinstance(x, float) or math.isfinite(x) else None

    return {
        "root": str(c.root), "swept_keys": c.keys, "last_k": c.last_k, "baseline": c.baseline,
        "arms": {arm: {name: {"mean": clean(s.mean), "std": clean(s.std), "n": s.n, "values": s.values}
                       for name, s in c.stats[arm].items()} for arm in c.arms},
        "differences": {arm: {name: {k: clean(v) for k, v in vars(d).items()} for name, d in per.items()}
                        for arm, per in c.diffs.items()},
        "runs": [{"path": str(r.path), "arm": r.arm, "seed": r.seed} for r in c.runs],
    }


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg): one color per arm; each seed a thin line, the arm mean a thick one
# ----------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def arm_colors(c: Comparison) -> dict:
    cmap = _pyplot().get_cmap("tab10")
    return {arm: cmap(i % 10) for i, arm in enumerate(c.arms)}


def _mean_curve(curves: list) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds at the x values every seed logged (Hydra jobs of one arm log the same steps)."""
    if not curves:
        return np.empty(0), np.empty(0)
    common = set(curves[0][0].tolist())
    for x, _ in curves[1:]:
        common &= set(x.tolist())
    xs = np.asarray(sorted(common))
    if xs.size == 0:
        return xs, xs
    ys = [np.interp(xs, x, y) for x, y in curves]
    return xs, np.mean(ys, axis=0)


def _mean_curve_on_grid(curves: list, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds on a shared x grid (wall time differs from seed to seed), up to the shortest run."""
    curves = [(x, y) for x, y in curves if x.size]
    if not curves:
        return np.empty(0), np.empty(0)
    lo = max(x[0] for x, _ in curves)
    hi = min(x[-1] for x, _ in curves)
    if hi <= lo:
        return np.empty(0), np.empty(0)
    xs = np.linspace(lo, hi, points)
    return xs, np.mean([np.interp(xs, x, y) for x, y in curves], axis=0)


def _x_wall_time(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["wall_time_s"], r[key]) for r in run.rows if _finite(r.get(key)) and _finite(r.get("wall_time_s"))]
    if not pairs:
        return np.empty(0), np.empty(0)
    x, y = zip(*pairs)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _curves(c: Comparison, ax, key: str, colors: dict, x: str = "step", markers: bool = False) -> bool:
    drew = False
    for arm in c.arms:
        curves = [(r.column(key) if x == "step" else _x_wall_time(r, key)) for r in c.runs_of(arm)]
        curves = [(cx, cy) for cx, cy in curves if cx.size]
        for cx, cy in curves:
            ax.plot(cx, cy, color=colors[arm], lw=0.8, alpha=0.35, marker="o" if markers else None, ms=3)
        mx, my = (_mean_curve(curves) if x == "step" else _mean_curve_on_grid(curves))
        if mx.size:
            ax.plot(mx, my, color=colors[arm], lw=2.4, marker="o" if markers else None, ms=5,
                    label=f"{arm} (n={len(curves)})")
            drew = True
        elif curves:
            ax.plot([], [], color=colors[arm], lw=2.4, label=f"{arm} (n={len(curves)})")
            drew = True
    return drew


def _zoom_to_tail(ax, c: Comparison, key: str) -> None:
    """Zoom the y axis on the second half of training, where the arms differ by little."""
    tail = []
    for r in c.runs:
        s, v = r.column(key)
        if s.size:
            tail.extend(v[s >= s.min() + 0.5 * (s.max() - s.min())].tolist())
    if tail:
        lo, hi = min(tail), max(tail)
        pad = 0.05 * (hi - lo) or 0.01 * abs(hi) or 0.01
        ax.set_ylim(lo - pad, hi + pad)
        s_max = max(r.column(key)[0].max() for r in c.runs if r.column(key)[0].size)
        s_min = min(r.column(key)[0].min() for r in c.runs if r.column(key)[0].size)
        ax.set_xlim(s_min + 0.5 * (s_max - s_min), s_max)


def _finish(fig, title: str):
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_loss_vs_step(c: Comparison):
    plt, colors = _pyplot(), arm_colors(c)
    fig, (ax_all, ax_tail) = plt.subplots(1, 2, figsize=(13, 4.8))
    _curves(c, ax_all, "loss", colors)
    _curves(c, ax_tail, "loss", colors)
    _zoom_to_tail(ax_tail, c, "loss")
    for ax, title in ((ax_all, "all steps"), (ax_tail, "second half (zoomed)")):
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_all.legend(fontsize=8)
    return _finish(fig, "Training loss vs step (thin: seeds, thick: mean over seeds)")


def plot_loss_vs_wall_time(c: Comparison):
    plt, colors = _pyplot(), arm_colors(c)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    _curves(c, ax, "loss", colors, x="wall_time")
    ax.set_xlabel("wall time since training start (s)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, "Training loss vs wall time (thin: seeds, thick: mean over seeds)")


def plot_eval_loss(c: Comparison, key: str = "eval_loss", label: str = "eval loss (held-out, nats/token)"):
    plt, colors = _pyplot(), arm_colors(c)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    if not _curves(c, ax, key, colors, markers=True):
        ax.text(0.5, 0.5, f"no {key} logged (train.eval_every=0?)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    return _finish(fig, f"{label} vs step (thin: seeds, thick: mean over seeds)")


def plot_eval_bpb(c: Comparison):
    return plot_eval_loss(c, "eval_bpb", "eval bits per byte (held-out)")


def plot_step_time_breakdown(c: Comparison):
    """Stacked bars: median step time per run split into its parts, averaged over the arm's seeds."""
    plt = _pyplot()
    parts = list(step_time_breakdown(c.runs[0]).keys())
    part_colors = dict(zip(parts, ("#9ecae1", "#e6550d", "#756bb1", "#fdae6b", "#bdbdbd")))
    fig, ax = plt.subplots(figsize=(max(9.0, 1.6 * len(c.arms) + 3), 5.2))
    x = np.arange(len(c.arms))
    bottom = np.zeros(len(c.arms))
    for part in parts:
        ms = []
        for arm in c.arms:
            vals = [step_time_breakdown(r)[part] for r in c.runs_of(arm)]
            vals = [v for v in vals if _finite(v)]
            ms.append(1e3 * float(np.mean(vals)) if vals else 0.0)
        ax.bar(x, ms, bottom=bottom, color=part_colors[part], label=part, width=0.6, edgecolor="white")
        bottom += np.asarray(ms)
    totals = [c.stats[arm]["step time (s)"] for arm in c.arms]
    ax.errorbar(x, [1e3 * s.mean for s in totals], yerr=[1e3 * (s.std if _finite(s.std) else 0.0) for s in totals],
                fmt="none", ecolor="black", capsize=4, label="step time: mean ± std over seeds")
    ax.set_xticks(x, [_wrap(a) for a in c.arms], fontsize=8)
    ax.set_xlabel("arm")
    ax.set_ylabel("median time per step (ms)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _finish(fig, "Step-time breakdown per arm\n(medians per run, mean over seeds; Newton-Schulz and "
                        "communication from the optimizer's timers)")


def plot_tokens_per_s(c: Comparison):
    plt, colors = _pyplot(), arm_colors(c)
    fig, (ax_line, ax_bar) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    for arm in c.arms:
        curves = []
        for r in c.runs_of(arm):
            steps, tps = r.column("tokens_per_s", _steady_rows(r, skip_eval=True))
            if steps.size:
                ax_line.plot(steps, tps, color=colors[arm], lw=0.8, alpha=0.35)
                curves.append((steps, tps))
        mx, my = _mean_curve(curves)
        ax_line.plot(mx, my, color=colors[arm], lw=2.4, label=f"{arm} (n={len(curves)})")
    ax_line.set_xlabel("step")
    ax_line.set_ylabel("tokens/s (all ranks)")
    ax_line.set_title("per logged step (first and evaluation steps excluded)")
    ax_line.grid(alpha=0.3)
    ax_line.legend(fontsize=8)
    x = np.arange(len(c.arms))
    for i, arm in enumerate(c.arms):
        s = c.stats[arm]["tokens/s"]
        ax_bar.bar(i, s.mean if _finite(s.mean) else 0.0, color=colors[arm], width=0.6, alpha=0.8,
                   yerr=s.std if _finite(s.std) else 0.0, capsize=4)
        ax_bar.scatter([i] * len(s.values), s.values, color="black", s=12, zorder=3)
    ax_bar.set_xticks(x, [_wrap(a) for a in c.arms], fontsize=8)
    ax_bar.set_xlabel("arm")
    ax_bar.set_ylabel("median tokens/s")
    ax_bar.set_title("per run (dots) and arm mean ± std")
    ax_bar.grid(alpha=0.3, axis="y")
    return _finish(fig, "Throughput")


def plot_metric(c: Comparison, key: str, x: str = "step"):
    """Any logged column (`grad_norm`, `lr`, `optim_ns_s`, `expert_load_max_over_mean`, ...) against step or
    wall time, in the same style; for exploring a sweep in the notebook."""
    if x not in ("step", "wall_time"):
        raise ValueError(f"x={x!r}: must be step or wall_time")
    plt, colors = _pyplot(), arm_colors(c)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    if not _curves(c, ax, key, colors, x=x):
        known = sorted({k for r in c.runs for row in r.rows for k in row})
        raise ValueError(f"key={key!r}: no run logged it; logged keys: {', '.join(known)}")
    ax.set_xlabel("step" if x == "step" else "wall time since training start (s)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, f"{key} (thin: seeds, thick: mean over seeds)")


def _wrap(label: str, width: int = 22) -> str:
    return "\n".join(label.split(",")) if len(label) > width else label


def write_report(c: Comparison, out: Path) -> list[Path]:
    """Write the six PNGs, summary.md and summary.json into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = dict(zip(PLOTS, (plot_loss_vs_step, plot_loss_vs_wall_time, plot_eval_loss, plot_eval_bpb,
                             plot_step_time_breakdown, plot_tokens_per_s)))
    written = []
    for name, fn in plots.items():
        fig = fn(c)
        fig.savefig(out / name, dpi=110)
        _pyplot().close(fig)
        written.append(out / name)
    (out / "summary.md").write_text(summary_markdown(c))
    (out / "summary.json").write_text(json.dumps(summary_dict(c), indent=1))
    return written + [out / "summary.md", out / "summary.json"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", help="a Hydra multirun dir (outputs/multirun/<date>/<time>) or any dir of runs")
    ap.add_argument("--out", default=None, help="where to write the PNGs and summary.md (default: the sweep dir)")
    ap.add_argument("--last-k", type=int, default=5, help="final loss = mean of the last k logged losses (default 5)")
    ap.add_argument("--baseline", default=None, help="the arm differences are taken against (default: the first)")
    ap.add_argument("--rank-by", default="final eval bpb", choices=list(METRICS),
                    help="the metric the arms are ranked by in summary.md (default: final eval bpb)")
    ap.add_argument("--best-overrides", action="store_true",
                    help="print only the best arm's overrides (`key=value ...`, one line) and write nothing")
    args = ap.parse_args(argv)
    try:
        c = compare(args.sweep_dir, last_k=args.last_k, baseline=args.baseline, rank_by=args.rank_by)
        if args.best_overrides:
            print(" ".join(best_overrides(c)))
            return 0
    except (NoRunsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.sweep_dir)
    written = write_report(c, out)
    print(summary_markdown(c))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
