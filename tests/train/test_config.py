"""Every configuration value is checked when the configuration is read, naming the key (issue 13, defect 8)."""
from pathlib import Path

import pytest
import yaml

from paratune.train.config import DEFAULTS, ConfigError, apply_flags, load_config
from paratune.train.schema import SCHEMA

DEMO = Path(__file__).resolve().parents[2] / "paratune" / "assets" / "demo_model" / "config.yaml"


@pytest.mark.parametrize("override, key", [
    ("++train_conf.max_epoch=0", "train_conf.max_epoch"),  # exported the untouched input model
    ("++train_conf.max_epoch=abc", "train_conf.max_epoch"),
    ("++train_conf.max_epoch=true", "train_conf.max_epoch"),  # a bool is not an int
    ("++train_conf.max_epoch=10.5", "train_conf.max_epoch"),
    ("++train_conf.log_interval=0", "train_conf.log_interval"),  # crashed mid-run
    ("++memory.cpu_track_every=0", "memory.cpu_track_every"),
    ("++train_conf.accum_grad=0", "train_conf.accum_grad"),
    ("++train_conf.save_checkpoint_interval=-1", "train_conf.save_checkpoint_interval"),
    ("++train_conf.keep_nbest_models=0", "train_conf.keep_nbest_models"),
    ("++train_conf.grad_clip=-1", "train_conf.grad_clip"),
    ("++train_conf.seed=x", "train_conf.seed"),
    ("++optim_conf.lr=0", "optim_conf.lr"),
    ("++optim_conf.lr=.inf", "optim_conf.lr"),
    ("++optim_conf.optimizer=adam", "optim_conf.optimizer"),
    ("++scheduler_conf.warmup_steps=-5", "scheduler_conf.warmup_steps"),
    ("++dataset_conf.speed_perturb=[0.0]", "dataset_conf.speed_perturb"),
    ("++dataset_conf.speed_perturb=[]", "dataset_conf.speed_perturb"),
    ("++dataset_conf.noise_snr_db=5", "dataset_conf.noise_snr_db"),  # a scalar where a list belongs
    ("++dataset_conf.noise_snr_db=[20,5]", "dataset_conf.noise_snr_db"),
    ("++dataset_conf.tilt=1", "dataset_conf.tilt"),
    ("++dataset_conf.buffer_size=0", "dataset_conf.buffer_size"),
    ("++dataset_conf.max_batch=0", "dataset_conf.max_batch"),
    ("++dataset_conf.buckets=1.0", "dataset_conf.buckets"),
    ("++dataset_conf.specaug=maybe", "dataset_conf.specaug"),
    ("++memory.precision=fp8", "memory.precision"),
    ("++memory.margin=-0.1", "memory.margin"),
    ("++memory.fit_timeout_s=0", "memory.fit_timeout_s"),
    ("++train_conf=5", "train_conf"),  # a section replaced by a scalar
    ("++freeze=5", "freeze"),
    ("++lora.r=-1", "lora.r"),
    ("++lora.dropout=1.0", "lora.dropout"),
    ("++lora.targets=[1]", "lora.targets"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected .*\(from \+\+"):
        load_config({}, None, [override])


@pytest.mark.parametrize("override", [
    "++train_conf.grad_clip=0", "++train_conf.grad_clip=null", "++dataset_conf.speed_perturb=[0.9,1.0,1.1]",
    "++dataset_conf.noise_snr_db=[5,20]", "++dataset_conf.buckets=1.1", "++memory.margin=0.2",
    "++freeze=[encoder.]", "++lora.targets=[linear_q]", "++memory.checkpointing=off"])
def test_good_values_load(override):
    load_config({}, None, [override])


def test_checkpointing_on_off_read_by_yaml_as_bools():
    assert load_config({}, None, ["++memory.checkpointing=on"])["memory"]["checkpointing"] == "on"


@pytest.fixture
def large(large_dir):
    return large_dir / "config.yaml"


def test_model_configs_with_funasr_keys_load(large):
    for path in (large, DEMO):
        config = load_config(yaml.safe_load(path.read_text(encoding="utf-8")), None, [])
        assert config["train_conf"]["max_epoch"] >= 1
    config = load_config(yaml.safe_load(large.read_text(encoding="utf-8")), None, [])
    assert config["dataset_conf"]["batch_type"] == "example"  # kept, not refused: FunASR's, not paratune's


def test_a_bad_value_in_the_model_config_names_it():
    with pytest.raises(ConfigError, match=r"train_conf.max_epoch: .*model's config.yaml"):
        load_config({"train_conf": {"max_epoch": 0}}, None, [])


def test_unknown_keys_from_the_user_are_refused(tmp_path, large):
    model_config = yaml.safe_load(large.read_text(encoding="utf-8"))
    with pytest.raises(ConfigError, match="unknown key 'batch_type'"):  # FunASR's key, never read by paratune
        load_config(model_config, None, ["++dataset_conf.batch_type=token"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_conf: {max_epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key\(s\) max_epochs in train_conf"):
        load_config({}, cfg, [])
    cfg.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config({}, cfg, [])
    cfg.write_text("freeze: 5\n")
    with pytest.raises(ConfigError, match=r"^freeze: expected .*c.yaml"):
        load_config({}, cfg, [])


def test_bad_yaml_in_an_override_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config({}, None, ["++dataset_conf.speed_perturb=[0.9"])


def test_flags_are_checked_and_named():
    config = load_config({}, None, [])
    with pytest.raises(ConfigError, match=r"dataset_conf.max_batch: .*--max-batch"):
        apply_flags(config, {"max_batch": 0})
    with pytest.raises(ConfigError, match=r"dataset_conf.buckets: .*--buckets"):
        apply_flags(load_config({}, None, []), {"buckets": 0.5})


def test_every_default_key_has_a_check():
    for section, values in DEFAULTS.items():
        assert section in SCHEMA
        if isinstance(values, dict):
            assert set(values) == set(SCHEMA[section]), section


@pytest.mark.parametrize("command", ["plan", "finetune"])
def test_cli_refuses_before_reading_data(command, tmp_path, capsys):
    from paratune.cli import main
    model = Path(__file__).resolve().parents[2] / "paratune" / "assets" / "demo_model"
    missing = tmp_path / "nothing.jsonl"  # never read: the configuration is refused first
    args = (["plan", "--model", str(model), "--data", str(missing), "--budget", "1GiB", "--device", "cpu"]
            if command == "plan" else
            ["finetune", "--model", str(model), "--train", str(missing), "--output", str(tmp_path / "exp")])
    assert main([*args, "++train_conf.max_epoch=abc"]) == 2
    err = capsys.readouterr().err
    assert "train_conf.max_epoch" in err and "integer" in err and "nothing.jsonl" not in err
