"""Simulated annotators for the demo world: they label through the same store functions the web routes call
(:meth:`Store.next_item`, :meth:`Store.submit`), or over HTTP against a running server, so the rest of the pipeline
cannot tell them from people.

Each candidate gets a score from a scorer — by default the demo world's gold judge,
``moss_rlhf.demo.judge.judge(prompt, response).score`` with the last user turn as the prompt. Choices follow
Bradley–Terry: each response's utility is ``score / temperature`` plus standard Gumbel noise and the higher
utility wins, so ``P(A ≻ B) = σ((s_A − s_B) / temperature)``; rankings are the utilities sorted (Plackett–Luce);
ratings map utilities onto 1..7. Then, with probability ``error_rate``, the answer is flipped (pairwise), two
adjacent ranks are swapped (ranking) or two ratings are swapped (rating). Strength is "much" when the Bradley–Terry
probability of the chosen side is at least ``much_above``, else "slightly". Time taken is drawn around a reading
speed (a few seconds plus ~25 ms per character shown).
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from moss_rlhf.config import Config, option
from moss_rlhf.feedback.store import ItemView, Store, Submission

Scorer = Callable[[list[dict], str], float]


@dataclass
class AnnotatorModel(Config):
    temperature: float = option(0.5, "Bradley–Terry temperature: P(A≻B) = σ((s_A − s_B)/T); 0 always picks the "
                                     "higher score", at_least=0.0)
    error_rate: float = option(0.0, "probability of flipping an answer after the noisy choice", at_least=0.0,
                               at_most=1.0)
    much_above: float = option(0.85, "'much better' when the chosen side's Bradley–Terry probability is at least "
                                     "this", at_least=0.0, at_most=1.0)
    seconds_base: float = option(4.0, "reading time before the first character (seconds)", at_least=0.0)
    ms_per_char: float = option(25.0, "reading time per character of prompt and responses (milliseconds)",
                                at_least=0.0)


def judge_scorer() -> Scorer:
    """The demo world's gold judge as a scorer of one (conversation, response)."""
    from moss_rlhf.demo.judge import gold_scores

    return lambda messages, response: gold_scores([messages], [response])[0]


def _gumbel(rng: random.Random) -> float:
    return -math.log(-math.log(rng.random() or 1e-12) or 1e-12)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def decide(item: ItemView, scores: Sequence[float], model: AnnotatorModel, rng: random.Random) -> Submission:
    """One simulated answer to ``item`` (``scores`` in the order the candidates are shown)."""
    t = model.temperature
    utilities = [s / t + _gumbel(rng) for s in scores] if t > 0 else [float(s) for s in scores]
    tiebreak = [rng.random() for _ in scores]  # equal utilities (temperature 0, equal scores): a coin decides
    key = [(u, b) for u, b in zip(utilities, tiebreak)]
    ids = [c.id for c in item.candidates]
    chars = sum(len(m["content"]) for m in item.messages) + sum(len(c.text) for c in item.candidates)
    time_ms = int(1000 * (model.seconds_base + chars * model.ms_per_char / 1000) * math.exp(rng.gauss(0, 0.35)))
    sub = Submission(item_id=item.id, submission_id=str(uuid.uuid4()), shown_order=ids, time_ms=max(time_ms, 600),
                     guideline_version=item.guideline_version)
    if item.task_type == "pairwise":
        a_wins = key[0] > key[1]
        if rng.random() < model.error_rate:
            a_wins = not a_wins
        gap = (scores[0] - scores[1]) * (1 if a_wins else -1)
        p = _sigmoid(gap / t) if t > 0 else (1.0 if gap > 0 else 0.5 if gap == 0 else 0.0)
        sub.choice = "A" if a_wins else "B"
        sub.strength = "much" if p >= model.much_above else "slightly"
    elif item.task_type == "ranking":
        order = sorted(range(len(ids)), key=lambda i: key[i], reverse=True)
        if len(order) > 1 and rng.random() < model.error_rate:
            i = rng.randrange(len(order) - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
        sub.ranking = [ids[i] for i in order]
    else:
        mean = sum(utilities) / len(utilities)
        ratings = [min(7, max(1, 1 + round(6 * _sigmoid(u - mean)))) for u in utilities]
        if len(ratings) > 1 and rng.random() < model.error_rate:
            i, j = rng.sample(range(len(ratings)), 2)
            ratings[i], ratings[j] = ratings[j], ratings[i]
        sub.ratings = dict(zip(ids, ratings))
    return sub


@dataclass
class SimulationSummary:
    judgements: int = 0
    annotators: list[str] = field(default_factory=list)
    agree_with_scorer: int = 0  # answers whose first choice is the higher-scored response
    comparisons: int = 0  # answers where the scorer had a strict best response

    @property
    def agreement(self) -> float:
        return self.agree_with_scorer / self.comparisons if self.comparisons else float("nan")


def _top_choice(item: ItemView, sub: Submission) -> int | None:
    if sub.choice in ("A", "B"):
        return item.candidates[0 if sub.choice == "A" else 1].id
    if sub.ranking:
        return sub.ranking[0]
    if sub.ratings:
        top = max(sub.ratings.values())
        best = [cid for cid, r in sub.ratings.items() if r == top]
        return best[0] if len(best) == 1 else None
    return None


def _tally(summary: SimulationSummary, item: ItemView, scores: Sequence[float], sub: Submission) -> None:
    best = max(scores)
    if sum(1 for s in scores if s == best) == 1:
        summary.comparisons += 1
        summary.agree_with_scorer += _top_choice(item, sub) == item.candidates[scores.index(best)].id


def _annotator_ids(store: Store, names: Sequence[str]) -> dict[str, int]:
    existing = {a.name: a.id for a in store.annotators()}
    out = {}
    for name in names:
        out[name] = existing[name] if name in existing else store.add_annotator(name)[0].id
    return out


def simulate(store: Store, project: str | int | None = None, annotators: int | Sequence[str] = 3,
             model: AnnotatorModel | None = None, seed: int = 0, scorer: Scorer | None = None,
             limit: int | None = None) -> SimulationSummary:
    """Let simulated annotators (``sim-1``, ``sim-2``, ... or the given names; created when missing) label every
    item they can get, in turns, through :meth:`Store.next_item` and :meth:`Store.submit`. ``limit`` caps the
    judgements per annotator."""
    model = model or AnnotatorModel()
    scorer = scorer or judge_scorer()
    project_id = store.require_project(project)
    names = [f"sim-{n + 1}" for n in range(annotators)] if isinstance(annotators, int) else list(annotators)
    ids = _annotator_ids(store, names)
    rngs = {name: random.Random(f"{seed}:{name}") for name in names}
    summary = SimulationSummary(annotators=names)
    active = list(names)
    counts = dict.fromkeys(names, 0)
    while active:
        for name in list(active):
            item = store.next_item(ids[name], project_id)
            if item is None or (limit is not None and counts[name] >= limit):
                active.remove(name)
                continue
            scores = [scorer(item.messages, c.text) for c in item.candidates]
            sub = decide(item, scores, model, rngs[name])
            store.submit(ids[name], sub)
            counts[name] += 1
            summary.judgements += 1
            _tally(summary, item, scores, sub)
    return summary


@dataclass
class HttpLog:
    """What one simulated annotator sent over HTTP: every payload with the status and judgement id it got."""

    token: str
    sent: list[tuple[dict, int, int | None]] = field(default_factory=list)


def _view_from_json(data: dict) -> ItemView:
    from moss_rlhf.feedback.store import CandidateView

    cands = [CandidateView(c["id"], n, c["text"]) for n, c in enumerate(data["candidates"])]
    return ItemView(data["id"], 0, data.get("project", ""), data["task_type"], data["messages"], cands,
                    data.get("guideline_version", "1"))


def simulate_http(base_url: str, tokens: Sequence[str], model: AnnotatorModel | None = None, seed: int = 0,
                  scorer: Scorer | None = None, limit: int | None = None, timeout: float = 60.0,
                  retries: int = 5) -> tuple[SimulationSummary, list[HttpLog]]:
    """One thread per token: ``GET /api/next``, decide, ``POST /api/judgements`` until nothing is left (or ``limit``
    judgements each). A failed post is retried with the same submission UUID, so a retry never duplicates."""
    import httpx

    model = model or AnnotatorModel()
    scorer = scorer or judge_scorer()
    summary = SimulationSummary(annotators=[f"token-{n}" for n in range(len(tokens))])
    logs = [HttpLog(token) for token in tokens]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def request(client, method, url, **kw):
        for attempt in range(retries):
            try:
                r = client.request(method, url, **kw)
                if r.status_code < 500:
                    return r
            except httpx.TransportError:
                if attempt == retries - 1:
                    raise
            time.sleep(0.05 * 2 ** attempt)
        return r

    def worker(n: int, token: str):
        rng = random.Random(f"{seed}:http:{n}")
        try:
            with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as c:
                done = 0
                while limit is None or done < limit:
                    r = request(c, "GET", "/api/next")
                    r.raise_for_status()
                    data = r.json()
                    if data["item"] is None:
                        break
                    item = _view_from_json(data["item"])
                    scores = [scorer(item.messages, cand.text) for cand in item.candidates]
                    sub = decide(item, scores, model, rng)
                    sub.submission_id = data.get("submission_id") or sub.submission_id
                    payload = {"item_id": sub.item_id, "submission_id": sub.submission_id, "choice": sub.choice,
                               "strength": sub.strength, "ranking": sub.ranking, "shown_order": sub.shown_order,
                               "ratings": {str(k): v for k, v in sub.ratings.items()} if sub.ratings else None,
                               "time_ms": sub.time_ms, "guideline_version": sub.guideline_version}
                    r = request(c, "POST", "/api/judgements", json=payload)
                    judgement_id = r.json().get("judgement", {}).get("id") if r.status_code in (200, 201) else None
                    if r.status_code not in (200, 201):
                        raise RuntimeError(f"POST /api/judgements: {r.status_code} {r.text}")
                    done += 1
                    with lock:
                        logs[n].sent.append((payload, r.status_code, judgement_id))
                        summary.judgements += 1
                        _tally(summary, item, scores, sub)
        except BaseException as e:  # reported to the caller below
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(n, t), daemon=True) for n, t in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return summary, logs
