"""Active learning for the labelling app: send the pairs the reward models are least sure of back to people.

``moss-rlhf reward strength`` gives every pair its preference strength over an ensemble of reward models (the mean
and the spread of ``r(chosen) − r(rejected)``, MOSS-RLHF Part II). A pair whose mean is near zero, or whose members
disagree, is where a new human judgement teaches the most; a pair with a strong mean is settled. ``moss-rlhf
feedback relabel`` makes a pairwise project of the ``--count`` most uncertain pairs — ordered by ``|mean| − std``:
the pairs whose one-standard-deviation interval reaches furthest across zero come first — and each item keeps its
strength (and the item it came from) in its ``meta``, which the admin page shows beside the judgements it gets.
"""

from __future__ import annotations

from pathlib import Path

from moss_rlhf.data.formats import load_preferences, load_records
from moss_rlhf.feedback.store import FeedbackError, Store, new_project


def uncertainty_order(means: list[float], stds: list[float]) -> list[int]:
    """Pair indices, most uncertain first: ascending ``|mean| − std`` (ties: the wider spread first)."""
    return sorted(range(len(means)), key=lambda i: (abs(means[i]) - stds[i], -stds[i], i))


def create_relabel_project(store: Store, name: str, strength_path: str | Path, count: int,
                           annotators_per_item: int = 1, guideline_version: str = "1", guidelines: str = "",
                           append: bool = False) -> tuple[int, int]:
    """A pairwise project of the ``count`` most uncertain pairs of a ``reward strength`` file; returns (project id,
    items added)."""
    prefs = load_preferences(strength_path)
    rows = load_records(strength_path)
    if any(p.strength_mean is None for p in prefs):
        raise FeedbackError(f"{strength_path}: pairs without strength_mean; write the file with `moss-rlhf reward "
                            f"strength`")
    chosen = uncertainty_order([p.strength_mean for p in prefs], [p.strength_std for p in prefs])[:count]
    specs = []
    for i in chosen:
        p, row = prefs[i], rows[i]
        # the first response is the one the earlier label preferred
        meta = {"strength_mean": p.strength_mean, "strength_std": p.strength_std, "relabel_of": row.get("item_id")}
        specs.append({"messages": p.prompt, "responses": [{"text": p.chosen, "source": "relabel"},
                                                          {"text": p.rejected, "source": "relabel"}],
                      "task_type": "pairwise", "meta": meta})
    project_id = new_project(store, name, "pairwise", annotators_per_item, guideline_version, guidelines, append)
    store.add_items(project_id, specs)
    return project_id, len(specs)


def uncertain_items(items, judgements, limit: int = 20) -> list[dict]:
    """The admin page's re-label queue: the project's items that carry a strength, most uncertain first, each with
    its judgements so far and how many of them agree with the earlier label."""
    scored = [i for i in items if "strength_mean" in (i.meta or {})]
    order = uncertainty_order([i.meta["strength_mean"] for i in scored], [i.meta["strength_std"] for i in scored])
    first = {i.id: next(c.id for c in i.candidates if c.position == 0) for i in scored}
    counts: dict[int, list[int]] = {}
    for j in judgements:
        if j.item_id in first and not getattr(j, "retracted", False) and j.preferred_candidate_id is not None:
            tally = counts.setdefault(j.item_id, [0, 0])
            tally[0] += 1
            tally[1] += j.preferred_candidate_id == first[j.item_id]
    out = []
    for k in order[:limit]:
        item = scored[k]
        judged, agree = counts.get(item.id, [0, 0])
        out.append({"id": item.id, "prompt": item.messages[-1]["content"], "mean": item.meta["strength_mean"],
                    "std": item.meta["strength_std"], "judged": judged, "agree": agree})
    return out
