"""Helpers that build FunASR's own objects (the reference) for parity tests."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml


def resized_config(large_config: dict, d: int, units: int, enc_blocks: int, dec_blocks: int, att_layers: int) -> dict:
    """A large config with other widths and depths (same structure, 4 attention heads). A SeACo config's
    bias encoder and seaco decoder take the encoder's width; the seaco decoder keeps its attention
    blocks (FunASR's hotword filter reads the sixth)."""
    c = copy.deepcopy(large_config)
    c["encoder_conf"].update(output_size=d, attention_heads=4, linear_units=units, num_blocks=enc_blocks)
    c["decoder_conf"].update(attention_heads=4, linear_units=units, num_blocks=dec_blocks, att_layer_num=att_layers)
    c["predictor_conf"]["idim"] = d
    if "seaco_decoder_conf" in c:
        c["model_conf"]["inner_dim"] = d
        c["seaco_decoder_conf"].update(attention_heads=4, linear_units=units)
    return c


def small_config(large_config: dict) -> dict:
    """A few blocks and 64 dims."""
    return resized_config(large_config, 64, 96, 3, 3, 2)


def medium_config(large_config: dict) -> dict:
    """12 + 6 blocks and 256 dims (as benchmarks/memory_model.py's medium)."""
    return resized_config(large_config, 256, 1024, 12, 6, 6)


def shallow_config(large_config: dict, enc_blocks: int = 4, dec_blocks: int = 2) -> dict:
    """A large config at its own widths (512 dims, 2,048 units, 4 heads) and every other setting, with
    fewer blocks: what a model directory's load and decode exercise, at a tenth of the 220 M parameters.
    The full depth's numerics are test_parity's and test_family_parity's `large` cases."""
    c = copy.deepcopy(large_config)
    c["encoder_conf"]["num_blocks"] = enc_blocks
    c["decoder_conf"].update(num_blocks=dec_blocks, att_layer_num=dec_blocks)
    return c


def load_config(large_dir: Path) -> dict:
    return yaml.safe_load((large_dir / "config.yaml").read_text(encoding="utf-8"))


def funasr_paraformer(config: dict, vocab_size: int, input_size: int = 560):
    # importing the modules registers the classes FunASR looks up by name
    import funasr.models.paraformer.cif_predictor  # noqa: F401
    import funasr.models.paraformer.decoder  # noqa: F401
    import funasr.models.sanm.encoder  # noqa: F401
    from funasr.models.paraformer.model import Paraformer

    return Paraformer(
        encoder=config["encoder"], encoder_conf=config["encoder_conf"],
        decoder=config["decoder"], decoder_conf=config["decoder_conf"],
        predictor=config["predictor"], predictor_conf=config["predictor_conf"],
        vocab_size=vocab_size, input_size=input_size, **config["model_conf"],
    )


def funasr_model(config: dict, vocab_size: int, input_size: int = 560):
    """FunASR's model for any Paraformer-family config (Paraformer, BiCifParaformer, SeacoParaformer),
    built as `funasr.AutoModel` builds it: model_conf's keys, then every top-level key of the config
    (SeacoParaformer reads seaco_decoder, seaco_decoder_conf and predictor from there)."""
    # importing the modules registers the classes FunASR looks up by name
    import funasr.models.bicif_paraformer.cif_predictor  # noqa: F401
    import funasr.models.bicif_paraformer.model  # noqa: F401
    import funasr.models.paraformer.cif_predictor  # noqa: F401
    import funasr.models.paraformer.decoder  # noqa: F401
    import funasr.models.paraformer.model  # noqa: F401
    import funasr.models.sanm.encoder  # noqa: F401
    import funasr.models.seaco_paraformer.model  # noqa: F401
    import funasr.models.specaug.specaug  # noqa: F401
    from funasr.register import tables

    kwargs = copy.deepcopy(config.get("model_conf") or {})
    kwargs.update(copy.deepcopy(config))
    kwargs.update(vocab_size=vocab_size, input_size=input_size, frontend=None)
    return tables.model_classes.get(config["model"])(**kwargs)


def funasr_features(wav_paths, cmvn_file: Path):
    """Padded LFR+CMVN features of real clips, computed by FunASR's own loader and frontend."""
    from funasr.frontends.wav_frontend import WavFrontend
    from funasr.utils.load_utils import extract_fbank, load_audio_text_image_video

    frontend = WavFrontend(cmvn_file=str(cmvn_file), fs=16000, window="hamming", n_mels=80, frame_length=25,
                           frame_shift=10, lfr_m=7, lfr_n=6, dither=0.0)
    audio = [load_audio_text_image_video(str(p), fs=16000) for p in wav_paths]
    feats, lengths = extract_fbank(audio, frontend=frontend)
    return feats, lengths.long()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a scale-aware error for whole tensors."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
