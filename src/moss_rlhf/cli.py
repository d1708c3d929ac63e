"""The ``moss-rlhf`` command: parses flags into a stage's typed config and calls that stage's ``run``. No logic of
its own. Every user mistake (a ``UserError``: a bad flag, a malformed file, too little data) is printed as one line
(file, line, field where they exist) and exits with status 2, without a traceback."""

from __future__ import annotations

import argparse
import sys

from moss_rlhf import __version__
from moss_rlhf.config import UserError, add_arguments, from_args


def _commands() -> dict[str, tuple[str, type, object]]:
    """name -> (one-line help, config dataclass, run function); a dict in place of the dataclass is a command group."""
    from moss_rlhf import chat, evaluate, interpret, plan, report, serve, tokenizer
    from moss_rlhf.demo import pipeline, world
    from moss_rlhf.feedback import commands as feedback
    from moss_rlhf.stages import dpo, generate, pretrain, reward, reward_eval, reward_strength, rl, sft

    return {
        "demo": ("the whole pipeline on the embedded demo world, with a report (about 10 minutes on a laptop CPU)",
                 pipeline.DemoConfig, pipeline.run),
        "demo-world": ("write the embedded demo world (corpus, tasks, flawed demonstrations, prompt splits)",
                       world.WorldConfig, world.run),
        "tokenizer": ("train a byte-level BPE tokenizer with a chat template", tokenizer.TokenizerConfig,
                      tokenizer.run),
        "pretrain": ("self-supervised pretraining (causal or masked LM)", pretrain.PretrainConfig, pretrain.run),
        "sft": ("supervised fine-tuning on conversations (assistant tokens only)", sft.SFTConfig, sft.run),
        "feedback": ("collect human feedback: labelling projects, web app, simulated annotators, agreement, export",
                     feedback.COMMANDS, None),
        "reward": ("reward models: train (the default: `moss-rlhf reward --data …`), preference strength by an "
                   "ensemble, evaluation", {
                       "train": ("train a reward model on preference pairs (Bradley–Terry)", reward.RewardConfig,
                                 reward.run),
                       "strength": ("each pair's preference strength from an ensemble of reward models (Part II)",
                                    reward_strength.StrengthConfig, reward_strength.run),
                       "eval": ("a reward model's accuracy by preference strength, calibration, length bias and "
                                "agreement with a judge", reward_eval.RewardEvalConfig, reward_eval.run)}, None),
        "rl": ("online RL from a reward model or Python rewards: PPO-max (default), GRPO, Dr.GRPO, DAPO, RLOO, "
               "REINFORCE++, ReMax (--preset)", rl.RLConfig, rl.run),
        "ppo": ("the same command as `rl` (PPO-max is its default preset)", rl.RLConfig, rl.run),
        "dpo": ("offline preference optimisation from preference pairs: DPO, cDPO, robust DPO, IPO, SLiC, SimPO, "
                "ORPO (--loss)", dpo.DPOConfig, dpo.run),
        "plan": ("memory per process of each model, its gradients and AdamW state for --parallel ddp|fsdp on N "
                 "processes, before anything is loaded", plan.PlanConfig, plan.run),
        "evaluate": ("win rate (gold judge or reward model), KL, perplexity, length, diversity of model A vs B",
                     evaluate.EvaluateConfig, evaluate.run),
        "report": ("one self-contained HTML report of a pipeline directory (curves, win rates, samples, attention)",
                   report.ReportConfig, report.run),
        "generate": ("sample replies from a saved model", generate.GenerateConfig, generate.run),
        "chat": ("chat with a model in the terminal (streaming; /reset, /exit)", chat.ChatConfig, chat.run),
        "serve": ("OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, /v1/completions",
                  serve.ServeConfig, serve.run),
        "inspect": ("tokens, attention maps per layer and head, activation and weight norms of a text",
                    interpret.InspectConfig, interpret.run),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moss-rlhf", description="moss-rlhf: tokenizer → pretraining → SFT → human feedback → reward model → RL (PPO-max, GRPO, ...) → "
                                     "evaluation → use. `moss-rlhf COMMAND --help` explains every option.")
    parser.add_argument("--version", action="version", version=f"moss-rlhf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, config_cls, fn) in _commands().items():
        if isinstance(config_cls, dict):  # a command group, e.g. `feedback create`
            group = sub.add_parser(name, help=help_text, description=help_text)
            group_sub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            for sub_name, (sub_help, sub_cls, sub_fn) in config_cls.items():
                p = group_sub.add_parser(sub_name, help=sub_help, description=sub_help)
                add_arguments(p, sub_cls)
                p.set_defaults(_config=sub_cls, _run=sub_fn)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p, config_cls)
        p.set_defaults(_config=config_cls, _run=fn)
    return parser


DEFAULT_SUBCOMMANDS = {"reward": "train"}  # `moss-rlhf reward --data …` trains, as before the group existed


def with_default_subcommand(argv: list[str]) -> list[str]:
    """``reward --data x`` → ``reward train --data x``; a named subcommand or ``--help`` is left alone."""
    if argv and argv[0] in DEFAULT_SUBCOMMANDS:
        group = _commands()[argv[0]][1]
        if len(argv) == 1 or argv[1] not in group and argv[1] not in ("-h", "--help"):
            return [argv[0], DEFAULT_SUBCOMMANDS[argv[0]], *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    from moss_rlhf import distributed

    args = build_parser().parse_args(with_default_subcommand(sys.argv[1:] if argv is None else list(argv)))
    try:
        cfg = from_args(args._config, args)
        args._run(cfg)
        distributed.shutdown(wait_for_all=True)
    except UserError as e:
        print(f"moss-rlhf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moss-rlhf {args.command}: interrupted; --resume continues from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
