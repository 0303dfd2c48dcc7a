"""Training: fine-tuning (full or LoRA), MTP drafter distillation, DDP and DiLoCo on torch.distributed.

    from unigemma.train import load_train_config, train
    result = train(load_train_config("examples/train.yaml"))

Modules: config (the YAML/TOML schema), data (chat JSONL → masked token batches), loop (the trainer),
lora (adapters and merging), drafter (distillation and acceptance), diloco (DDP hook, DiLoCo), cli
(`unigemma train CONFIG`). Nothing outside this package imports it.
"""

from .config import TrainConfig, TrainConfigError, from_dict, load_train_config

__all__ = ["TrainConfig", "TrainConfigError", "from_dict", "load_train_config", "train"]


def train(cfg, ctx=None):
    """Run a training config (see loop.train); imported lazily so that `import unigemma.train` stays light."""
    from .loop import train as _train

    return _train(cfg, ctx)
