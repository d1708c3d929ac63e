"""moss-rlhf: tokenizer → pretraining → SFT → human feedback → reward model → PPO-max → evaluation → use.

Importing the package is cheap: heavy modules (torch, transformers) load only when a stage runs.
"""

__version__ = "0.1.0"


def load(path: str, **kwargs):
    """Load a saved model (a Hugging Face directory or hub id) as an :class:`moss_rlhf.assistant.Assistant`."""
    from moss_rlhf.assistant import Assistant

    return Assistant.from_pretrained(path, **kwargs)


__all__ = ["__version__", "load"]
