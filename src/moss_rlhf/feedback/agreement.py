"""Inter-annotator agreement: pure functions over plain labels, and one summary over a project's judgements.

- :func:`cohen_kappa`: two raters who labelled the same items (or :func:`cohen_kappa_table` on their confusion table);
- :func:`fleiss_kappa`: a fixed number of raters per item (rows: items, columns: category counts);
- :func:`krippendorff_alpha`: any number of raters, missing labels allowed (nominal or interval distance);
- :func:`leave_one_out_agreement`: each annotator against the majority label of the *other* annotators of an item;
- :func:`gold_agreement`: each annotator against the known answers of gold (honeypot) items.

A statistic that is undefined (no variation in the labels, too few overlaps) is ``nan``.

To compare judgements of different task types on one nominal scale, :func:`judgement_label` reduces a judgement to
the *stored position* of the response the annotator put first ("0", "1", ...), or "tie" / "both_bad". Positions are
the order the item's responses were stored in, not the randomised order each annotator saw.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

NAN = float("nan")


def cohen_kappa_table(table: Sequence[Sequence[float]]) -> float:
    """Cohen's kappa from a square confusion table ``table[i][j]``: items rater 1 put in i and rater 2 in j."""
    k = len(table)
    if k == 0 or any(len(row) != k for row in table):
        raise ValueError("expected a square table")
    n = sum(sum(row) for row in table)
    if n == 0:
        return NAN
    observed = sum(table[i][i] for i in range(k)) / n
    expected = sum(sum(table[i]) * sum(table[r][i] for r in range(k)) for i in range(k)) / (n * n)
    return NAN if expected == 1 else (observed - expected) / (1 - expected)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels for the same items (``a[i]`` and ``b[i]`` label item i)."""
    if len(a) != len(b):
        raise ValueError("both raters must label the same items")
    categories = sorted(set(a) | set(b), key=repr)
    index = {c: i for i, c in enumerate(categories)}
    table = [[0] * len(categories) for _ in categories]
    for x, y in zip(a, b):
        table[index[x]][index[y]] += 1
    return cohen_kappa_table(table)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa. ``counts[i][j]``: raters who put item i in category j; every row sums to the same n ≥ 2."""
    if not counts:
        return NAN
    n = sum(counts[0])
    if n < 2 or any(sum(row) != n for row in counts):
        raise ValueError("Fleiss' kappa needs the same number (≥ 2) of ratings for every item")
    items = len(counts)
    p_items = [(sum(c * c for c in row) - n) / (n * (n - 1)) for row in counts]
    p_bar = sum(p_items) / items
    columns = len(counts[0])
    p_cat = [sum(row[j] for row in counts) / (items * n) for j in range(columns)]
    p_e = sum(p * p for p in p_cat)
    return NAN if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def fleiss_kappa_from_labels(labels_per_item: Sequence[Sequence[Hashable]]) -> float:
    """Fleiss' kappa from each item's list of labels (all lists of the same length)."""
    categories = sorted({x for labels in labels_per_item for x in labels}, key=repr)
    return fleiss_kappa([[Counter(labels)[c] for c in categories] for labels in labels_per_item])


def _interval(a, b) -> float:
    return (float(a) - float(b)) ** 2


def _nominal(a, b) -> float:
    return 0.0 if a == b else 1.0


def krippendorff_alpha(units: Sequence[Sequence[Hashable | None]] | Mapping[Hashable, Sequence[Hashable | None]],
                       level: str = "nominal") -> float:
    """Krippendorff's alpha. ``units``: for every unit (item), the values its coders gave (``None``: missing);
    units with fewer than two values are not pairable and are ignored. ``level``: "nominal" or "interval"."""
    delta = {"nominal": _nominal, "interval": _interval}.get(level)
    if delta is None:
        raise ValueError("level must be 'nominal' or 'interval'")
    values_per_unit = units.values() if isinstance(units, Mapping) else units
    coincidences: dict[tuple, float] = defaultdict(float)
    for values in values_per_unit:
        present = [v for v in values if v is not None]
        m = len(present)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            coincidences[(present[i], present[j])] += 1 / (m - 1)
    totals: dict[Hashable, float] = defaultdict(float)
    for (c, _), o in coincidences.items():
        totals[c] += o
    n = sum(totals.values())
    if n <= 1:
        return NAN
    observed = sum(o * delta(c, k) for (c, k), o in coincidences.items())
    expected = sum(totals[c] * totals[k] * delta(c, k) for c in totals for k in totals) / (n - 1)
    return NAN if expected == 0 else 1 - observed / expected


@dataclass(frozen=True)
class Agreement:
    agree: int
    total: int

    @property
    def rate(self) -> float:
        return self.agree / self.total if self.total else NAN


def _majority(labels: Sequence[Hashable]) -> Hashable | None:
    """The most frequent label, or None when two labels share the top count."""
    counts = Counter(labels).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def leave_one_out_agreement(labels: Mapping[Hashable, Mapping[Hashable, Hashable]]) -> dict[Hashable, Agreement]:
    """``labels[item][annotator]``. For every annotator: on how many items their label equals the majority label of
    the other annotators of that item (items without another annotator, or where the others are split evenly,
    do not count)."""
    agree: Counter = Counter()
    total: Counter = Counter()
    for by_annotator in labels.values():
        for annotator, label in by_annotator.items():
            majority = _majority([v for a, v in by_annotator.items() if a != annotator])
            if majority is None:
                continue
            total[annotator] += 1
            agree[annotator] += label == majority
    annotators = {a for by_annotator in labels.values() for a in by_annotator}
    return {a: Agreement(agree[a], total[a]) for a in sorted(annotators, key=repr)}


def gold_agreement(labels: Mapping[Hashable, Mapping[Hashable, Hashable]],
                   gold: Mapping[Hashable, Hashable]) -> dict[Hashable, Agreement]:
    """For every annotator: how many of the gold items they labelled they got right."""
    agree: Counter = Counter()
    total: Counter = Counter()
    for item, answer in gold.items():
        for annotator, label in labels.get(item, {}).items():
            total[annotator] += 1
            agree[annotator] += label == answer
    return {a: Agreement(agree[a], total[a]) for a in sorted(total, key=repr)}


# --------------------------------------------------------------------------------------------------------------------
# Judgements → labels → a project summary


def judgement_label(judgement, item) -> str | None:
    """A judgement on the nominal scale used for agreement: the stored position of the response ranked first
    ("0", "1", ...), "tie", or "both_bad". ``judgement`` and ``item`` are a store ``JudgementRecord`` and
    ``ItemRecord`` (or anything with the same fields)."""
    position = {c.id: str(c.position) for c in item.candidates}
    if judgement.choice in ("tie", "both_bad"):
        return judgement.choice
    if judgement.preferred_candidate_id is not None:
        return position.get(judgement.preferred_candidate_id)
    if judgement.ranking:
        return position.get(judgement.ranking[0])
    if judgement.ratings:
        top = max(judgement.ratings.values())
        best = [cid for cid, r in judgement.ratings.items() if r == top]
        return position.get(best[0]) if len(best) == 1 else "tie"
    return None


@dataclass
class AgreementReport:
    items: int
    judged_items: int
    judgements: int
    krippendorff_alpha: float
    fleiss_kappa: float
    fleiss_items: int  # items with the most common number of judgements (Fleiss needs a fixed number)
    raters_per_item: int
    mean_cohen_kappa: float
    cohen_pairs: int  # annotator pairs with enough shared items
    consensus: dict[str, Agreement] = field(default_factory=dict)
    gold: dict[str, Agreement] = field(default_factory=dict)

    def to_json(self) -> dict:
        def clean(x):
            return None if isinstance(x, float) and math.isnan(x) else x

        out = {k: clean(v) for k, v in self.__dict__.items() if k not in ("consensus", "gold")}
        out["consensus"] = {a: {"agree": g.agree, "total": g.total, "rate": clean(g.rate)}
                            for a, g in self.consensus.items()}
        out["gold"] = {a: {"agree": g.agree, "total": g.total, "rate": clean(g.rate)} for a, g in self.gold.items()}
        return out


def label_table(items, judgements) -> tuple[dict[int, dict[str, str]], dict[int, str]]:
    """``labels[item_id][annotator] = label`` from the active judgements, and ``gold[item_id] = label``."""
    by_id = {item.id: item for item in items}
    labels: dict[int, dict[str, str]] = defaultdict(dict)
    for j in judgements:
        if getattr(j, "retracted", False) or j.item_id not in by_id:
            continue
        label = judgement_label(j, by_id[j.item_id])
        if label is not None:
            labels[j.item_id][j.annotator] = label
    gold = {item.id: str(item.gold) for item in items if item.gold is not None}
    return dict(labels), gold


def project_agreement(items, judgements, min_shared: int = 3) -> AgreementReport:
    """Every statistic above for one project's items and (active) judgements."""
    labels, gold = label_table(items, judgements)
    alpha = krippendorff_alpha([list(v.values()) for v in labels.values()])
    sizes = Counter(len(v) for v in labels.values() if len(v) >= 2)
    raters = sizes.most_common(1)[0][0] if sizes else 0
    fixed = [list(v.values()) for v in labels.values() if len(v) == raters] if raters else []
    fleiss = fleiss_kappa_from_labels(fixed) if fixed else NAN
    annotators = sorted({a for v in labels.values() for a in v})
    kappas = []
    for a, b in itertools.combinations(annotators, 2):
        shared = [(v[a], v[b]) for v in labels.values() if a in v and b in v]
        if len(shared) >= min_shared:
            k = cohen_kappa([x for x, _ in shared], [y for _, y in shared])
            if not math.isnan(k):
                kappas.append(k)
    return AgreementReport(
        items=len(items), judged_items=len(labels), judgements=sum(len(v) for v in labels.values()),
        krippendorff_alpha=alpha, fleiss_kappa=fleiss, fleiss_items=len(fixed), raters_per_item=raters,
        mean_cohen_kappa=sum(kappas) / len(kappas) if kappas else NAN, cohen_pairs=len(kappas),
        consensus={str(a): g for a, g in leave_one_out_agreement(labels).items()},
        gold={str(a): g for a, g in gold_agreement(labels, gold).items()})
