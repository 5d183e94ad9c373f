import numpy as np
import pytest
import torch

from codecllm.codecs import chunk_bounds, codec_ids, decode, encode, get_codec
from codecllm.errors import DecodeError, UnknownCodecError, UnknownSchemeError
from codecllm.quality import sqnr_db
from codecllm.schemes import get_scheme, scheme_ids

LINEAR_MIN_SQNR_DB = 38.0  # int8 per output channel on Gaussian weights gives about 40 dB


@pytest.mark.parametrize("codec_id", codec_ids())
@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 4097, 3 * 65536 + 17], ids=lambda n: f"{n}B")
def test_codec_round_trip_is_exact(codec_id, nbytes):
    rng = np.random.default_rng(nbytes)
    data = rng.integers(-20, 20, nbytes).astype(np.int8).view(np.uint8)  # compressible, not trivial
    codec = get_codec(codec_id)
    pieces, sizes = encode(codec, memoryview(data), 4096)
    out = decode(codec, memoryview(b"".join(pieces)), sizes, 4096, nbytes)
    assert out.tobytes() == data.tobytes()
    if codec.chunked:
        assert len(sizes) == len(chunk_bounds(nbytes, 4096))


def test_zstd_chunks_are_independent_standard_frames():
    import zstandard

    data = np.arange(10000, dtype=np.uint8)
    pieces, _ = encode(get_codec("zstd"), memoryview(data), 4096)
    assert b"".join(zstandard.ZstdDecompressor().decompress(p) for p in pieces) == data.tobytes()
    assert all(p[:4] == b"\x28\xb5\x2f\xfd" for p in pieces)  # zstd frame magic


def test_zstd_corrupt_frame_raises_decode_error():
    data = np.zeros(5000, dtype=np.uint8)
    pieces, sizes = encode(get_codec("zstd"), memoryview(data), 4096)
    bad = bytearray(pieces[0])
    bad[5] ^= 0xFF
    with pytest.raises(DecodeError):
        decode(get_codec("zstd"), memoryview(bytes(bad) + pieces[1]), sizes, 4096, 5000)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_none_scheme_is_bit_exact(dtype):
    w = torch.randn(33, 17).to(dtype)
    enc, sides = get_scheme("none").quantize(w)
    assert sides == {}
    assert torch.equal(get_scheme("none").dequantize(enc, sides, dtype).view(torch.uint8), w.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_int8_sqnr_floor_and_bounds(dtype):
    w = torch.randn(256, 512).to(dtype)
    q, sides = get_scheme("int8").quantize(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert sides["scale"].shape == (256,) and sides["scale"].dtype == torch.float32
    back = get_scheme("int8").dequantize(q, sides, torch.float32)
    assert sqnr_db(w.float(), back) > LINEAR_MIN_SQNR_DB
    # every element within half a step of the original
    step = sides["scale"][:, None]
    assert ((back - w.float()).abs() <= step * (0.5 + 1e-4)).all()


def test_int8_zero_row_and_large_tensor_blocks():
    w = torch.randn(3000, 1500)
    w[7] = 0
    q, sides = get_scheme("int8").quantize(w)
    assert (q[7] == 0).all() and sides["scale"][7] == 1.0
    assert sqnr_db(w, get_scheme("int8").dequantize(q, sides, torch.float32)) > LINEAR_MIN_SQNR_DB


def test_registries_have_stable_ids_and_clear_errors():
    assert {"int8", "none"} <= set(scheme_ids())
    assert {"zstd", "raw"} <= set(codec_ids())
    with pytest.raises(UnknownSchemeError, match="int3"):
        get_scheme("int3")
    with pytest.raises(UnknownCodecError, match="lzma"):
        get_codec("lzma")
