"""paratune: fine-tune FunASR Paraformer models without running out of GPU memory."""
from paratune.modeldir import ASRModel, ModelDirError, load_model, save_model

__version__ = "0.1.0"
__all__ = ["load_model", "save_model", "ASRModel", "ModelDirError", "__version__"]
