"""The published online-RL recipes as values of ``moss-rlhf rl``'s switches: ``--preset NAME`` fills every switch
left unset (None) with the recipe's value, and explicit flags win (``stages.rl.resolve_preset``). PPO-max: Zheng et
al. 2023 (arXiv 2307.04964); GRPO: Shao et al. 2024 (DeepSeekMath); Dr.GRPO: Liu et al. 2025; DAPO: Yu et al. 2025;
RLOO: Ahmadian et al. 2024; REINFORCE++: Hu 2025; ReMax: Li et al. 2023."""

_CRITIC_FREE = dict(use_critic=False, reward_norm=False, reward_clip=0.0, advantage_clip=0.0, value_clip=0.0,
                    critic_from_reward=False, max_grad_norm=1.0, critic_max_grad_norm=0.0, dynamic_sampling=False,
                    overlong_buffer=0.0, std_scaling="group", whiten_advantages=False)
_GRPO = dict(_CRITIC_FREE, advantage="grpo", group_size=4, kl_coef=0.04, kl_placement="loss", kl_estimator="k3",
             loss_agg="seq_mean_token_mean")
# Switches a preset decides; left at None on the command line they come from --preset.
PRESETS: dict[str, dict] = {
    # The paper's PPO-max: reward normalisation + clipping, per-token KL penalty in the reward, value clipping,
    # advantage whitening, critic initialised from the reward model, global gradient clipping.
    "ppo_max": dict(advantage="gae", group_size=1, use_critic=True, reward_norm=True, reward_clip=5.0, kl_coef=0.1,
                    kl_placement="reward", kl_estimator="k1", whiten_advantages=True, advantage_clip=0.0,
                    value_clip=0.2, critic_from_reward=True, max_grad_norm=1.0, critic_max_grad_norm=1.0,
                    loss_agg="token_mean", std_scaling="group", dynamic_sampling=False, overlong_buffer=0.0),
    # Plain PPO: raw rewards, no KL penalty, no whitening or clipping of anything but the policy ratio.
    "vanilla": dict(advantage="gae", group_size=1, use_critic=True, reward_norm=False, reward_clip=0.0, kl_coef=0.0,
                    kl_placement="reward", kl_estimator="k1", whiten_advantages=False, advantage_clip=0.0,
                    value_clip=0.0, critic_from_reward=False, max_grad_norm=0.0, critic_max_grad_norm=0.0,
                    loss_agg="token_mean", std_scaling="group", dynamic_sampling=False, overlong_buffer=0.0),
    # DeepSeekMath's GRPO: group-normalised outcome advantages, k3 KL in the loss (β 0.04), per-sequence token mean.
    "grpo": _GRPO,
    # Dr.GRPO: no std scaling, token sums over a constant (no length or difficulty bias).
    "dr_grpo": dict(_GRPO, std_scaling="none", loss_agg="seq_mean_token_sum_norm"),
    # DAPO: clip-higher (0.28), dynamic sampling, token mean over the batch, soft overlong punishment, no KL.
    "dapo": dict(_GRPO, kl_coef=0.0, clip_eps_high=0.28, dynamic_sampling=True, loss_agg="token_mean",
                 overlong_buffer=0.2),
    # RLOO: leave-one-out baselines, the KL (k1) in the sequence reward.
    "rloo": dict(_CRITIC_FREE, advantage="rloo", group_size=4, kl_coef=0.05, kl_placement="reward", kl_estimator="k1",
                 loss_agg="token_mean"),
    # REINFORCE++: per-token KL in the reward, reward-to-go, whitened over the global batch.
    "reinforce_pp": dict(_CRITIC_FREE, advantage="reinforce_pp", group_size=1, kl_coef=0.01, kl_placement="reward",
                         kl_estimator="k1", whiten_advantages=True, loss_agg="token_mean"),
    # ReMax: the greedy reply's reward as the baseline.
    "remax": dict(_CRITIC_FREE, advantage="remax", group_size=1, kl_coef=0.01, kl_placement="reward",
                  kl_estimator="k1", loss_agg="token_mean"),
}
GROUP_BASELINES = ("grpo", "rloo", "reinforce_pp_baseline")
RECIPE_NAMES = {"ppo_max": "PPO-max", "vanilla": "PPO", "grpo": "GRPO", "dr_grpo": "Dr.GRPO", "dapo": "DAPO",
                "rloo": "RLOO", "reinforce_pp": "REINFORCE++", "remax": "ReMax"}
