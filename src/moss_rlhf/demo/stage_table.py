"""What each stage added: the pretrained, SFT and RLHF models on the same held-out prompts, scored by the gold judge.

The seed's story is that pretraining gives knowledge, SFT gives the format and feedback gives the preference. This
measures it per task: the mean gold score of each model, the share of replies that carry each of the SFT data's four
flaws (:func:`moss_rlhf.demo.judge.flaws_of`), and a few replies per task side by side. The report shows it first.

Every model is prompted with the chat template (the pretraining corpus's conversations use it too) and samples at
temperature 1, as for labelling and RL, with the per-prompt seeds of ``moss-rlhf evaluate``.

Output (``DIR/eval/stages/<run>_round<N>.json``)::

    {"judge": "gold", "temperature": 1.0, "n_prompts": 300, "tasks": [...],
     "stages": [{"name", "path", "mean", "by_task": {task: mean}, "flaws": {flaw: share},
                 "clean": share}, ...],
     "samples": [{"task", "prompt", "replies": [{"stage", "reply", "score"}, ...]}, ...],
     "reward_probe": {"flaws": [...], "by_task": {task: {flaw: share}}, "all": {flaw: share}, "pairs": n}}

The reward probe (with a reward model) explains the last column: feedback can only remove a flaw the reward model
sees, and it sees the manners (rude, rambling) far better than wrong content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moss_rlhf.demo.judge import FLAW_NAMES, flaws_of, judge
from moss_rlhf.demo.tasks import TASKS
from moss_rlhf.files import atomic_write_text


@dataclass(frozen=True)
class StageModel:
    name: str   # "pretrained", "SFT", "PPO-max", ...
    path: str   # a save_pretrained directory


def stage_replies(model_dir: str, prompts: list[str], seed: int, device: str,
                  max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
    """One reply per prompt at temperature 1: prompt ``i`` samples with seed ``prompt_seeds(seed, [i])``, in batches
    of the same size and with the same reply length as ``moss-rlhf evaluate``'s defaults, so the two give the same
    replies (padding to another batch's width can change a logit in the last bits, and with it a sampled token)."""
    import torch

    from moss_rlhf.models import load_causal_lm
    from moss_rlhf.sampling import SamplingConfig, sample_replies
    from moss_rlhf.sampling.builtin import BuiltinSampler
    from moss_rlhf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).to(device).eval()
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    with torch.no_grad():
        replies, _ = sample_replies(BuiltinSampler(model, tokenizer), tokenizer, conversations,
                                    SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0), seed, batch_size)
    return replies


def measure_stages(models: list[StageModel], prompts_file: str, out: str | Path, seed: int = 0, device: str = "cpu",
                   samples_per_task: int = 3, reward_model: str = "") -> dict:
    """Score every model on the world prompts of ``prompts_file`` (``{"prompt", "task"}`` lines), and with
    ``reward_model`` probe what that reward model can tell apart (:func:`reward_probe`); write and return the table
    (see the module docstring)."""
    rows = _prompt_rows(prompts_file)
    prompts, tasks = [row["prompt"] for row in rows], [row["task"] for row in rows]
    present = [task for task in TASKS if task in tasks]
    stages, replies_by_stage, scores_by_stage = [], [], []
    for model in models:
        replies = stage_replies(model.path, prompts, seed, device)
        judgements = [judge(p, r) for p, r in zip(prompts, replies)]
        scores = [j.score for j in judgements]
        flaws = [flaws_of(p, r, j) for p, r, j in zip(prompts, replies, judgements)]
        stages.append({
            "name": model.name, "path": model.path, "mean": sum(scores) / len(scores),
            "by_task": {task: _mean([s for s, t in zip(scores, tasks) if t == task]) for task in present},
            "flaws": {flaw: sum(flaw in f for f in flaws) / len(flaws) for flaw in FLAW_NAMES},
            "clean": sum(not f for f in flaws) / len(flaws)})
        replies_by_stage.append(replies)
        scores_by_stage.append(scores)
    samples = []
    for task in present:
        for i in [i for i, t in enumerate(tasks) if t == task][:samples_per_task]:
            samples.append({"task": task, "prompt": prompts[i],
                            "replies": [{"stage": m.name, "reply": replies[i], "score": scores[i]}
                                        for m, replies, scores in zip(models, replies_by_stage, scores_by_stage)]})
    table = {"judge": "gold", "temperature": 1.0, "n_prompts": len(rows), "tasks": present, "stages": stages,
             "samples": samples}
    if reward_model:
        table["reward_probe"] = reward_probe(reward_model, prompts_file, seed, device)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), json.dumps(table, indent=2, ensure_ascii=False))
    return table


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _prompt_rows(prompts_file: str) -> list[dict]:
    return [json.loads(line) for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]


def reward_probe(reward_model: str, prompts_file: str, seed: int = 0, device: str = "cpu") -> dict:
    """What the reward model can tell apart: on every held-out prompt, the clean reply against the same prompt's reply
    with each flaw of the SFT data (:func:`moss_rlhf.demo.flaws.flawed_response`). The gold judge prefers the clean
    reply every time, so the share of prompts where the reward model does too is its accuracy on exactly the
    distinctions feedback is meant to teach — per task and flaw, and over all prompts per flaw."""
    import random

    import torch

    from moss_rlhf.data.formats import Preference
    from moss_rlhf.demo.flaws import FLAWS, flawed_response
    from moss_rlhf.demo.tasks import parse_prompt, reference_for
    from moss_rlhf.models import load_scorer
    from moss_rlhf.stages.reward import score_pairs
    from moss_rlhf.tokenizer import load_tokenizer

    rows = _prompt_rows(prompts_file)
    rng = random.Random(f"reward-probe/{seed}")
    pairs, keys = [], []
    for row in rows:
        parsed = parse_prompt(row["prompt"])
        if parsed is None:
            continue
        clean = reference_for(parsed)
        for flaw in FLAWS:
            flawed = flawed_response(parsed, flaw, rng)
            if flawed != clean:
                pairs.append(Preference([{"role": "user", "content": row["prompt"]}], clean, flawed))
                keys.append((parsed.task, flaw))
    tokenizer = load_tokenizer(reward_model)
    model = load_scorer(reward_model, tokenizer, flag="reward model", trained=True).to(device)
    with torch.no_grad():
        chosen, rejected = score_pairs(model, tokenizer, pairs, max_len=192, device=device)
    right: dict[tuple[str, str], list[bool]] = {}
    for key, c, r in zip(keys, chosen.tolist(), rejected.tolist()):
        right.setdefault(key, []).append(c > r)
    tasks = [task for task in TASKS if any(key[0] == task for key in right)]
    return {"flaws": list(FLAWS),
            "by_task": {task: {flaw: _mean(right.get((task, flaw), [])) for flaw in FLAWS} for task in tasks},
            "all": {flaw: _mean([x for (_, f), xs in right.items() if f == flaw for x in xs]) for flaw in FLAWS},
            "pairs": len(pairs)}
