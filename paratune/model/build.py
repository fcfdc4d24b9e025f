"""Building a Paraformer-family model from a FunASR `config.yaml`.

The config's `model:` names the class through `MODELS`, one plain dict: the three models FunASR users
fine-tune. Every other key is checked here: a key paratune does not know, or a value it does not
implement, is refused with its name and the file, never silently ignored.
"""
from __future__ import annotations

from torch import nn

from paratune.model.bicif import BiCifParaformer
from paratune.model.paraformer import Paraformer
from paratune.model.seaco import SeacoParaformer


class ConfigError(ValueError):
    """A model configuration paratune cannot build, with the offending key."""


# FunASR's class name -> paratune's class (and the names FunASR users know them by)
MODELS = {"Paraformer": Paraformer, "BiCifParaformer": BiCifParaformer, "SeacoParaformer": SeacoParaformer}
ALIASES = {"Paraformer": "paraformer-large", "BiCifParaformer": "paraformer-en, the -vad-punc models",
           "SeacoParaformer": "paraformer-zh"}
PREDICTOR_OF = {Paraformer: "CifPredictorV2", BiCifParaformer: "CifPredictorV3", SeacoParaformer: "CifPredictorV3"}


_SUPPORTED = {"encoder": "SANMEncoder", "decoder": "ParaformerSANMDecoder"}
_ENCODER_KEYS = {"output_size", "attention_heads", "linear_units", "num_blocks", "dropout_rate",
                 "attention_dropout_rate", "normalize_before", "kernel_size", "sanm_shfit"}
_DECODER_KEYS = {"attention_heads", "linear_units", "num_blocks", "dropout_rate", "self_attention_dropout_rate",
                 "src_attention_dropout_rate", "att_layer_num", "kernel_size", "sanm_shfit", "normalize_before"}
_PREDICTOR_KEYS = {"idim", "l_order", "r_order", "threshold", "smooth_factor", "noise_threshold",
                   "tail_threshold"}
_PREDICTOR_V3_KEYS = _PREDICTOR_KEYS | {"smooth_factor2", "noise_threshold2", "upsample_times", "upsample_type",
                                        "use_cif1_cnn"}
_SEACO_KEYS = {"inner_dim", "bias_encoder_type", "bias_encoder_dropout_rate", "bias_encoder_bid", "seaco_lsm_weight",
               "seaco_length_normalized_loss", "train_decoder", "seaco_weight", "NO_BIAS"}
_SEACO_DECODER_KEYS = {"attention_heads", "linear_units", "num_blocks", "dropout_rate", "self_attention_dropout_rate",
                       "src_attention_dropout_rate", "att_layer_num", "kernel_size", "sanm_shfit", "normalize_before",
                       "use_output_layer", "wo_input_layer"}
_MODEL_KEYS = {"lsm_weight", "length_normalized_loss", "predictor_weight", "predictor_bias", "sampling_ratio",
               "ignore_id", "blank_id", "sos", "eos"}
# keys FunASR accepts that change nothing here when they hold these values
_INERT = {
    "encoder_conf": {"input_layer": {"pe"}, "pos_enc_class": {"SinusoidalPositionEncoder"},
                     "selfattention_layer_type": {"sanm"}, "concat_after": {False},
                     "positionwise_layer_type": {"linear"}, "interctc_layer_idx": {()},
                     "lora_list": {None}, "stochastic_depth_rate": {0, 0.0}},
    "decoder_conf": {"input_layer": {"embed"}, "use_output_layer": {True}, "wo_input_layer": {False},
                     "concat_after": {False}, "lora_list": {None}},
    "predictor_conf": {"tail_mask": {True}},
    "model_conf": {"ctc_weight": {0, 0.0}, "share_embedding": {False}, "use_1st_decoder_loss": {False}},
}
_IGNORED = {"positional_dropout_rate", "padding_idx", "positionwise_conv_kernel_size", "pos_enc_class",
            "chunk_multiply_factor", "lora_rank", "lora_alpha", "lora_dropout", "dropout",
            "tf2torch_tensor_name_prefix_torch", "tf2torch_tensor_name_prefix_tf", "interctc_use_conditioning"}


def _split(section: str, conf: dict, known: set, source: str) -> dict:
    out = {}
    for key, value in (conf or {}).items():
        if key in known:
            out[key] = value
        elif key in _INERT.get(section, {}):
            v = tuple(value) if isinstance(value, list) else value
            if v not in _INERT[section][key]:
                raise ConfigError(f"{source}: {section}.{key}={value!r} is not supported by paratune "
                                  f"(supported: {sorted(map(repr, _INERT[section][key]))})")
        elif key in _IGNORED:
            continue
        else:
            raise ConfigError(f"{source}: unknown key {section}.{key}")
    return out


def model_class(config: dict, source: str = "config") -> type:
    """The class `config["model"]` names, or a ConfigError saying what paratune builds."""
    name = config.get("model")
    if name not in MODELS:
        known = "; ".join(f"{k} ({ALIASES[k]})" for k in MODELS)
        raise ConfigError(f"{source}: model is {name!r}; paratune builds {known}")
    return MODELS[name]


def build_paraformer(config: dict, vocab_size: int, input_size: int, source: str = "config") -> Paraformer:
    """Build the model a FunASR `config.yaml` describes (already parsed into a dict)."""
    cls = model_class(config, source)
    for key, expected in {**_SUPPORTED, "predictor": PREDICTOR_OF[cls]}.items():
        if config.get(key) != expected:
            raise ConfigError(f"{source}: {key} is {config.get(key)!r}; paratune builds {config['model']} "
                              f"with {key}: {expected}")
    v3 = PREDICTOR_OF[cls] == "CifPredictorV3"
    model_keys = _MODEL_KEYS | (_SEACO_KEYS if cls is SeacoParaformer else set())
    kwargs = _split("model_conf", config.get("model_conf"), model_keys, source)
    if cls is SeacoParaformer:
        if config.get("seaco_decoder") != "ParaformerSANMDecoder":
            raise ConfigError(f"{source}: seaco_decoder is {config.get('seaco_decoder')!r}; paratune builds "
                              "SeacoParaformer with seaco_decoder: ParaformerSANMDecoder")
        kwargs["seaco_decoder_conf"] = _split("seaco_decoder_conf", config.get("seaco_decoder_conf"),
                                              _SEACO_DECODER_KEYS, source)
    try:
        return cls(vocab_size=vocab_size, input_size=input_size,
                   encoder_conf=_split("encoder_conf", config.get("encoder_conf"), _ENCODER_KEYS, source),
                   decoder_conf=_split("decoder_conf", config.get("decoder_conf"), _DECODER_KEYS, source),
                   predictor_conf=_split("predictor_conf", config.get("predictor_conf"),
                                         _PREDICTOR_V3_KEYS if v3 else _PREDICTOR_KEYS, source),
                   **kwargs)
    except ValueError as e:  # a value the classes refuse (an upsample type, a NO_BIAS outside the vocabulary)
        raise ConfigError(f"{source}: {e}") from e


def paraformer_config(d: int, enc_blocks: int, dec_blocks: int, ffn: int, fs: int = 16000) -> dict:
    """The model and frontend sections of a FunASR `config.yaml` in paraformer-large's layout
    (../shared/data/paraformer_large/config.yaml) with small sizes: for models trained from scratch."""
    return {
        "model": "Paraformer",
        "model_conf": {"ctc_weight": 0.0, "lsm_weight": 0.1, "length_normalized_loss": True,
                       "predictor_weight": 1.0, "predictor_bias": 1, "sampling_ratio": 0.75},
        "encoder": "SANMEncoder",
        "encoder_conf": {"output_size": d, "attention_heads": 4, "linear_units": ffn, "num_blocks": enc_blocks,
                         "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
                         "input_layer": "pe", "pos_enc_class": "SinusoidalPositionEncoder",
                         "normalize_before": True, "kernel_size": 11, "sanm_shfit": 0,
                         "selfattention_layer_type": "sanm"},
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {"attention_heads": 4, "linear_units": ffn, "num_blocks": dec_blocks, "dropout_rate": 0.1,
                         "positional_dropout_rate": 0.1, "self_attention_dropout_rate": 0.1,
                         "src_attention_dropout_rate": 0.1, "att_layer_num": dec_blocks, "kernel_size": 11,
                         "sanm_shfit": 0},
        "predictor": "CifPredictorV2",
        "predictor_conf": {"idim": d, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
        "frontend": "WavFrontend",
        "frontend_conf": {"fs": fs, "window": "hamming", "n_mels": 80, "frame_length": 25, "frame_shift": 10,
                          "lfr_m": 7, "lfr_n": 6},
    }


def set_checkpointing(model: nn.Module, encoder_blocks: int | None = None, decoder_blocks: int | None = 0):
    """Turn on activation checkpointing for the first `encoder_blocks` encoder blocks (None: all)
    and the first `decoder_blocks` decoder blocks (None: all). Non-reentrant; dropout replays."""
    for name, stack in model.block_stacks().items():
        n = encoder_blocks if name == "encoder" else decoder_blocks  # SeACo's seaco_decoder: as the decoder
        n = len(stack) if n is None else n
        for i, layer in enumerate(stack):
            layer.checkpoint = i < n
