"""Building models from FunASR configs: one dict of classes, and values paratune does not implement refused."""
from __future__ import annotations

import pytest
import yaml

from paratune.model import MODELS, BiCifParaformer, ConfigError, Paraformer, SeacoParaformer, build_paraformer
from tests.model.reference import small_config


def _family(shared_data, kind: str) -> dict:
    config = small_config(yaml.safe_load((shared_data / "paraformer_family" / kind / "config.yaml").read_text()))
    if kind == "seaco":
        config["model_conf"]["inner_dim"] = 64
    return config


def test_the_config_names_the_class(shared_data, large_dir):
    assert MODELS == {"Paraformer": Paraformer, "BiCifParaformer": BiCifParaformer, "SeacoParaformer": SeacoParaformer}
    assert type(build_paraformer(small_config(yaml.safe_load((large_dir / "config.yaml").read_text())), 40, 560)) \
        is Paraformer
    assert type(build_paraformer(_family(shared_data, "bicif"), 40, 560)) is BiCifParaformer
    assert type(build_paraformer(_family(shared_data, "seaco"), 8404, 560)) is SeacoParaformer  # NO_BIAS 8377


@pytest.mark.parametrize("kind, section, key, value, said", [
    ("seaco", "model_conf", "bias_encoder_bid", True, "bias_encoder_bid: true is not supported"),
    ("seaco", "model_conf", "NO_BIAS", 40, "NO_BIAS 40 is not a token id"),
    ("seaco", "model_conf", "bias_encoder_type", "mean", "bias_encoder_type 'mean' is not supported"),
    ("bicif", "predictor_conf", "upsample_type", "cnn_attn", "upsample_type 'cnn_attn' is not supported"),
    ("bicif", None, "predictor", "CifPredictorV2", "predictor: CifPredictorV3"),
    ("seaco", None, "seaco_decoder", None, "seaco_decoder: ParaformerSANMDecoder"),
    ("seaco", "model_conf", "use_seaco", 1, "unknown key model_conf.use_seaco"),
])
def test_what_paratune_does_not_build_is_refused_by_name(shared_data, kind, section, key, value, said):
    config = _family(shared_data, kind)
    (config[section] if section else config)[key] = value
    with pytest.raises(ConfigError, match="family/config.yaml: .*") as e:
        build_paraformer(config, 40, 560, source="family/config.yaml")
    assert said in str(e.value)
