"""`moss-rlhf feedback …` end to end: import, add-annotator, simulate, agreement, export, create, serve."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

from moss_rlhf.cli import main
from moss_rlhf.data.formats import load_preferences


def _world_candidates(path, n=12):
    tasks = pytest.importorskip("moss_rlhf.demo.tasks")
    flaws = pytest.importorskip("moss_rlhf.demo.flaws")
    rng = random.Random(1)
    rows = []
    for i in range(n):
        prompt = tasks.sample_prompt(tasks.TASKS[i % len(tasks.TASKS)], rng)
        good = tasks.reference_response(prompt)
        bad = flaws.flawed_response(tasks.parse_prompt(prompt), flaws.FLAWS[i % len(flaws.FLAWS)], rng)
        responses = [good, bad] if i % 3 else [bad, good, tasks.reference_response(prompt) + " Thanks!"]
        row = {"prompt": prompt, "responses": responses}
        if i == 0:
            row["gold"] = 1
        rows.append(row)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_import_simulate_agreement_export(tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    cands = _world_candidates(tmp_path / "cands.jsonl")
    assert main(["feedback", "import", "--db", db, "--name", "world", "--file", str(cands),
                 "--annotators-per-item", "3"]) == 0
    assert "12 items (1 gold)" in capsys.readouterr().out
    assert main(["feedback", "import", "--db", db, "--name", "world", "--file", str(cands)]) == 2
    assert "already exists" in capsys.readouterr().err

    assert main(["feedback", "add-annotator", "--db", db, "--name", "boss", "--admin"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(token) >= 30 and token not in (tmp_path / "fb.db").read_bytes().decode("latin-1")

    assert main(["feedback", "simulate", "--db", db, "--project", "world", "--annotators", "3",
                 "--temperature", "0.2", "--error-rate", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "3 annotators made 36 judgements" in out

    report_path = tmp_path / "agreement.json"
    assert main(["feedback", "agreement", "--db", db, "--project", "world", "--out", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "Krippendorff" in out and "sim-1" in out
    report = json.loads(report_path.read_text())
    assert report["judgements"] == 36 and report["raters_per_item"] == 3 and report["krippendorff_alpha"] > 0.3

    prefs, raw, ties = tmp_path / "out" / "prefs.jsonl", tmp_path / "out" / "raw.jsonl", tmp_path / "out" / "ties.jsonl"
    assert main(["feedback", "export", "--db", db, "--project", "world", "--out", str(prefs), "--raw-out", str(raw),
                 "--ties-out", str(ties), "--margin-much", "2.0"]) == 0
    loaded = load_preferences(prefs)
    assert len(loaded) >= 8 + 4 * 2  # 8 pairwise items, 4 ranking items of 3 (up to 3 pairs each)
    assert all(p.margin > 0 for p in loaded)
    assert len(raw.read_text().splitlines()) == 36
    assert main(["feedback", "export", "--db", db, "--project", "nope", "--out", str(prefs)]) == 2
    assert "no project 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_create_samples_from_saved_models(tmp_path, capsys, tiny_model_dir):
    db = str(tmp_path / "fb.db")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Where did Lin go {i}?"}) + "\n" for i in range(3)))
    assert main(["feedback", "create", "--db", db, "--name", "gen", "--prompts", str(prompts),
                 "--model", str(tiny_model_dir), "--model", str(tiny_model_dir), "--k", "3",
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert "has 3 items of up to 3 responses" in capsys.readouterr().out
    from moss_rlhf.feedback.store import Store

    store = Store(db)
    items = store.items()
    assert [i.task_type for i in items] == ["ranking"] * 3
    assert all(len(i.candidates) == 3 and i.candidates[0].source == str(tiny_model_dir) for i in items)
    assert items[0].messages == [{"role": "user", "content": "Where did Lin go 0?"}]
    store.close()


def test_serve_binds_loopback_and_needs_tokens(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = str(tmp_path / "fb.db")
    assert main(["feedback", "serve", "--db", db]) == 2  # a typo in --db must not start on a new empty database
    assert main(["feedback", "import", "--db", db, "--name", "p", "--file", str(_world_candidates(tmp_path / "c.jsonl"))
                 ]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moss_rlhf.cli", "feedback", "serve", "--db", db, "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json() == {"ok": True}
                break
            except (httpx.TransportError, AssertionError):
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(f"server did not come up: {proc.stdout.read() if proc.poll() else ''}")
                time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/label").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/api/next").status_code == 401
        if shutil.which("ss"):  # the listening socket's local address is the loopback one
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
            assert [line.split()[3] for line in listening.splitlines()] == [f"127.0.0.1:{port}"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_database_passwords_are_never_printed(tmp_path, capsys):
    """`feedback import/create/serve` name their database; a PostgreSQL URL's password never appears."""
    from fbtools import postgres_url
    from sqlalchemy.engine import make_url

    cands = _world_candidates(tmp_path / "cands.jsonl", n=3)
    assert main(["feedback", "export", "--db", "postgresql+psycopg://ann:hunter2@127.0.0.1:9/none", "--out",
                 str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "ann:***@127.0.0.1:9" in err
    with postgres_url() as url:
        password = make_url(url).password
        assert main(["feedback", "import", "--db", url, "--name", "p", "--file", str(cands)]) == 0
        out = capsys.readouterr().out
        assert password and password not in out and "***" in out


def test_revoke_token_replaces_the_token(tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    assert main(["feedback", "add-annotator", "--db", db, "--name", "ann"]) == 0
    old = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["feedback", "revoke-token", "--db", db, "--name", "ann"]) == 0
    new = capsys.readouterr().out.strip().splitlines()[-1]
    from moss_rlhf.feedback.store import Store

    store = Store(db)
    assert store.authenticate(old) is None and store.authenticate(new).name == "ann"
    store.close()
    assert main(["feedback", "revoke-token", "--db", db, "--name", "nobody"]) == 2
    assert "no annotator named 'nobody'" in capsys.readouterr().err


def test_kto_from_the_labelling_apps_ratings(tmp_path, capsys, tiny_model_dir):
    """End to end: rated items → simulated annotators → `feedback export --kto-out` → `moss-rlhf dpo --loss kto`:
    the loss falls and the policy learns the export's labels: most well-rated replies rise above KTO's reference
    point and most badly rated ones fall below it (measured on the records it trained on: 40 steps of a tiny model
    begin to fit them; they do not generalise)."""
    from moss_rlhf.runs import read_metrics

    db = str(tmp_path / "fb.db")
    cands = _world_candidates(tmp_path / "cands.jsonl", n=60)
    assert main(["feedback", "import", "--db", db, "--name", "rated", "--file", str(cands), "--task-type", "rating",
                 "--annotators-per-item", "2"]) == 0
    assert main(["feedback", "simulate", "--db", db, "--annotators", "2", "--temperature", "0.5"]) == 0
    kto = tmp_path / "kto.jsonl"
    assert main(["feedback", "export", "--db", db, "--out", str(tmp_path / "prefs.jsonl"), "--kto-out",
                 str(kto)]) == 0
    found = re.search(r"(\d+) desirable and (\d+) undesirable KTO records", capsys.readouterr().out)
    assert found and int(found[1]) >= 30 and int(found[2]) >= 30
    run = tmp_path / "kto_run"
    assert main(["dpo", "--loss", "kto", "--model", str(tiny_model_dir), "--data", str(kto), "--out", str(run),
                 "--max-steps", "40", "--lr", "5e-4", "--beta", "0.5", "--batch-size", "8", "--eval-data", str(kto),
                 "--eval-every", "20", "--kl-prompts", "4", "--max-len", "96", "--log-every", "1",
                 "--no-progress"]) == 0
    rows = read_metrics(run)
    assert rows[0]["train/loss"] == pytest.approx(0.5, abs=1e-6)  # the policy starts as the reference
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(losses[-10:]) / 10 < 0.45  # from exactly 0.5
    final = [r for r in rows if "eval/accuracy" in r][-1]
    assert final["eval/loss"] < 0.45 and final["eval/accuracy"] > 0.65
    assert final["eval/chosen_reward"] > final["eval/rejected_reward"]
    assert (run / "model" / "model.safetensors").exists() and (run / "config.yaml").exists()
