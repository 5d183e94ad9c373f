"""CodecLLM: Hugging Face models as compressed ``.cllm`` files that run from compressed weights."""

__version__ = "0.1.0"

from .errors import CodecLLMError  # noqa: E402
from .converter import convert  # noqa: E402
from .loader import load, load_tokenizer  # noqa: E402
from . import hf  # noqa: E402

hf.register()

__all__ = ["CodecLLMError", "convert", "load", "load_tokenizer", "__version__"]
