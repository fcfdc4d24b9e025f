"""The Paraformer model: SANM encoder, CIF predictor, SANM decoder."""
from paratune.model.cif import CifPredictorV2, cif
from paratune.model.decoder import ParaformerSANMDecoder
from paratune.model.paraformer import ConfigError, Paraformer, build_paraformer, set_checkpointing
from paratune.model.sanm import SANMEncoder

__all__ = ["Paraformer", "SANMEncoder", "ParaformerSANMDecoder", "CifPredictorV2", "cif", "build_paraformer",
           "set_checkpointing", "ConfigError"]
