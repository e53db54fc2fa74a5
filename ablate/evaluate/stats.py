"""Statistics for evaluation figures: Wilson intervals for rates, percentile-bootstrap intervals for
means and for the difference between two variants, the exact McNemar test, and Cohen's kappa for judge
agreement — computed by scipy and scikit-learn, behind small wrappers that fix our conventions (empty
samples, bounds at k = 0 and k = n, the seeded resampling).

Every metric is reported as `{"value", "ci": [low, high], "n", "method"}` so a reader always sees
how many items a figure rests on and how wide its interval is.

    from ablate.evaluate.stats import wilson_interval, compare
    wilson_interval(8, 10)                                  # (0.490, 0.943)
    compare("runs/x/eval/base.json", "runs/x/eval/ablated.json", "refusal_rate")
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from ablate import AblateError


def z_value(confidence: float = 0.95) -> float:
    """Two-sided normal quantile: 1.95996… for 95 %."""
    return float(stats.norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n.

    centre = (p̂ + z²/2n) / (1 + z²/n),  half-width = z √(p̂(1−p̂)/n + z²/4n²) / (1 + z²/n).
    Unlike p̂ ± z·se it stays inside [0, 1] and is not degenerate at k = 0 or k = n.
    Returns (nan, nan) for n = 0. (scipy.stats.binomtest(...).proportion_ci(method="wilson").)
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n]; got {successes} of {n}")
    interval = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    # At k = 0 (k = n) the bound is exactly 0 (1); rounding would leave ~1e-17.
    low = 0.0 if successes == 0 else max(0.0, float(interval.low))
    high = 1.0 if successes == n else min(1.0, float(interval.high))
    return (low, high)


def rate_metric(successes: int, n: int, confidence: float = 0.95) -> dict:
    """A rate with its Wilson interval: {"value", "ci", "n", "method": "wilson", "k"}."""
    if n == 0:  # JSON has no NaN: an empty sample gives nulls
        return {"value": None, "ci": [None, None], "n": 0, "k": 0, "method": "wilson"}
    low, high = wilson_interval(successes, n, confidence)
    return {"value": successes / n, "ci": [low, high], "n": n, "k": successes, "method": "wilson"}


def bootstrap_interval(
    values, samples: int = 2000, confidence: float = 0.95, seed: int = 0, statistic=np.mean
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (default the mean) over `values`, resampling its rows
    (a row may hold several measurements of one item, kept together: a paired bootstrap).
    scipy.stats.bootstrap, `samples` resamples drawn by numpy's generator seeded with `seed`."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    if len(values) < 2:  # every resample is the one row (scipy asks for two)
        value = float(statistic(values[None], axis=1)[0])
        return (value, value)
    rows = np.arange(len(values))
    with warnings.catch_warnings():  # identical values: every resample agrees, and the interval is that value
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((rows,), lambda picked, axis: statistic(values[picked], axis=axis), n_resamples=samples,
                                 confidence_level=confidence, method="percentile", vectorized=True,
                                 rng=np.random.default_rng(seed))
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def mean_metric(values, samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """A mean with its percentile-bootstrap interval: {"value", "ci", "n", "method": "bootstrap"}."""
    values = np.asarray(values, dtype=np.float64)
    if values.size and not np.all(np.isfinite(values)):
        raise AblateError(f"non-finite values in a metric ({int((~np.isfinite(values)).sum())} of {values.size})")
    if values.size == 0:  # JSON has no NaN: an empty sample gives nulls
        return {"value": None, "ci": [None, None], "n": 0, "method": "bootstrap"}
    low, high = bootstrap_interval(values, samples, confidence, seed)
    return {"value": float(values.mean()), "ci": [low, high], "n": int(values.size), "method": "bootstrap"}


def bootstrap_relative_change(
    before, after, samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of mean(after) / mean(before) − 1, where before[i] and after[i]
    are one item measured twice (e.g. a prompt's cross-entropy before and after training): items are
    resampled with their pairs kept together."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.size == 0:
        raise AblateError(f"a relative change needs paired, non-empty values; got {before.size} before and {after.size} after")

    def relative_change(pairs, axis):
        return pairs[..., 1].mean(axis=axis) / pairs[..., 0].mean(axis=axis) - 1

    return bootstrap_interval(np.column_stack([before, after]), samples, confidence, seed, statistic=relative_change)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test for paired binary outcomes: `only_a` items positive under A alone, `only_b`
    under B alone (the discordant pairs). p = min(1, 2 · P(X ≤ min)) for X ~ Binomial(only_a + only_b, ½);
    1.0 when there is no discordant pair. (scipy.stats.binomtest.)"""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be ≥ 0; got {only_a} and {only_b}")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return float(stats.binomtest(k, n, 0.5).pvalue)


def bootstrap_difference(
    a: dict[str, float], b: dict[str, float], samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Interval for mean(b) − mean(a) from per-item values keyed by item id.

    When the two variants scored the same items (the usual case: same suite, same seed), the
    bootstrap resamples item ids and keeps each item's pair together — the paired design removes
    the between-prompt variance both variants share. Otherwise each side is resampled on its own.
    """
    shared = sorted(set(a) & set(b))
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    if shared and len(shared) == len(a) == len(b):
        differences = np.array([b[key] - a[key] for key in shared], dtype=np.float64)
        indices = rng.integers(0, differences.size, size=(samples, differences.size))
        replicates = differences[indices].mean(axis=1)
        value, method, n = float(differences.mean()), "paired bootstrap", len(shared)
    else:
        values_a = np.array(list(a.values()), dtype=np.float64)
        values_b = np.array(list(b.values()), dtype=np.float64)
        if values_a.size == 0 or values_b.size == 0:
            raise AblateError("cannot compare: one of the variants has no per-item values for this metric")
        replicates = (
            values_b[rng.integers(0, values_b.size, size=(samples, values_b.size))].mean(axis=1)
            - values_a[rng.integers(0, values_a.size, size=(samples, values_a.size))].mean(axis=1)
        )
        value, method, n = float(values_b.mean() - values_a.mean()), "unpaired bootstrap", min(values_a.size, values_b.size)
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return {"value": value, "ci": [float(low), float(high)], "n": int(n), "method": method}


def _load_eval(source: dict | str | Path) -> dict:
    if isinstance(source, dict):
        return source
    from ablate.artifacts import read_json

    path = Path(source)
    if not path.exists():
        raise AblateError(f"eval result not found: {path}")
    return read_json(path)


def compare(
    a_json: dict | str | Path,
    b_json: dict | str | Path,
    metric: str,
    *,
    samples: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Difference b − a of one metric between two eval results, with a bootstrap interval.

    `a_json`/`b_json` are eval dicts (as `run_eval` returns) or paths to eval/<variant>.json.
    Returns {"metric", "a", "b", "a_value", "b_value", "value": b − a, "ci", "n", "method"}; an
    interval that excludes 0 means the variants differ at that confidence.
    """
    a, b = _load_eval(a_json), _load_eval(b_json)
    for side, result in (("a", a), ("b", b)):
        if metric not in result.get("metrics", {}):
            known = ", ".join(sorted(result.get("metrics", {})))
            raise AblateError(f"metric '{metric}' not in eval result {side} ({result.get('variant')}); it has: {known}")
        if metric not in result.get("per_item", {}):
            raise AblateError(f"metric '{metric}' has no per-item values in eval result {side} ({result.get('variant')}); cannot bootstrap a difference")
    samples = samples or int(a.get("bootstrap_samples", 2000))
    difference = bootstrap_difference(a["per_item"][metric], b["per_item"][metric], samples, confidence, seed)
    return {
        "metric": metric,
        "a": a.get("variant"),
        "b": b.get("variant"),
        "a_value": a["metrics"][metric]["value"],
        "b_value": b["metrics"][metric]["value"],
        **difference,
    }


def cohen_kappa(first: list, second: list) -> float:
    """Cohen's kappa between two raters' labels on the same items: (p_o − p_e) / (1 − p_e).

    p_o is the observed agreement, p_e the agreement expected by chance from each rater's label
    frequencies. 1 = perfect agreement, 0 = chance level. When both raters give one and the same
    label to everything (p_e = 1), kappa is defined here as 1.0 (they agree perfectly).
    (sklearn.metrics.cohen_kappa_score.)
    """
    from sklearn.metrics import cohen_kappa_score

    if len(first) != len(second):
        raise ValueError("both raters must label the same items")
    if not first:
        return math.nan
    if len(set(first) | set(second)) == 1:  # p_e = 1: scikit-learn's 0/0
        return 1.0
    return float(cohen_kappa_score([str(x) for x in first], [str(x) for x in second]))
