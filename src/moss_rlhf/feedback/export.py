"""From judgements to training data: preference pairs for the reward model, and a raw dump of every judgement.

Preference JSONL (read as is by :func:`moss_rlhf.data.formats.load_preferences`)::

    {"prompt": [messages], "chosen": str, "rejected": str, "margin": float,
     "item_id": int, "agreement": float, "votes": int, "chosen_source": str, "rejected_source": str}

How judgements become pairs. Every active (not retracted) judgement votes on pairs of an item's responses:

- pairwise: "A better" / "B better" is a win for that response, with its strength (slightly / much, or none);
  "tie" and "both bad" are votes of their own;
- ratings (1–7): for each two responses, the higher rating wins — "much" when the ratings differ by at least
  ``rating_much_gap`` (3), "slightly" otherwise; equal ratings are a tie;
- rankings (best first, partial allowed): each listed response beats every response listed after it, with no
  stated strength. Unlisted responses are unjudged, unless ``unranked_below`` (then the listed beat the unlisted).

Per item and pair, annotators are aggregated by majority: the outcome with the most votes wins (a shared top count
is *undecided* and left out). ``agreement`` is the winning outcome's share of the votes; pairs below
``min_agreement`` are left out. ``margin`` is the mean over the winning votes of ``margin_much`` (1.0),
``margin_slightly`` (0.5) or ``margin_default`` (0.5, no stated strength); the reward loss then asks
``r(chosen) - r(rejected)`` to exceed it (:func:`moss_rlhf.losses` Bradley–Terry with margin).

Ties and both-bad majorities cannot be Bradley–Terry pairs and are left out of the preference file. With
``ties_path`` they are written to a separate JSONL: ``{"prompt", "response_a", "response_b", "label": "tie" |
"both_bad", "agreement", "votes", "item_id"}``.

With ``include_edits`` an annotator's edited ("made better") answer becomes ``chosen`` against every response of
that item (margin ``margin_default``).

KTO records (``kto_path``; read by ``moss-rlhf dpo --loss kto``)::

    {"prompt": [messages], "completion": str, "label": bool, "item_id": int, "agreement": float, "votes": int,
     "mean_rating": float | null, "source": str}

carry what a judgement says of one response on its own, which a pair cannot: a rating of at least
``kto_desirable_min`` (5 of 7) votes "desirable", one of at most ``kto_undesirable_max`` (3) "undesirable", one in
between "neutral"; a "both bad" answer votes "undesirable" for both responses shown. (A / B / tie choices and
rankings are relative and cast no such vote.) Per response the majority outcome wins, with the same undecided and
``min_agreement`` rules as pairs; neutral majorities are left out. With ``include_edits`` an edited answer is a
desirable record. Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from moss_rlhf.config import Config, ConfigError, option
from moss_rlhf.feedback.store import FeedbackError
from moss_rlhf.files import atomic_write_text


@dataclass
class ExportOptions(Config):
    margin_slightly: float = option(0.5, "margin of a 'slightly better' vote", at_least=0.0)
    margin_much: float = option(1.0, "margin of a 'much better' vote", at_least=0.0)
    margin_default: float = option(0.5, "margin of a vote with no stated strength (plain A/B, rankings)",
                                   at_least=0.0)
    rating_much_gap: int = option(3, "a rating difference of at least this many points counts as 'much better'",
                                  at_least=1, at_most=6)
    min_agreement: float = option(0.0, "leave out pairs whose majority has less than this share of the votes",
                                  at_least=0.0, at_most=1.0)
    include_gold: bool = option(True, "export gold (honeypot) items too")
    unranked_below: bool = option(False, "partial rankings: listed responses beat the unlisted ones")
    include_edits: bool = option(False, "an edited answer becomes 'chosen' against every response of its item")
    kto_desirable_min: int = option(5, "KTO records: a 1–7 rating of at least this is desirable", at_least=1,
                                    at_most=7)
    kto_undesirable_max: int = option(3, "KTO records: a 1–7 rating of at most this is undesirable", at_least=1,
                                      at_most=7)

    def check(self) -> None:
        if self.kto_undesirable_max >= self.kto_desirable_min:
            raise ConfigError(f"--kto-undesirable-max ({self.kto_undesirable_max}) must be below "
                              f"--kto-desirable-min ({self.kto_desirable_min})")


@dataclass
class ExportSummary:
    items: int = 0
    judgements: int = 0
    pairs: int = 0
    ties: int = 0
    undecided: int = 0
    below_agreement: int = 0
    identical: int = 0  # pairs whose two replies are the same text (no preference in them) left out
    edits: int = 0
    desirable: int = 0  # KTO records
    undesirable: int = 0
    mean_agreement: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)


def _votes(judgement, item, opts: ExportOptions) -> list[tuple[int, int, str, str | None]]:
    """``(position_i, position_j, outcome, strength)`` with i < j; outcome "i" / "j" (that one wins), "tie" or
    "both_bad"."""
    position = {c.id: c.position for c in item.candidates}
    out = []

    def win(winner_id, loser_id, strength):
        a, b = position[winner_id], position[loser_id]
        out.append((min(a, b), max(a, b), "i" if a < b else "j", strength))

    if judgement.choice is not None:
        a, b = sorted(position[c] for c in judgement.shown_order[:2])
        if judgement.choice in ("tie", "both_bad"):
            out.append((a, b, judgement.choice, None))
        else:
            loser = next(c for c in judgement.shown_order[:2] if c != judgement.preferred_candidate_id)
            win(judgement.preferred_candidate_id, loser, judgement.strength)
    elif judgement.ranking:
        listed = list(judgement.ranking)
        for n, winner in enumerate(listed):
            for loser in listed[n + 1:]:
                win(winner, loser, None)
        if opts.unranked_below:
            for winner in listed:
                for loser in (c for c in position if c not in listed):
                    win(winner, loser, None)
    elif judgement.ratings:
        rated = sorted(judgement.ratings.items(), key=lambda kv: position[kv[0]])
        for n, (ci, ri) in enumerate(rated):
            for cj, rj in rated[n + 1:]:
                if ri == rj:
                    out.append((position[ci], position[cj], "tie", None))
                else:
                    strength = "much" if abs(ri - rj) >= opts.rating_much_gap else "slightly"
                    win(ci, cj, strength) if ri > rj else win(cj, ci, strength)
    return out


def item_pairs(item, judgements, opts: ExportOptions | None = None) -> tuple[list[dict], list[dict], Counter]:
    """Aggregate one item's active judgements: (preference rows, tie/both-bad rows, counts: "undecided",
    "below_agreement" and "identical" pairs left out, "edits" pairs added). Two replies of the same text never make
    a pair: it would teach nothing and count as half in a reward model's accuracy."""
    opts = opts or ExportOptions()
    margin_of = {"much": opts.margin_much, "slightly": opts.margin_slightly, None: opts.margin_default}
    by_position = {c.position: c for c in item.candidates}
    ballots: dict[tuple[int, int], list[tuple[str, str | None]]] = defaultdict(list)
    for j in judgements:
        if getattr(j, "retracted", False):
            continue
        for a, b, outcome, strength in _votes(j, item, opts):
            ballots[(a, b)].append((outcome, strength))
    pairs, ties, counts = [], [], Counter()
    for (a, b), votes in sorted(ballots.items()):
        tally = Counter(outcome for outcome, _ in votes).most_common()
        if len(tally) > 1 and tally[0][1] == tally[1][1]:
            counts["undecided"] += 1
            continue
        outcome, n = tally[0]
        agreement = n / len(votes)
        if agreement < opts.min_agreement:
            counts["below_agreement"] += 1
            continue
        ca, cb = by_position[a], by_position[b]
        if ca.text.strip() == cb.text.strip():
            counts["identical"] += 1
            continue
        if outcome in ("tie", "both_bad"):
            ties.append({"prompt": item.messages, "response_a": ca.text, "response_b": cb.text, "label": outcome,
                         "agreement": agreement, "votes": len(votes), "item_id": item.id})
            continue
        chosen, rejected = (ca, cb) if outcome == "i" else (cb, ca)
        margins = [margin_of.get(s, opts.margin_default) for o, s in votes if o == outcome]
        pairs.append({"prompt": item.messages, "chosen": chosen.text, "rejected": rejected.text,
                      "margin": round(sum(margins) / len(margins), 6), "item_id": item.id,
                      "agreement": round(agreement, 6), "votes": len(votes),
                      "chosen_source": chosen.source, "rejected_source": rejected.source})
    if opts.include_edits:
        for j in judgements:
            if getattr(j, "retracted", False) or not j.edited.strip():
                continue
            for c in item.candidates:
                if c.text.strip() != j.edited.strip():
                    pairs.append({"prompt": item.messages, "chosen": j.edited, "rejected": c.text,
                                  "margin": opts.margin_default, "item_id": item.id, "agreement": 1.0, "votes": 1,
                                  "chosen_source": f"edit:{j.annotator}", "rejected_source": c.source})
                    counts["edits"] += 1
    return pairs, ties, counts


def item_kto_rows(item, judgements, opts: ExportOptions | None = None) -> list[dict]:
    """One item's KTO records: per response, the majority of its ratings' and "both bad" answers' votes."""
    opts = opts or ExportOptions()
    ballots: dict[int, list[str]] = defaultdict(list)
    ratings: dict[int, list[int]] = defaultdict(list)
    for j in judgements:
        if getattr(j, "retracted", False):
            continue
        if j.ratings:
            for cid, rating in j.ratings.items():
                ratings[int(cid)].append(rating)
                ballots[int(cid)].append("desirable" if rating >= opts.kto_desirable_min else
                                         "undesirable" if rating <= opts.kto_undesirable_max else "neutral")
        elif j.choice == "both_bad":
            for cid in j.shown_order[:2]:
                ballots[cid].append("undesirable")
    rows = []
    for c in sorted(item.candidates, key=lambda c: c.position):
        tally = Counter(ballots.get(c.id, [])).most_common()
        if not tally or len(tally) > 1 and tally[0][1] == tally[1][1]:
            continue
        outcome, n = tally[0]
        agreement = n / len(ballots[c.id])
        if outcome == "neutral" or agreement < opts.min_agreement or not c.text.strip():
            continue
        rated = ratings.get(c.id)
        rows.append({"prompt": item.messages, "completion": c.text, "label": outcome == "desirable",
                     "item_id": item.id, "agreement": round(agreement, 6), "votes": len(ballots[c.id]),
                     "mean_rating": round(sum(rated) / len(rated), 6) if rated else None, "source": c.source})
    if opts.include_edits:
        rows += [{"prompt": item.messages, "completion": j.edited, "label": True, "item_id": item.id,
                  "agreement": 1.0, "votes": 1, "mean_rating": None, "source": f"edit:{j.annotator}"}
                 for j in judgements if not getattr(j, "retracted", False) and j.edited.strip()]
    return rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def export_preferences(store, project: str | int | None, out_path: str | Path, opts: ExportOptions | None = None,
                       ties_path: str | Path | None = None, kto_path: str | Path | None = None) -> ExportSummary:
    """Write the project's aggregated preference pairs to ``out_path`` (ties/both-bad to ``ties_path``, KTO records
    to ``kto_path``)."""
    opts = opts or ExportOptions()
    project_id = store.require_project(project)
    items = [i for i in store.items(project_id) if opts.include_gold or i.gold is None]
    judgements = store.judgements(project_id)
    if not judgements:
        raise FeedbackError(f"{'project ' + repr(project) if project else 'the database'} has no judgements: "
                            f"nothing to export")
    by_item = defaultdict(list)
    for j in judgements:
        by_item[j.item_id].append(j)
    summary = ExportSummary(items=len(items), judgements=len(judgements))
    all_pairs, all_ties, all_kto = [], [], []
    for item in items:
        pairs, ties, counts = item_pairs(item, by_item.get(item.id, []), opts)
        all_pairs += pairs
        all_ties += ties
        all_kto += item_kto_rows(item, by_item.get(item.id, []), opts) if kto_path else []
        summary.undecided += counts["undecided"]
        summary.below_agreement += counts["below_agreement"]
        summary.identical += counts["identical"]
        summary.edits += counts["edits"]
    summary.pairs, summary.ties = len(all_pairs), len(all_ties)
    voted = [p["agreement"] for p in all_pairs if not str(p["chosen_source"]).startswith("edit:")]
    summary.mean_agreement = sum(voted) / len(voted) if voted else None
    atomic_write_text(Path(out_path), _jsonl(all_pairs))
    summary.outputs["preferences"] = str(out_path)
    if ties_path:
        atomic_write_text(Path(ties_path), _jsonl(all_ties))
        summary.outputs["ties"] = str(ties_path)
    if kto_path:
        summary.desirable = sum(1 for r in all_kto if r["label"])
        summary.undesirable = len(all_kto) - summary.desirable
        atomic_write_text(Path(kto_path), _jsonl(all_kto))
        summary.outputs["kto"] = str(kto_path)
    return summary


def dump_judgements(store, project: str | int | None, out_path: str | Path, include_retracted: bool = True) -> int:
    """Every judgement row (retracted ones too, flagged) with its item's prompt and responses, one JSON per line."""
    project_id = store.require_project(project)
    items = {i.id: i for i in store.items(project_id)}
    rows = []
    for j in store.judgements(project_id, include_retracted=include_retracted):
        item = items[j.item_id]
        row = j.to_json()
        row["prompt"] = item.messages
        row["candidates"] = [{"id": c.id, "position": c.position, "text": c.text, "source": c.source}
                             for c in item.candidates]
        row["gold"] = item.gold
        rows.append(row)
    atomic_write_text(Path(out_path), _jsonl(rows))
    return len(rows)
