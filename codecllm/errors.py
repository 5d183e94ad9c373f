"""One exception hierarchy for everything the package rejects.

The CLIs print ``str(error)`` as a single line and exit non-zero; the messages are written for that.
"""


class CodecLLMError(Exception):
    """Base class of every error this package raises on purpose."""


class SourceError(CodecLLMError):
    """The Hugging Face checkpoint given to the converter cannot be used."""


class OutputExistsError(CodecLLMError):
    """The output file exists and overwriting was not asked for."""


class FormatError(CodecLLMError):
    """A ``.cllm`` file breaks a rule of format_spec.md."""


class TruncatedFileError(FormatError):
    """The file ends before the header or the data it declares."""


class HeaderTooLargeError(FormatError):
    """The declared header length is above the hard cap."""


class HeaderDecodeError(FormatError):
    """The header is not UTF-8, not JSON, or not a JSON object of the expected shape."""


class NotCllmError(FormatError):
    """A valid safetensors file that carries no CodecLLM document."""


class UnsupportedVersionError(FormatError):
    """The CodecLLM document has a format version this reader does not know."""


class OffsetError(FormatError):
    """Tensor data offsets overlap, leave holes or run past the data buffer."""


class ShapeError(FormatError):
    """A shape is malformed, absurd, or disagrees with the byte count."""


class UnknownSchemeError(FormatError):
    """A record names a quantization scheme this reader does not know."""


class UnknownCodecError(FormatError):
    """A record names a codec this reader does not know."""


class ChunkTableError(FormatError):
    """A chunk table disagrees with the payload or the decoded size."""


class ChecksumError(FormatError):
    """Bytes read from the file do not match the checksum in the header."""


class DecodeError(FormatError):
    """A codec failed to decode a payload or produced the wrong number of bytes."""


class DeviceError(CodecLLMError):
    """The requested device or its libraries cannot be used."""


class DeviceMapError(DeviceError):
    """A ``device_map`` (or ``max_memory``) that codecllm cannot honour."""


class OutputError(CodecLLMError):
    """The output cannot be written (read-only or full file system, a folder that takes no files); the
    message names the output and the system's reason."""


class InputError(CodecLLMError):
    """A file to read cannot be opened (missing, a directory, not readable); the message names it."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived while a conversion had temporary files open.

    Like ``KeyboardInterrupt`` it is no ``Exception``, so ``except Exception`` does not swallow it on its
    way up; it unwinds the ``finally`` blocks that remove the temporary files. ``signum`` is the signal.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
