"""``moss-rlhf feedback create|import|add-annotator|serve|simulate|agreement|export|relabel``: typed configs and the
functions the CLI calls. Each takes ``--db``: a SQLAlchemy URL (``sqlite:///feedback.db``,
``postgresql+psycopg://…``) or a SQLite file path."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from moss_rlhf.config import Config, ConfigError, option
from moss_rlhf.files import atomic_write_text
from moss_rlhf.feedback.export import ExportOptions
from moss_rlhf.feedback.simulate import AnnotatorModel
from moss_rlhf.feedback.store import TASK_TYPES, Store
from moss_rlhf.sampling import SamplingConfig

DB_HELP = ("database: a SQLAlchemy URL (sqlite:///feedback.db, postgresql+psycopg://user:pass@host/db) "
           "or a SQLite file path")
DEFAULT_DB = "sqlite:///feedback.db"


def _guidelines(path: str) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the guidelines ({e.strerror})") from None


@dataclass
class CreateConfig(SamplingConfig):
    db: str = option(DEFAULT_DB, DB_HELP)
    name: str = option("", "project name")
    prompts: str = option("", "prompts file ({\"prompt\"} or {\"messages\"} records)")
    model: list[str] = option([], "saved model to sample from (repeat for several: response i comes from model i mod n)")
    k: int = option(2, "responses per prompt", at_least=2)
    annotators_per_item: int = option(1, "annotators who judge each item", at_least=1)
    task_type: str = option("auto", "auto (pairwise for k=2, else ranking), pairwise, rating or ranking",
                            choices=("auto", *TASK_TYPES))
    guideline_version: str = option("1", "guideline version recorded with every judgement")
    guidelines: str = option("", "a text file of labelling guidelines shown on the labelling page")
    seed: int = option(0, "sampling seed")
    batch_size: int = option(32, "prompts per sampling batch", at_least=1)
    device: str = option("auto", "cpu, cuda or auto")
    append: bool = option(False, "add the items to an existing project of that name")

    def check(self) -> None:
        if not self.name or not self.prompts or not self.model:
            raise ConfigError("give --name, --prompts and at least one --model")


def create(cfg: CreateConfig) -> int:
    from moss_rlhf.feedback.store import create_project_from_models

    store = Store(cfg.db)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty)
    created = create_project_from_models(store, cfg.name, cfg.prompts, cfg.model, cfg.k, cfg.annotators_per_item,
                                         sampling, cfg.seed, cfg.device, cfg.batch_size, cfg.task_type,
                                         cfg.guideline_version, _guidelines(cfg.guidelines), cfg.append)
    print(f"feedback create: project {cfg.name!r} (id {created.project_id}) has {created.items} items of up to "
          f"{cfg.k} responses -> {store.display_url}")
    if created.duplicates_removed:
        print(f"feedback create: {created.duplicates_removed} repeated replies removed; {created.items_dropped} "
              f"prompts dropped (fewer than two different replies)")
    return created.project_id


@dataclass
class ImportConfig(Config):
    db: str = option(DEFAULT_DB, DB_HELP)
    name: str = option("", "project name")
    file: str = option("", "JSONL of {\"prompt\" or \"messages\", \"responses\": [str, ...], \"gold\"?: index of the best}")
    annotators_per_item: int = option(1, "annotators who judge each item", at_least=1)
    task_type: str = option("pairwise", "pairwise (items with more than 2 responses become ranking), rating or ranking",
                            choices=TASK_TYPES)
    guideline_version: str = option("1", "guideline version recorded with every judgement")
    guidelines: str = option("", "a text file of labelling guidelines shown on the labelling page")
    append: bool = option(False, "add the items to an existing project of that name")

    def check(self) -> None:
        if not self.name or not self.file:
            raise ConfigError("give --name and --file")


def import_(cfg: ImportConfig) -> int:
    from moss_rlhf.feedback.store import import_candidates

    store = Store(cfg.db)
    pid = import_candidates(store, cfg.name, cfg.file, cfg.annotators_per_item, cfg.task_type, cfg.guideline_version,
                            _guidelines(cfg.guidelines), cfg.append)
    items = store.items(pid)
    gold = sum(1 for i in items if i.gold is not None)
    print(f"feedback import: project {cfg.name!r} (id {pid}) has {len(items)} items ({gold} gold) -> "
          f"{store.display_url}")
    return pid


@dataclass
class AddAnnotatorConfig(Config):
    db: str = option(DEFAULT_DB, DB_HELP)
    name: str = option("", "the annotator's name (unique)")
    admin: bool = option(False, "may open the admin page")

    def check(self) -> None:
        if not self.name:
            raise ConfigError("give --name")


def add_annotator(cfg: AddAnnotatorConfig) -> str:
    store = Store(cfg.db)
    annotator, token = store.add_annotator(cfg.name, cfg.admin)
    role = "admin" if annotator.is_admin else "annotator"
    print(f"{role} {annotator.name!r} added. Token (shown once; only its SHA-256 is stored):\n{token}")
    return token


@dataclass
class RevokeTokenConfig(Config):
    db: str = option(DEFAULT_DB, DB_HELP)
    name: str = option("", "the annotator whose token is replaced (their sessions end too)")

    def check(self) -> None:
        if not self.name:
            raise ConfigError("give --name")


def revoke_token(cfg: RevokeTokenConfig) -> str:
    store = Store(cfg.db, create=False)
    token = store.rotate_token(cfg.name)
    print(f"{cfg.name!r}: the old token no longer works and every session is ended. New token (shown once):\n"
          f"{token}")
    return token


@dataclass
class ServeConfig(Config):
    db: str = option(DEFAULT_DB, DB_HELP)
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only; put TLS in front to go wider)")
    port: int = option(8000, "port", at_least=1, at_most=65535)
    project: str = option("", "serve only this project (name or id); default: all")
    max_body_kib: int = option(64, "largest request body in KiB (larger: 413)", at_least=1)
    secure_cookies: bool = option(False, "mark cookies Secure (behind HTTPS)")


def serve(cfg: ServeConfig) -> None:
    from moss_rlhf.feedback.app import serve as run_server

    store = Store(cfg.db, create=False)
    print(f"feedback serve: http://{cfg.host}:{cfg.port}/  (database {store.display_url})")
    run_server(store, cfg.host, cfg.port, cfg.project or None, cfg.max_body_kib * 1024, cfg.secure_cookies)


@dataclass
class SimulateConfig(AnnotatorModel):
    db: str = option(DEFAULT_DB, DB_HELP)
    project: str = option("", "project (name or id); default: all")
    annotators: int = option(3, "number of simulated annotators (sim-1, sim-2, ...)", at_least=1)
    names: list[str] = option([], "annotator names instead (repeat the flag)")
    seed: int = option(0, "random seed")
    limit: int = option(0, "judgements per annotator (0: everything they can get)", at_least=0)
    url: str = option("", "post over HTTP to this running server (e.g. http://127.0.0.1:8000) instead of the store")


def simulate(cfg: SimulateConfig):
    from moss_rlhf.feedback import simulate as sim

    store = Store(cfg.db, create=False)
    model = AnnotatorModel(temperature=cfg.temperature, error_rate=cfg.error_rate, much_above=cfg.much_above,
                           seconds_base=cfg.seconds_base, ms_per_char=cfg.ms_per_char)
    names = cfg.names or [f"sim-{n + 1}" for n in range(cfg.annotators)]
    limit = cfg.limit or None
    if cfg.url:
        tokens = [store.add_annotator(name)[1] for name in names]
        summary, _ = sim.simulate_http(cfg.url, tokens, model, cfg.seed, limit=limit)
    else:
        summary = sim.simulate(store, cfg.project or None, names, model, cfg.seed, limit=limit)
    rate = "n/a" if math.isnan(summary.agreement) else f"{summary.agreement:.1%}"
    print(f"feedback simulate: {len(names)} annotators made {summary.judgements} judgements; "
          f"{rate} agree with the judge's best response")
    return summary


@dataclass
class AgreementConfig(Config):
    db: str = option(DEFAULT_DB, DB_HELP)
    project: str = option("", "project (name or id); default: the first")
    out: str = option("", "also write the report as JSON here")


def agreement(cfg: AgreementConfig) -> dict:
    from moss_rlhf.feedback.agreement import project_agreement

    store = Store(cfg.db, create=False)
    pid = store.require_project(cfg.project or None)
    if pid is None:
        projects = store.projects()
        if not projects:
            raise ConfigError("the database holds no project")
        pid = projects[0]["id"]
    report = project_agreement(store.items(pid), store.judgements(pid)).to_json()

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    print(f"items {report['items']}, judged {report['judged_items']}, judgements {report['judgements']}")
    print(f"Krippendorff's alpha (nominal) {fmt(report['krippendorff_alpha'])}; Fleiss' kappa "
          f"{fmt(report['fleiss_kappa'])} over {report['fleiss_items']} items x {report['raters_per_item']} raters; "
          f"mean Cohen's kappa {fmt(report['mean_cohen_kappa'])} over {report['cohen_pairs']} pairs")
    for name, g in report["consensus"].items():
        gold = report["gold"].get(name)
        gold_text = f", gold {gold['agree']}/{gold['total']}" if gold else ""
        print(f"  {name}: agrees with the others' majority {g['agree']}/{g['total']} ({fmt(g['rate'])}){gold_text}")
    if cfg.out:
        atomic_write_text(Path(cfg.out), json.dumps(report, indent=2) + "\n")
    return report


@dataclass
class ExportConfig(ExportOptions):
    db: str = option(DEFAULT_DB, DB_HELP)
    project: str = option("", "project (name or id); default: all")
    out: str = option("feedback/preferences.jsonl", "preference JSONL for the reward model")
    ties_out: str = option("", "also write tie / both-bad majorities here (they are not preference pairs)")
    kto_out: str = option("", "also write KTO records {prompt, completion, label} here: ratings (see "
                              "--kto-desirable-min, --kto-undesirable-max) and 'both bad' answers, per response")
    raw_out: str = option("", "also dump every judgement (retracted ones flagged) as JSONL here")


def export(cfg: ExportConfig):
    from moss_rlhf.feedback.export import dump_judgements, export_preferences

    store = Store(cfg.db, create=False)
    opts = ExportOptions(**{k: getattr(cfg, k) for k in ExportOptions.__dataclass_fields__})
    summary = export_preferences(store, cfg.project or None, cfg.out, opts, cfg.ties_out or None, cfg.kto_out or None)
    agreement = "n/a" if summary.mean_agreement is None else f"{summary.mean_agreement:.2f}"
    print(f"feedback export: {summary.pairs} pairs from {summary.judgements} judgements on {summary.items} items "
          f"-> {cfg.out} (mean agreement {agreement}; {summary.ties} tie/both-bad, {summary.undecided} undecided, "
          f"{summary.below_agreement} below --min-agreement, {summary.identical} of identical replies left out)")
    if cfg.kto_out:
        print(f"feedback export: {summary.desirable} desirable and {summary.undesirable} undesirable KTO records -> "
              f"{cfg.kto_out}")
    if cfg.raw_out:
        n = dump_judgements(store, cfg.project or None, cfg.raw_out)
        print(f"feedback export: {n} judgement rows -> {cfg.raw_out}")
    return summary


@dataclass
class RelabelConfig(Config):
    db: str = option(DEFAULT_DB, DB_HELP)
    name: str = option("", "the new project's name")
    strength: str = option("", "a `moss-rlhf reward strength` output (strength.jsonl)")
    count: int = option(100, "pairs to send back: the most uncertain (|mean strength| − std smallest) first",
                        at_least=1)
    annotators_per_item: int = option(2, "annotators who judge each pair again", at_least=1)
    guideline_version: str = option("1", "guideline version recorded with every judgement")
    guidelines: str = option("", "a text file of labelling guidelines shown on the labelling page")
    append: bool = option(False, "add the items to an existing project of that name")

    def check(self) -> None:
        if not self.name or not self.strength:
            raise ConfigError("give --name and --strength")


def relabel(cfg: RelabelConfig) -> int:
    from moss_rlhf.feedback.relabel import create_relabel_project

    store = Store(cfg.db)
    pid, added = create_relabel_project(store, cfg.name, cfg.strength, cfg.count, cfg.annotators_per_item,
                                        cfg.guideline_version, _guidelines(cfg.guidelines), cfg.append)
    print(f"feedback relabel: project {cfg.name!r} (id {pid}) has the {added} most uncertain pairs of "
          f"{cfg.strength} -> {store.display_url}")
    return pid


COMMANDS = {
    "create": ("sample k responses per prompt from saved models into a new labelling project", CreateConfig, create),
    "import": ("import prompts with candidate responses (JSONL) into a new labelling project", ImportConfig, import_),
    "add-annotator": ("add an annotator (or --admin) and print their token once", AddAnnotatorConfig, add_annotator),
    "revoke-token": ("replace an annotator's token (the old one stops working, sessions end)", RevokeTokenConfig,
                     revoke_token),
    "serve": ("run the labelling web app (binds 127.0.0.1 by default)", ServeConfig, serve),
    "simulate": ("label with simulated annotators (the demo world's judge plus Bradley–Terry noise)", SimulateConfig,
                 simulate),
    "agreement": ("inter-annotator agreement: Cohen, Fleiss, Krippendorff, consensus and gold", AgreementConfig,
                  agreement),
    "export": ("write preference pairs for the reward model (and a raw dump of every judgement)", ExportConfig, export),
    "relabel": ("a project of the pairs the reward-model ensemble is least sure of (active learning)", RelabelConfig,
                relabel),
}
