"""``moss-rlhf plan``: how much device memory each model of a run takes per process — weights, gradients and AdamW
state — for the chosen parallelism, before anything is loaded (the models are built on PyTorch's ``meta`` device
from their ``config.json``, which allocates nothing).

What it counts, per process of ``--processes``:

* a trained model (policy, critic, the model of pretraining, SFT, reward or DPO): fp32 weights, fp32 gradients and
  AdamW's two fp32 moments — 16 bytes per parameter — whole under DDP, 1/N under FSDP (``--cpu-offload`` moves the
  shards and the optimizer step to the host);
* a frozen model (reference, reward model): its weights only, whole under DDP, 1/N under FSDP;
* with ``--lora-r``, the trained model's base is frozen (weights only) and its adapters are trained (16 bytes per
  adapter parameter); RL's reference is then the policy without its adapters, no model of its own;
* under FSDP, one transformer block gathered whole for its forward or backward (two with prefetching); for RL the
  sampler's whole copy of the policy (sampling runs on it: see ``distributed``), in bf16 with ``--precision bf16``
  (then under DDP too: the bf16 rollouts' weights).

Activations, the sampler's KV cache and the CUDA context come on top; ``--activation-checkpointing`` shrinks the
first. The training loops log what they measure (``memory/*`` in ``metrics.jsonl``) for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

from moss_rlhf.config import Config, ConfigError, option

MB = 2 ** 20


@dataclass
class PlanConfig(Config):
    model: str = option("", "trained model: a size preset (tiny, mini, small, base) or a saved model's directory (the "
                            "policy of RL; the model of pretrain, SFT, reward, DPO)")
    critic: str = option("", "trained critic (RL with GAE); a saved model's directory")
    reference: str = option("", "frozen reference (RL, DPO)")
    reward_model: str = option("", "frozen reward model (RL)")
    vocab_size: int = option(8000, "vocabulary size for a size preset", at_least=1)
    processes: int = option(1, "processes (GPUs) the run is spread over", at_least=1)
    parallel: str = option("ddp", "ddp or fsdp", choices=("ddp", "fsdp"))
    precision: str = option("fp32", "fp32, or bf16 (FSDP on a GPU gathers and computes in bf16)",
                            choices=("fp32", "bf16"))
    cpu_offload: bool = option(False, "fsdp: shards and optimizer state on the host")
    rl: bool = option(False, "count the sampler's whole copy of the policy (online RL under FSDP or in "
                                   "bf16)")
    lora_r: int = option(0, "LoRA rank of the trained model (0: every weight trained)", at_least=0)

    def check(self) -> None:
        if not self.model:
            raise ConfigError("give --model (a size preset or a saved model's directory)")
        if self.cpu_offload and self.parallel != "fsdp":
            raise ConfigError("--cpu-offload needs --parallel fsdp")


def parameter_counts(name: str, vocab_size: int = 8000, lora_r: int = 0) -> tuple[int, int, int]:
    """(all parameters, the largest transformer block's, the trained ones) of a preset or a saved model, built on
    the meta device; with ``lora_r`` its LoRA adapters (every linear layer, as the stages add them) included."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from moss_rlhf.models import PRESETS, LoraOptions, apply_lora, check_model_path

    if name in PRESETS:
        config = LlamaConfig(**PRESETS[name], vocab_size=vocab_size, tie_word_embeddings=True)
    else:
        check_model_path(name, "--model")
        config = AutoConfig.from_pretrained(name)
    scorer = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if scorer else AutoModelForCausalLM).from_config(config)
        model = apply_lora(model, LoraOptions(lora_r))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    largest = max((sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in blocks),
                  default=0)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in model.parameters()), largest, trained


@dataclass
class ModelMemory:
    role: str
    parameters: int
    trained: bool
    weights: float      # bytes per process, on the device
    gradients: float
    optimizer: float
    host: float         # bytes per process on the host (CPU offload)


def sampler_copies_policy(cfg: PlanConfig) -> bool:
    """Whether RL's sampler holds a whole copy of the policy: a sharded policy cannot sample, and bf16 rollouts come
    from a bf16 copy of the fp32 weights (``sampling.builtin``)."""
    return cfg.rl and (cfg.parallel == "fsdp" or cfg.precision == "bf16")


def plan(cfg: PlanConfig) -> tuple[list[ModelMemory], float]:
    """Each model's memory per process, and the transient memory of FSDP (gathered blocks, the sampler's copy)."""
    share = 1 / cfg.processes if cfg.parallel == "fsdp" else 1.0
    rows, transient = [], 0.0
    gathered_bytes = 2 if cfg.precision == "bf16" else 4
    for role, name, trained in (("policy" if cfg.reference or cfg.reward_model else "model", cfg.model, True),
                                ("critic", cfg.critic, True), ("reference", cfg.reference, False),
                                ("reward model", cfg.reward_model, False)):
        if not name:
            continue
        n, block, n_trained = parameter_counts(name, cfg.vocab_size, cfg.lora_r if role in ("policy", "model") else 0)
        n_trained *= trained
        weights, gradients, optimizer = 4 * n * share, 4 * n_trained * share, 8 * n_trained * share
        host = 0.0
        if cfg.cpu_offload:
            host, weights, gradients, optimizer = weights + gradients + optimizer, 0.0, 0.0, 0.0
        rows.append(ModelMemory(role, n, trained, weights, gradients, optimizer, host))
        if cfg.parallel == "fsdp":  # on one process too: FSDP gathers each block into buffers of its own
            transient = max(transient, 2 * gathered_bytes * block * (1 + trained))  # weights (+ gradients)
    if sampler_copies_policy(cfg):
        transient += gathered_bytes * rows[0].parameters
    return rows, transient


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.1f} GB" if n_bytes >= 2 ** 30 else f"{n_bytes / MB:.1f} MB"


def describe(cfg: PlanConfig) -> str:
    rows, transient = plan(cfg)
    how = (f"{cfg.parallel} over {cfg.processes} process(es)" + (", CPU offload" if cfg.cpu_offload else ""))
    lines = [f"memory per process ({how}); activations, KV cache and the CUDA context come on top",
             f"{'model':<14}{'parameters':>15}{'weights':>11}{'gradients':>11}{'AdamW':>11}{'host':>11}"]
    for r in rows:
        lines.append(f"{r.role:<14}{r.parameters:>15,}{size(r.weights):>11}{size(r.gradients):>11}"
                     f"{size(r.optimizer):>11}{size(r.host):>11}")
    total = sum(r.weights + r.gradients + r.optimizer for r in rows)
    lines.append(f"{'total':<14}{'':>15}{size(total):>11} on the device"
                 + (f", {size(sum(r.host for r in rows))} on the host" if cfg.cpu_offload else ""))
    if transient:
        parts = [name for name, counted in (("blocks gathered for compute", cfg.parallel == "fsdp"),
                                            ("the sampler's whole policy copy", sampler_copies_policy(cfg))) if counted]
        lines.append(f"{'transient':<14}{'':>15}{size(transient):>11} ({', '.join(parts)})")
    return "\n".join(lines)


def run(cfg: PlanConfig) -> str:
    text = describe(cfg)
    print(text)
    return text
