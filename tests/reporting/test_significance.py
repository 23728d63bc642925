"""The intervals that say which differences are real, checked against scipy.stats and hand-worked cases, and the
report's words built from them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from lorafair.federated.state import decode_items, encode_items
from lorafair.reporting.report import report
from lorafair.reporting.significance import paired_bootstrap_interval, paired_t_interval


def test_t_interval_of_a_hand_worked_case():
    """Differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 df) = 4.302653 (tables), half-width 4.302653 / sqrt(3)."""
    interval = paired_t_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert (interval.difference, interval.pairs, interval.how) == (2.0, 3, "t")
    assert interval.low == pytest.approx(2 - half, abs=1e-5) and interval.high == pytest.approx(2 + half, abs=1e-5)
    assert not interval.excludes_zero  # 2 - 2.48 < 0


@pytest.mark.parametrize("differences", [[0.4, 1.1, 0.9, 1.5], [-2.0, -1.5], [3.0, -1.0, 0.5, 2.5, 1.0]])
def test_t_interval_equals_scipys(differences):
    low, high = stats.t.interval(0.95, len(differences) - 1, loc=np.mean(differences), scale=stats.sem(differences))
    interval = paired_t_interval(differences)
    assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-9)
    assert interval.excludes_zero == (low > 0 or high < 0)


def test_t_interval_needs_two_pairs():
    with pytest.raises(ValueError, match="two or more"):
        paired_t_interval([1.0])


def test_bootstrap_interval_agrees_with_scipys_percentile_bootstrap():
    """One domain of 400 items, the method right on 30 more of them: scipy's paired percentile bootstrap of the mean
    difference (its own random stream) gives the same interval to within resampling noise."""
    generator = torch.Generator().manual_seed(1)
    baseline = (torch.rand(400, generator=generator) < 0.6).double()
    method = baseline.clone()
    method[torch.nonzero(baseline == 0).flatten()[:45]] = 1
    method[torch.nonzero(baseline == 1).flatten()[:15]] = 0
    ours = paired_bootstrap_interval([(100 * method, 100 * baseline)], samples=20000)
    theirs = stats.bootstrap(((100 * (method - baseline)).numpy(),), np.mean, n_resamples=20000, method="percentile",
                             random_state=0).confidence_interval
    assert ours.difference == pytest.approx(7.5)
    assert ours.low == pytest.approx(theirs.low, abs=0.4) and ours.high == pytest.approx(theirs.high, abs=0.4)
    assert ours.excludes_zero


def test_bootstrap_of_hand_worked_extremes():
    """Identical scores: a difference of exactly 0 and an interval of width 0, not significant. All right against all
    wrong in one domain and identical in the other: the average over the two domains differs by 50 at every
    resample."""
    same = torch.tensor([1.0, 0.0, 1.0, 1.0])
    interval = paired_bootstrap_interval([(same, same.clone())])
    assert (interval.difference, interval.low, interval.high, interval.excludes_zero) == (0.0, 0.0, 0.0, False)
    extreme = paired_bootstrap_interval([(torch.full((5,), 100.0), torch.zeros(5)), (same, same.clone())])
    assert (extreme.difference, extreme.low, extreme.high) == pytest.approx((50.0, 50.0, 50.0))


def test_bootstrap_refuses_unpaired_items():
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap_interval([(torch.ones(3), torch.ones(4))])


def test_item_scores_round_trip_through_their_hex_form():
    assert encode_items(torch.tensor([1.0, 0, 1, 1, 0, 0, 0, 0, 1])) == "9:b080"  # 10110000 1(0000000)
    vector = (torch.rand(2001, generator=torch.Generator().manual_seed(0)) < 0.5).double()
    assert torch.equal(decode_items(encode_items(vector)), vector)
    assert encode_items(torch.tensor([1.0, float("nan")])) is None  # an item that was not scored


def _results(method: str, seed: int, start: dict[str, float], final: dict[str, float],
             items: dict[str, list[int]] | None = None) -> dict:
    """A finished run's results.json with the given scores (fractions)."""
    def entry(accuracy):
        return {"accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / len(accuracy)}

    final_entry = {"round": 1, **entry(final)}
    if items is not None:
        final_entry["correct_items"] = {d: [encode_items(torch.tensor(v, dtype=torch.float64))]
                                        for d, v in items.items()}
    record = {"round": 1, "bytes_up": 10, "bytes_down": 10, **final_entry}
    return {"method": method, "seed": seed, "config": {"seed": seed, "server": {"method": method}},
            "rounds": [record], "final": final_entry, "start": {"round": 0, **entry(start)}}


def _write(folder, results):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))


def test_report_shows_start_gain_and_the_significant_differences_over_seeds(tmp_path):
    """Three seeds; LoRA-FAIR beats FedIT by 2, 3, 4 points (t interval [0.52, 5.48]: significant), FLoRA differs by
    +1, -1, +1 (interval holds 0), the local bound is below by 10 every seed (std 0: an interval of width 0)."""
    start = {"a": 0.1, "b": 0.3}
    for seed, (fedit, lorafair, flora, local) in enumerate([(0.5, 0.52, 0.51, 0.4), (0.6, 0.63, 0.59, 0.5),
                                                            (0.55, 0.59, 0.56, 0.45)]):
        for method, score in (("fedit", fedit), ("lorafair", lorafair), ("flora", flora), ("local", local)):
            _write(tmp_path / method / f"seed{seed}", _results(method, seed, start, {"a": score, "b": score}))
    report(tmp_path)
    table = (tmp_path / "comparison.md").read_text()
    assert "| Start (round 0, %) | 10.00 ± 0.00 | 30.00 ± 0.00 | 20.00 ± 0.00 |" in table
    assert "| FedIT | +45.00 ± 5.00 | +25.00 ± 5.00 | +35.00 ± 5.00 |" in table  # average gains 35, 45, 40
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert f"| LoRA-FAIR | +3.00 | [{3 - half:+.2f}, {3 + half:+.2f}] | yes |" in table
    assert "| FLoRA | +0.33 |" in table and "| FLoRA | +0.33 | [-2.54, +3.20] | no |" in table
    assert "| Local (bound) | -10.00 | [-10.00, -10.00] | yes |" in table
    assert ("Significantly above FedIT: LoRA-FAIR. Significantly below: Local (bound). Not separated from it (the "
            "interval holds 0): FLoRA.") in table
    assert "Best method (LoRA-FAIR) against the weakest (FedIT)" in table
    header = (tmp_path / "comparison.csv").read_text().splitlines()[0].split(",")
    assert {"average_start_mean", "average_gain_mean", "vs_fedit_difference", "vs_fedit_low"} <= set(header)


def test_report_with_one_seed_pairs_the_test_items(tmp_path):
    """One seed: the interval comes from the items both methods were scored on; a method right on exactly the same
    items as FedIT differs by 0 with an interval [0, 0]."""
    items = {"a": [1, 0, 1, 0] * 25, "b": [1, 1, 0, 0] * 25}
    better = {"a": [1, 1, 1, 0] * 25, "b": [1, 1, 1, 0] * 25}
    _write(tmp_path / "fedit" / "seed0", _results("fedit", 0, {"a": 0.1, "b": 0.1}, {"a": 0.5, "b": 0.5}, items))
    _write(tmp_path / "flora" / "seed0", _results("flora", 0, {"a": 0.1, "b": 0.1}, {"a": 0.5, "b": 0.5}, items))
    _write(tmp_path / "lorafair" / "seed0", _results("lorafair", 0, {"a": 0.1, "b": 0.1}, {"a": 0.75, "b": 0.75},
                                                     better))
    report(tmp_path)
    table = (tmp_path / "comparison.md").read_text()
    assert "| FLoRA | +0.00 | [+0.00, +0.00] | no |" in table
    assert "| LoRA-FAIR | +25.00 |" in table and "percentile bootstrap over the test items" in table
    assert "Significantly above FedIT: LoRA-FAIR." in table
