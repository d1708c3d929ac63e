"""Agreement statistics against published worked examples and hand-computed values."""

from __future__ import annotations

import math

import pytest

from moss_rlhf.feedback.agreement import (cohen_kappa, cohen_kappa_table, fleiss_kappa, fleiss_kappa_from_labels,
                                          gold_agreement, krippendorff_alpha, leave_one_out_agreement,
                                          project_agreement)
from moss_rlhf.feedback.store import CandidateView, ItemRecord, JudgementRecord


def test_cohen_kappa_textbook_2x2():
    # Wikipedia "Cohen's kappa", worked example: 50 proposals, both yes 20, A yes/B no 5, A no/B yes 10, both no 15.
    # p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4.
    assert cohen_kappa_table([[20, 5], [10, 15]]) == pytest.approx(0.4)
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_edge_cases():
    assert cohen_kappa([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert cohen_kappa([1, 2], [2, 1]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa(["a", "a"], ["a", "a"]))  # no variation: undefined
    with pytest.raises(ValueError):
        cohen_kappa([1], [1, 2])


def test_fleiss_kappa_wikipedia_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories; P-bar = 0.378, P_e = 0.213,
    # kappa = 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-5)
    labels = [[c for c, n in enumerate(row) for _ in range(n)] for row in table]
    assert fleiss_kappa_from_labels(labels) == pytest.approx(fleiss_kappa(table))
    with pytest.raises(ValueError):
        fleiss_kappa([[1, 1], [2, 1]])


def test_fleiss_equals_hand_computation_small():
    # 3 items, 3 raters, 2 categories: rows [3,0], [2,1], [0,3].
    # P_i = 1, 1/3, 1 -> P-bar = 7/9; p = (5/9, 4/9) -> P_e = 41/81; kappa = (7/9 - 41/81) / (40/81) = 22/40.
    assert fleiss_kappa([[3, 0], [2, 1], [0, 3]]) == pytest.approx(22 / 40)


def test_krippendorff_alpha_paper_example_with_missing_values():
    # Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011), 4 observers x 12 units, nominal data with
    # missing values: alpha = 0.743; the same data as interval values: alpha = 0.849.
    n = None
    observers = [[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
                 [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
                 [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
                 [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]]
    units = [list(u) for u in zip(*observers)]
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, level="interval") == pytest.approx(0.849, abs=5e-4)
    assert krippendorff_alpha({i: u for i, u in enumerate(units)}) == pytest.approx(krippendorff_alpha(units))


def test_krippendorff_two_coders_no_missing_close_to_kappa():
    # Two coders, no missing data: alpha = 1 - (n-1) D_o / D_e, a small-sample correction of Scott's pi.
    a = ["x", "x", "y", "y", "x", "y"]
    b = ["x", "y", "y", "y", "x", "x"]
    units = [[p, q] for p, q in zip(a, b)]
    # hand: o_xy = o_yx = 2, n = 12, n_x = n_y = 6 -> alpha = 1 - 11 * 4 / (2 * 36) = 1 - 44/72
    assert krippendorff_alpha(units) == pytest.approx(1 - 44 / 72)
    assert math.isnan(krippendorff_alpha([[1, 1], [1, 1]]))


def test_leave_one_out_and_gold():
    labels = {
        1: {"ann": "0", "bob": "0", "cy": "1"},
        2: {"ann": "1", "bob": "1", "cy": "1"},
        3: {"ann": "0", "bob": "1"},          # two annotators: each is compared with the other one
        4: {"ann": "tie", "bob": "0", "cy": "1"},  # every annotator's two others disagree: nobody counts here
        5: {"ann": "0", "bob": "0", "cy": "0", "dee": "1"},
    }
    loo = leave_one_out_agreement(labels)
    # ann: item 1 others 0/1 split (skipped), 2 agree, 3 disagree, 4 skipped, 5 others 0,0,1 -> 0 agree
    assert (loo["ann"].agree, loo["ann"].total) == (2, 3)
    assert (loo["bob"].agree, loo["bob"].total) == (2, 3)
    # cy: item 1 others 0,0 -> disagree; 2 agree; 4 skipped; 5 agree
    assert (loo["cy"].agree, loo["cy"].total) == (2, 3)
    assert (loo["dee"].agree, loo["dee"].total) == (0, 1)
    gold = gold_agreement(labels, {1: "0", 2: "0"})
    assert (gold["ann"].agree, gold["ann"].total, gold["cy"].agree) == (1, 2, 0)


def _item(item_id, n=2, gold=None):
    return ItemRecord(item_id, 1, "pairwise" if n == 2 else "ranking", [{"role": "user", "content": "q"}],
                      [CandidateView(item_id * 10 + p, p, f"r{p}") for p in range(n)], gold, {})


def _j(jid, annotator, item, choice=None, preferred=None, ranking=None, ratings=None, retracted=False):
    return JudgementRecord(jid, f"s{jid}", hash(annotator) % 100, annotator, item.id, 1, item.task_type, choice, None,
                           preferred, ratings, ranking, "", "", [c.id for c in item.candidates], 1000, "1", "",
                           retracted)


def test_project_agreement_from_judgements():
    items = [_item(1), _item(2), _item(3, gold=0), _item(4, n=3)]
    i1, i2, i3, i4 = items
    js = [_j(1, "a", i1, "A", 10), _j(2, "b", i1, "A", 10),
          _j(3, "a", i2, "B", 21), _j(4, "b", i2, "tie"),
          _j(5, "a", i3, "A", 30), _j(6, "b", i3, "B", 31),
          _j(7, "a", i4, ranking=[42, 40]), _j(8, "b", i4, ratings={40: 2, 41: 3, 42: 6}),
          _j(9, "b", i2, "B", 21, retracted=True)]
    report = project_agreement(items, js, min_shared=2)
    # labels a: 0, 1, 0, 2 ; b: 0, tie, 1, 2 -> agree on 2 of 4
    assert report.judged_items == 4 and report.judgements == 8 and report.raters_per_item == 2
    assert (report.consensus["a"].agree, report.consensus["a"].total) == (2, 4)
    assert (report.gold["a"].agree, report.gold["b"].agree) == (1, 0)
    expected = cohen_kappa(["0", "1", "0", "2"], ["0", "tie", "1", "2"])
    assert report.mean_cohen_kappa == pytest.approx(expected)
    assert report.fleiss_items == 4
    json_ready = report.to_json()
    assert json_ready["consensus"]["a"]["rate"] == 0.5
