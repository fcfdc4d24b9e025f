"""The fine-tuning configuration: defaults, then the model's config.yaml, then `--config`, then
FunASR-style `++a.b=c` overrides. FunASR's `train_conf` keys keep their meaning."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from paratune.train.schema import SCHEMA

DEFAULTS = {
    "train_conf": {"max_epoch": 10, "accum_grad": 1, "grad_clip": 5.0, "keep_nbest_models": 5,
                   "avg_nbest_model": 3, "log_interval": 50, "save_checkpoint_interval": 500,
                   "validate_interval": 0, "seed": 0, "collective_timeout_s": 1800},
    "optim_conf": {"lr": 0.0002, "weight_decay": 0.0, "optimizer": "adamw"},  # adamw | sgd
    "scheduler_conf": {"warmup_steps": 1000},
    "dataset_conf": {"buffer_size": 20000, "buckets": None, "num_workers": 2, "costliest_first": True,
                     "specaug": True, "max_batch": None, "speed_perturb": None, "gain_db": 0.0, "noise_snr_db": None, "tilt": 0.0,
                     "hotword_min_length": 2, "hotword_max_length": 8, "hotword_sample_rate": 0.75,
                     "hotword_double_rate": 0.1},  # SeACo only: FunASR's hotword sampling
    # collective_timeout_s: how long a rank waits in any collective (a dead or stuck peer) before it stops;
    # fit_timeout_s: how long other ranks wait for rank 0's memory fit before they give up
    "memory": {"precision": "fp32", "checkpointing": "auto", "optimizer_state": "auto", "margin": None,
               "cpu_track_every": 10, "fit_timeout_s": 1800},
    "freeze": [],
    "lora": {"r": 0, "alpha": 16.0, "dropout": 0.05, "targets": None},  # r > 0: train LoRA adapters only
}


class ConfigError(ValueError):
    pass


def merge(base: dict, extra: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        if k not in out:
            continue  # FunASR configs carry many sections paratune has no use for (model, frontend, ...)
        if isinstance(out[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {k} must be a mapping, got {v!r}")
            out[k] = {**out[k], **{kk: vv for kk, vv in v.items()}}
        else:
            out[k] = v
    return out


def apply_override(config: dict, text: str) -> dict:
    """`++train_conf.max_epoch=1` -> config["train_conf"]["max_epoch"] = 1 (value parsed as YAML)."""
    if not text.startswith("++") or "=" not in text:
        raise ConfigError(f"override {text!r}: expected ++section.key=value")
    path, _, raw = text[2:].partition("=")
    keys = path.split(".")
    node, schema = config, SCHEMA
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict) or not isinstance(schema.get(k), dict):
            raise ConfigError(f"override {text!r}: no section {k!r} (sections: {', '.join(SCHEMA)})")
        node, schema = node[k], schema[k]
    # only keys paratune reads: a FunASR key from the model's config.yaml would be set and never used
    if keys[-1] not in schema:
        raise ConfigError(f"override {text!r}: unknown key {keys[-1]!r} in {'.'.join(keys[:-1]) or 'config'} "
                          f"(known: {', '.join(schema)})")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {e}") from e
    return config


# command-line flags that `paratune plan` and `paratune finetune` both take, and where each goes
FLAGS = {"precision": ("memory", "precision"), "checkpointing": ("memory", "checkpointing"),
         "optimizer_state": ("memory", "optimizer_state"),
         "margin": ("memory", "margin"), "optimizer": ("optim_conf", "optimizer"), "freeze": ("freeze",),
         "max_batch": ("dataset_conf", "max_batch"), "buffer_size": ("dataset_conf", "buffer_size"),
         "buckets": ("dataset_conf", "buckets"), "costliest_first": ("dataset_conf", "costliest_first"),
         "seed": ("train_conf", "seed")}


def apply_flags(config: dict, flags: dict) -> dict:
    """Flags given on the command line (not None) override the configuration, which is then checked."""
    origins = {}
    for name, path in FLAGS.items():
        value = flags.get(name)
        if value is None:
            continue
        node = config
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = list(value) if isinstance(value, (list, tuple)) else value
        origins[".".join(path)] = "--" + name.replace("_", "-")
    validate(config, origins)
    return config


def _read_config_file(config_file: Path) -> dict:
    """A `--config` YAML: only sections and keys paratune knows (a typo would otherwise do nothing)."""
    try:
        extra = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{config_file}: {e}") from e
    if not isinstance(extra, dict):
        raise ConfigError(f"{config_file}: expected a mapping of sections, got {type(extra).__name__}")
    unknown = set(extra) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"{config_file}: unknown section(s) {', '.join(sorted(map(str, unknown)))} "
                          f"(known: {', '.join(DEFAULTS)})")
    for section, values in extra.items():
        if isinstance(SCHEMA[section], dict) and isinstance(values, dict):
            bad = set(values) - set(SCHEMA[section])
            if bad:
                raise ConfigError(f"{config_file}: unknown key(s) {', '.join(sorted(map(str, bad)))} in {section} "
                                  f"(known: {', '.join(SCHEMA[section])})")
    return extra


def _origins(layer: dict, where: str) -> dict:
    """Which layer set each known key, so that a refusal can say where the value came from."""
    out = {}
    for section, values in layer.items():
        if section in SCHEMA:
            out[section] = where
            if isinstance(values, dict) and isinstance(SCHEMA[section], dict):
                out.update({f"{section}.{k}": where for k in values if k in SCHEMA[section]})
    return out


def load_config(model_config: dict, config_file: Path | None, overrides: list[str]) -> dict:
    """Defaults < the model's config.yaml < --config < ++overrides, merged, then checked (`validate`)."""
    config = merge(DEFAULTS, model_config, "model config.yaml")
    origins = _origins(model_config or {}, "the model's config.yaml")
    if config_file is not None:
        extra = _read_config_file(config_file)
        config = merge(config, extra, str(config_file))
        origins.update(_origins(extra, str(config_file)))
    for text in overrides:
        config = apply_override(config, text)
        origins[text[2:].partition("=")[0]] = text
    validate(config, origins)
    return config


def validate(config: dict, origins: dict | None = None) -> None:
    """Every key paratune reads has its type and range (paratune.train.schema); keys it does not read
    (FunASR's, from the model's config.yaml) are left alone. Raises ConfigError naming the key."""
    origins = origins or {}

    def refuse(key: str, what: str, value) -> None:
        where = origins.get(key) or origins.get(key.partition(".")[0])
        raise ConfigError(f"{key}: expected {what}, got {value!r}" + (f" (from {where})" if where else ""))

    for section, schema in SCHEMA.items():
        value = config.get(section)
        if not isinstance(schema, dict):
            if not schema.ok(value):
                refuse(section, schema.expected(), value)
            continue
        if not isinstance(value, dict):
            refuse(section, f"a mapping of {', '.join(schema)}", value)
        for key, check in schema.items():
            v = value.get(key)
            if key == "checkpointing" and isinstance(v, bool):  # YAML 1.1 reads `on`/`off` as booleans
                v = value[key] = "on" if v else "off"
            if not check.ok(v):
                refuse(f"{section}.{key}", check.expected(), v)
