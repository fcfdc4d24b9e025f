"""FunASR model directories (Paraformer, BiCifParaformer, SeacoParaformer): `config.yaml`, `model.pt`, `tokens.json`/`tokens.txt`, `am.mvn`, `seg_dict`.

`load_model` reads what `funasr.AutoModel(model=DIR)` reads; `save_model` writes a directory it loads.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from paratune.data.audio import load_audio
from paratune.data.frontend import FrontendConfigError, WavFrontend
from paratune.data.hotwords import HotwordError, read_hotwords
from paratune.data.text import sentence_postprocess, sentence_postprocess_with_timestamps
from paratune.data.tokenizer import CharTokenizer, TokenizerError
from paratune.io import atomic_torch_save, atomic_write_text
from paratune.model import BiCifParaformer, Paraformer, SeacoParaformer
from paratune.model.build import ConfigError, build_paraformer


class ModelDirError(ValueError):
    """A model directory that cannot be loaded; the message names the file."""


@dataclass
class Transcript:
    """One utterance's text and, from a model with a timestamp head, each word's [start_ms, end_ms]."""

    text: str
    timestamps: list | None = None


@dataclass
class ASRModel:
    """A Paraformer-family model with the frontend and tokenizer its directory describes."""

    model: Paraformer
    frontend: WavFrontend
    tokenizer: CharTokenizer
    config: dict
    path: Path | None = None
    files: dict = field(default_factory=dict)  # extra files to carry over on save (seg_dict)

    def to(self, device) -> "ASRModel":
        self.model.to(device)
        self.frontend.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def timed(self) -> bool:
        """The model predicts timestamps (BiCifParaformer, SeacoParaformer)."""
        return isinstance(self.model, BiCifParaformer)

    @property
    def takes_hotwords(self) -> bool:
        return isinstance(self.model, SeacoParaformer)

    def text(self, token_ids: list[int]) -> str:
        """Token ids -> text, post-processed as FunASR's `generate()` does for a model without timestamps."""
        return sentence_postprocess(self.tokenizer.ids2tokens(token_ids))

    def hotword_ids(self, hotwords: str | None = None, hotword_file=None) -> list[list[int]] | None:
        """Hotwords as FunASR's `generate(hotword=...)` reads them: a string holds one hotword per word, a
        file one per line. HotwordError names a file or line that cannot be used."""
        if hotwords is None and hotword_file is None:
            return None
        if not self.takes_hotwords:
            raise HotwordError(f"hotwords: {self.config.get('model')} takes none (SeacoParaformer does)")
        return read_hotwords(hotwords, hotword_file, self.tokenizer)

    @torch.no_grad()
    def decode_batch(self, feats: list[torch.Tensor], hotwords: list[list[int]] | None = None) -> list[Transcript]:
        """Decode feature matrices (T_i, D) from `self.frontend` together (greedy CIF decoding). From a
        model with timestamps, the text is FunASR's for such a model (words separated by spaces)."""
        self.model.eval()
        lengths = torch.tensor([f.shape[0] for f in feats], device=self.device)
        padded = torch.nn.utils.rnn.pad_sequence(list(feats), batch_first=True).to(self.device)
        options = {"hotwords": hotwords} if hotwords else {}
        if not self.timed:
            return [Transcript(self.text(row)) for row in self.model.decode(padded, lengths, **options)]
        out = []
        for ids, stamps in self.model.decode_timed(padded, lengths, **options):
            text, stamps = sentence_postprocess_with_timestamps(self.tokenizer.ids2tokens(ids), stamps)
            out.append(Transcript(text, stamps))
        return out

    def decode_features(self, feats: list[torch.Tensor], hotwords: list[list[int]] | None = None) -> list[str]:
        return [t.text for t in self.decode_batch(feats, hotwords)]

    def transcribe(self, waveforms: list[np.ndarray], hotwords: str | None = None, hotword_file=None,
                   timestamps: bool = False) -> list:
        """Decode a batch of 16 kHz mono waveforms: texts, or `Transcript`s with `timestamps=True`.
        `hotwords` ("w1 w2") and `hotword_file` bias a SeacoParaformer as FunASR's `generate` does."""
        if timestamps and not self.timed:
            raise ModelDirError(f"{self.config.get('model')} has no timestamp head "
                                "(BiCifParaformer and SeacoParaformer predict timestamps)")
        self.frontend.eval()
        result = self.decode_batch([self.frontend.features(w) for w in waveforms],
                                   self.hotword_ids(hotwords, hotword_file))
        return result if timestamps else [t.text for t in result]

    def transcribe_files(self, paths: list[str | os.PathLike], **options) -> list:
        return self.transcribe([load_audio(p, self.frontend.fs) for p in paths], **options)


def _read_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise ModelDirError(f"{path}: expected a mapping of settings, got {type(config).__name__}")
    return config


def _files(root: Path) -> dict:
    """Where each part lives: FunASR's fixed names, or configuration.json's `file_path_metas`."""
    files = {"config": root / "config.yaml", "model": root / "model.pt", "cmvn": root / "am.mvn",
             "seg_dict": root / "seg_dict"}
    tokens = [root / "tokens.json", root / "tokens.txt"]
    files["tokens"] = next((p for p in tokens if p.exists()), tokens[0])
    meta_file = root / "configuration.json"
    if meta_file.exists():
        try:
            metas = json.loads(meta_file.read_text(encoding="utf-8")).get("file_path_metas", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ModelDirError(f"{meta_file}: not valid JSON: {e}") from e
        pick = {"config": metas.get("config"), "model": metas.get("init_param"),
                "tokens": (metas.get("tokenizer_conf") or {}).get("token_list"),
                "seg_dict": (metas.get("tokenizer_conf") or {}).get("seg_dict_file"),
                "cmvn": (metas.get("frontend_conf") or {}).get("cmvn_file")}
        for name, rel in pick.items():
            if isinstance(rel, str) and (root / rel).exists():
                files[name] = root / rel
    return files


def load_state_dict(path: Path) -> dict:
    """A FunASR `model.pt`: a state dict, possibly wrapped ('state_dict', 'model', ...), keys
    possibly prefixed by DDP's 'module.'. Loaded with weights_only=True: no code runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ModelDirError(f"{path}: cannot read weights: {e}") from e
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelDirError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


@dataclass
class ModelSpec:
    """A model directory's description without its weights: what `paratune plan` needs."""

    root: Path
    files: dict
    config: dict
    tokenizer: CharTokenizer
    frontend: WavFrontend

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def input_size(self) -> int:
        return self.frontend.output_size()

    def build(self) -> Paraformer:
        try:
            return build_paraformer(self.config, self.vocab_size, self.input_size, source=str(self.files["config"]))
        except (ConfigError, TypeError) as e:
            raise ModelDirError(str(e)) from e


def read_model_dir(path: str | os.PathLike) -> ModelSpec:
    """Read and check a FunASR Paraformer directory's config.yaml, tokens and am.mvn (not the weights)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(f"{root}: not a model directory")
    files = _files(root)
    if not files["config"].exists():
        raise ModelDirError(f"{files['config']}: missing (a FunASR model directory has config.yaml)")
    config = _read_yaml(files["config"])

    tokenizer_conf = config.get("tokenizer_conf") or {}
    if not files["tokens"].exists():
        raise ModelDirError(f"{root}: no tokens.json or tokens.txt")
    try:
        tokenizer = CharTokenizer(files["tokens"], unk_symbol=tokenizer_conf.get("unk_symbol", "<unk>"),
                                  seg_dict=files["seg_dict"] if files["seg_dict"].exists() else None)
    except (TokenizerError, OSError) as e:
        raise ModelDirError(str(e)) from e

    try:
        frontend = WavFrontend.from_config(config.get("frontend_conf") or {},
                                           cmvn_file=files["cmvn"] if files["cmvn"].exists() else None)
    except (FrontendConfigError, OSError, TypeError) as e:
        raise ModelDirError(f"{files['cmvn'] if files['cmvn'].exists() else files['config']}: {e}") from e
    spec = ModelSpec(root, files, config, tokenizer, frontend)
    with torch.device("meta"):  # checks the config's keys and values without allocating weights
        spec.build()
    return spec


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", warn=_warn) -> ASRModel:
    """Load a FunASR Paraformer directory (config.yaml, model.pt, tokens, am.mvn)."""
    spec = read_model_dir(path)
    files, tokenizer, frontend, config, root = spec.files, spec.tokenizer, spec.frontend, spec.config, spec.root
    if frontend.cmvn is None:
        # FunASR's WavFrontend normalises with the am.mvn beside config.yaml when there is one: trained
        # weights expect it, and without it every transcript changes (here and in FunASR) without an error
        warn(f"{root}: no {files['cmvn'].name} (CMVN): features are decoded unnormalised, unlike the ones the "
             "model was trained on; copy am.mvn from where the model came from")
    model = spec.build()
    if not files["model"].exists():
        raise ModelDirError(f"{files['model']}: missing (the weights)")
    state = load_state_dict(files["model"])
    missing, unexpected = _compare_keys(model, state)
    if missing or unexpected:
        raise ModelDirError(f"{files['model']}: weights do not fit {files['config']}: "
                            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelDirError(f"{files['model']}: {e}") from e
    model.eval()
    extra = {"seg_dict": files["seg_dict"]} if files["seg_dict"].exists() else {}
    return ASRModel(model, frontend, tokenizer, config, root, extra).to(device)


def _compare_keys(model, state):
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)


def _cmvn_text(cmvn: torch.Tensor) -> str:
    """Kaldi nnet1 text form, as FunASR's am.mvn (AddShift = -mean, Rescale = 1/std)."""
    d = cmvn.shape[1]

    def row(v):
        return " ".join(repr(float(x)) for x in v.tolist())

    return (f"<Nnet>\n<Splice> {d} {d}\n[ 0 ]\n<AddShift> {d} {d}\n<LearnRateCoef> 0 [ {row(cmvn[0])} ]\n"
            f"<Rescale> {d} {d}\n<LearnRateCoef> 0 [ {row(cmvn[1])} ]\n</Nnet>\n")


def save_model(asr: ASRModel, out_dir: str | os.PathLike) -> Path:
    """Write a directory that `funasr.AutoModel(model=out_dir)` and `load_model` both load.

    Each file is written atomically (temp file + rename). Paths in the config that point outside
    the directory are removed: FunASR fills them from the files beside config.yaml."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(asr.config)
    config.setdefault("tokenizer", "CharTokenizer")
    config.setdefault("frontend", "WavFrontend")
    for section, key in (("tokenizer_conf", "token_list"), ("tokenizer_conf", "seg_dict"),
                         ("tokenizer_conf", "seg_dict_file"), ("frontend_conf", "cmvn_file")):
        (config.get(section) or {}).pop(key, None)
    config.setdefault("tokenizer_conf", {}).setdefault("unk_symbol", asr.tokenizer.unk_symbol)
    config.setdefault("frontend_conf", {})  # FunASR writes the am.mvn path into it

    state = {k: v.detach().to("cpu").contiguous() for k, v in asr.model.state_dict().items()}
    atomic_torch_save(state, out / "model.pt")
    atomic_write_text(out / "tokens.json", json.dumps(asr.tokenizer.token_list, ensure_ascii=False, indent=1))
    (out / "tokens.txt").unlink(missing_ok=True)  # one token list only, so both loaders agree
    if asr.frontend.cmvn is not None:
        atomic_write_text(out / "am.mvn", _cmvn_text(asr.frontend.cmvn.cpu()))
    seg_dict = asr.files.get("seg_dict")
    if seg_dict is not None and Path(seg_dict).resolve() != (out / "seg_dict").resolve():
        atomic_write_text(out / "seg_dict", Path(seg_dict).read_text(encoding="utf-8"))
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    return out
