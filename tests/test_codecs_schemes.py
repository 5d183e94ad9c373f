import numpy as np
import pytest
import torch

from codecllm.codecs import chunk_bounds, codec_ids, decode_cpu, get_codec
from codecllm.errors import CodecLLMError, DecodeError, UnknownCodecError, UnknownSchemeError
from codecllm.quality import sqnr_db
from codecllm.schemes import get_scheme, scheme_ids

LINEAR_MIN_SQNR_DB = 38.0  # int8 per output channel on Gaussian weights gives about 40 dB


@pytest.mark.parametrize("codec_id", codec_ids())
@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 4097, 3 * 65536 + 17], ids=lambda n: f"{n}B")
def test_codec_round_trip_is_exact(codec_id, nbytes):
    rng = np.random.default_rng(nbytes)
    data = rng.integers(-20, 20, nbytes).astype(np.int8).view(np.uint8)  # compressible, not trivial
    codec = get_codec(codec_id)
    pieces = codec.encode(memoryview(data), 4096, **codec.check_options())
    sizes = [len(p) for p in pieces]
    out = decode_cpu(codec_id, memoryview(b"".join(pieces)), sizes, 4096, nbytes)
    assert out.tobytes() == data.tobytes()
    if codec.chunked:
        assert len(sizes) == len(chunk_bounds(nbytes, 4096))


def test_zstd_chunks_are_independent_standard_frames():
    import zstandard

    data = np.arange(10000, dtype=np.uint8)
    pieces = get_codec("zstd").encode(memoryview(data), 4096)
    assert b"".join(zstandard.ZstdDecompressor().decompress(p) for p in pieces) == data.tobytes()
    assert all(p[:4] == b"\x28\xb5\x2f\xfd" for p in pieces)  # zstd frame magic


def test_zstd_encodes_the_chunks_asked_for():
    """``chunks`` picks chunks by index, in the order given: the same frames as coding every chunk."""
    data = memoryview(np.random.default_rng(1).integers(0, 16, 10000, dtype=np.uint8))
    z = get_codec("zstd")
    every = z.encode(data, 4096)
    assert len(every) == 3
    assert z.encode(data, 4096, chunks=[2, 0]) == [every[2], every[0]]
    assert z.encode(data, 4096, chunks=[]) == []


def test_zstd_encode_shares_runs_with_its_pool(monkeypatch):
    """The calling thread codes runs of chunks beside the pool's workers: the same frames, in order, when
    it is itself the only worker of the shared pool (no wait on a helper that cannot start), and an error
    in any thread's chunk is raised, after the helpers stopped."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import zstandard

    from codecllm import codecs
    from codecllm.codecs import zstd as zstd_module

    z = get_codec("zstd")
    data = memoryview(np.random.default_rng(0).integers(0, 16, 3 << 20, dtype=np.uint8))
    want = z.encode(data, 1 << 16)
    assert len(want) == 48 and b"".join(zstandard.ZstdDecompressor().decompress(p) for p in want) == data.tobytes()
    pool = ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(codecs, "_shared_pool", pool)
    assert pool.submit(z.encode, data, 1 << 16).result(timeout=60) == want

    class Failing:
        calls = 0

        def compress(self, b):
            Failing.calls += 1
            if Failing.calls == 5:
                raise zstandard.ZstdError("chunk 5")
            return b"x"

    pool.shutdown()
    pool = ThreadPoolExecutor(max_workers=2)
    monkeypatch.setattr(codecs, "_shared_pool", pool)
    monkeypatch.setattr(zstd_module, "_compressor", lambda level: Failing())
    with pytest.raises(zstandard.ZstdError, match="chunk 5"):
        z.encode(data, 1 << 16)
    calls = Failing.calls
    time.sleep(0.05)
    assert Failing.calls == calls < 24  # no thread still coding, and (runs of 6 chunks) no run begun after the error
    pool.shutdown()


def test_zstd_corrupt_frame_raises_decode_error():
    data = np.zeros(5000, dtype=np.uint8)
    pieces = get_codec("zstd").encode(memoryview(data), 4096)
    sizes = [len(p) for p in pieces]
    bad = bytearray(pieces[0])
    bad[5] ^= 0xFF
    with pytest.raises(DecodeError):
        decode_cpu("zstd", memoryview(bytes(bad) + pieces[1]), sizes, 4096, 5000)


def test_zstd_frame_claiming_another_size_is_refused():
    """A frame that would decode to more bytes than its chunk holds is refused before it is decoded."""
    pieces = get_codec("zstd").encode(memoryview(np.zeros(8192, dtype=np.uint8)), 8192)
    with pytest.raises(DecodeError, match="holds 8192 bytes, expected 4096"):
        decode_cpu("zstd", memoryview(pieces[0]), [len(pieces[0])], 4096, 4096)


@pytest.mark.parametrize("options, message", [({"level": 0}, "level"), ({"level": 23}, "level"), ({"level": "3"}, "level"),
                                              ({"window": 5}, "no option")], ids=["zero", "too-high", "string", "unknown"])
def test_zstd_validates_its_own_options(options, message):
    with pytest.raises(CodecLLMError, match=message):
        get_codec("zstd").check_options(**options)
    assert get_codec("zstd").check_options() == {"level": 3}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_none_scheme_is_bit_exact(dtype):
    w = torch.randn(33, 17).to(dtype)
    parts = get_scheme("none").quantize(w)
    assert list(parts) == ["data"]
    assert torch.equal(get_scheme("none").dequantize(parts, dtype).view(torch.uint8), w.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_int8_sqnr_floor_and_bounds(dtype):
    w = torch.randn(256, 512).to(dtype)
    parts = get_scheme("int8").quantize(w)
    q = parts["qweight"]
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert parts["scale"].shape == (256,) and parts["scale"].dtype == torch.float32
    back = get_scheme("int8").dequantize(parts, torch.float32)
    assert sqnr_db(w.float(), back) > LINEAR_MIN_SQNR_DB
    # every element within half a step of the original
    step = parts["scale"][:, None]
    assert ((back - w.float()).abs() <= step * (0.5 + 1e-4)).all()


def test_int8_zero_row_and_large_tensor_blocks():
    w = torch.randn(3000, 1500)
    w[7] = 0
    parts = get_scheme("int8").quantize(w)
    assert (parts["qweight"][7] == 0).all() and parts["scale"][7] == 1.0
    assert sqnr_db(w, get_scheme("int8").dequantize(parts, torch.float32)) > LINEAR_MIN_SQNR_DB


def test_int8_transposed_layout_quantizes_output_channels():
    """A Conv1D weight is stored [in, out]: encoded transposed, one scale per output column."""
    w = torch.randn(40, 24)
    w[:, 3] *= 100  # one loud output channel must not spoil the others' scales
    s = get_scheme("int8", {"transpose": True})
    parts = s.quantize(w)
    assert parts["qweight"].shape == (24, 40) and parts["scale"].shape == (24,)
    assert {n: (p.dtype, p.shape) for n, p in s.layout("F32", (40, 24)).items()} == {"qweight": ("I8", (24, 40)), "scale": ("F32", (24,))}
    back = s.dequantize(parts, torch.float32)
    assert back.shape == w.shape and back.is_contiguous()
    assert sqnr_db(w[:, :3], back[:, :3]) > LINEAR_MIN_SQNR_DB


@pytest.mark.parametrize("params", [{"transpose": 1}, {"group": 32}], ids=["wrong-type", "unknown"])
def test_scheme_params_are_validated(params):
    with pytest.raises(CodecLLMError):
        get_scheme("int8", params)


def test_registries_have_stable_ids_and_clear_errors():
    assert {"int8", "none"} <= set(scheme_ids())
    assert {"zstd", "raw"} <= set(codec_ids())
    with pytest.raises(UnknownSchemeError, match="int3"):
        get_scheme("int3")
    with pytest.raises(UnknownCodecError, match="lzma"):
        get_codec("lzma")


@pytest.mark.parametrize("tail", [b"\x00" * 7, "frame"], ids=["trailing-bytes", "second-frame"])
def test_zstd_chunk_holds_exactly_one_frame(tail):
    data = np.arange(4096, dtype=np.uint8)
    frame = get_codec("zstd").encode(memoryview(data), 4096)[0]
    chunk = frame + (frame if tail == "frame" else tail)
    with pytest.raises(DecodeError, match="follow its frame"):
        decode_cpu("zstd", memoryview(chunk), [len(chunk)], 4096, 4096)


def test_cpu_stream_checks_frames_once_at_load(tiny_llama, tmp_path, monkeypatch):
    """CPU stream layers decode their payloads (the file's, or the high planes they build) once at load with
    every check (a bad one fails the load); per forward the frames then go straight into the pipeline's
    buffers through the codec's checked-chunk decoder, still checked for their decoded size."""
    import codecllm
    from codecllm import codecs
    from codecllm.codecs import decode_cpu
    from codecllm.codecs import zstd as zstd_codec
    from codecllm.qmodules import CpuStreamed

    codecllm.convert(tiny_llama, tmp_path / "m.cllm", chunk_size=4096)
    strict, direct = [], []
    monkeypatch.setattr(zstd_codec, "_decode_frame", lambda f, o, i, run=zstd_codec._decode_frame: strict.append(i) or run(f, o, i))
    checked = codecs.checked_chunk_decoder("zstd")
    monkeypatch.setitem(codecs._DECODERS, ("zstd", "cpu-checked-chunk"), lambda f, o, i: direct.append(len(o)) or checked(f, o, i))
    resident = codecllm.load(tmp_path / "m.cllm")
    strict.clear()
    model = codecllm.load(tmp_path / "m.cllm", mode="stream")
    at_load = len(strict)  # every chunk of every stream layer once, and the resident parts
    layers = [m for m in model.modules() if isinstance(m, CpuStreamed)]
    streamed = sum(len(m.chunk_sizes) for m in layers)
    assert at_load >= streamed > 0 and not direct
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        a, b = model(ids).logits, resident(ids).logits
    assert (a - b).norm() / b.norm() < 0.01  # (4-bit planes through the int4 kernel: test_convert_load)
    assert len(strict) == at_load and len(direct) == streamed  # each stream layer runs once per forward
    assert sum(direct) == sum(m.decoded_nbytes for m in layers)
    frame = get_codec("zstd").encode(memoryview(bytes(100)), 100)[0]
    with pytest.raises(DecodeError, match="decoded to 100 bytes, expected 120"):
        decode_cpu("zstd", frame, [len(frame)], 120, 120, checked=True)
