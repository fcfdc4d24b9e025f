"""The Paraformer family: SANM encoder, CIF predictor, SANM decoder (+ timestamps, + hotwords)."""
from paratune.model.bicif import BiCifParaformer
from paratune.model.build import MODELS, ConfigError, build_paraformer, set_checkpointing
from paratune.model.cif import CifPredictorV2, CifPredictorV3, cif
from paratune.model.decoder import ParaformerSANMDecoder
from paratune.model.paraformer import Paraformer
from paratune.model.sanm import SANMEncoder
from paratune.model.seaco import SeacoParaformer

__all__ = ["Paraformer", "BiCifParaformer", "SeacoParaformer", "MODELS", "SANMEncoder", "ParaformerSANMDecoder",
           "CifPredictorV2", "CifPredictorV3", "cif", "build_paraformer", "set_checkpointing", "ConfigError"]
