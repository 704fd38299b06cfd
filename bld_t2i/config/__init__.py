"""One typed config tree for every entry point.

The defaults are the dataclasses of `schema` (training and the models) and `tools` (shard
making, encoding, sampling, evaluation). A recipe YAML in `recipes/` overrides them, an entry
point's flags override the recipe, and `section.key=value` overrides come last. Unknown keys,
wrong types and choices outside a field's `Literal` are errors that name the key and the
nearest valid one. Each component receives only its own section (`cfg.denoiser`, ...); each
entry point prints (`--dry-run`) and saves the sections it uses.
"""

from bld_t2i.config.loading import (
    Flag,
    config_from_cli,
    dump_yaml,
    entry_config,
    from_dict,
    load_config,
    save_config,
    to_dict,
    to_sections,
)
from bld_t2i.config.schema import (
    AELossConfig,
    AutoencoderConfig,
    DataConfig,
    DenoiserConfig,
    DiffusionConfig,
    LatentsConfig,
    LogConfig,
    OptimConfig,
    RunConfig,
    StreamConfig,
    TextEncoderConfig,
    TrainConfig,
)
from bld_t2i.config.tools import Config, EncodeConfig, EvaluateConfig, SampleConfig, ShardsConfig
from bld_t2i.config.types import ConfigError

__all__ = [
    "AELossConfig", "AutoencoderConfig", "Config", "ConfigError", "DataConfig", "DenoiserConfig", "DiffusionConfig",
    "EncodeConfig", "EvaluateConfig", "Flag", "LatentsConfig", "LogConfig", "OptimConfig", "RunConfig",
    "SampleConfig", "ShardsConfig", "StreamConfig", "TextEncoderConfig", "TrainConfig", "config_from_cli",
    "dump_yaml", "entry_config", "from_dict", "load_config", "save_config", "to_dict", "to_sections",
]
