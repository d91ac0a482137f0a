"""``vapo-train``: the VAPO recipe as a thin trainer on vapo_kernels' public ops.

Modules: :mod:`.config` (options), :mod:`.task` (verifiable tasks, prefixes, error
injection), :mod:`.models` (tiny model + tokenizer, value model), :mod:`.rollout`
(generation and the packed token layout), :mod:`.vapo` (the loop), :mod:`.metrics`
(JSONL, progress, plots), :mod:`.cli` (the command).
"""

from .config import TrainConfig, parse_config
from .cli import main, train

__all__ = ["TrainConfig", "main", "parse_config", "train"]
