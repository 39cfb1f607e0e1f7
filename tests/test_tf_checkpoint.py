"""The TensorFlow V2 checkpoint reader/writer (tf_checkpoint.py), checked against files TF wrote."""
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import tf_checkpoint as T

DATA = Path(__file__).resolve().parent / 'data' / 'tf'
REFERENCES = ['tf_head_light64', 'tf_2019_full64']


def _byte_loop_crc32c(data: bytes) -> int:
    """The textbook bitwise CRC32C, independent of the module's tables."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_values():
    assert T.crc32c(b'123456789') == 0xE3069283           # the standard check value
    assert T.crc32c(bytes(32)) == 0x8A9136AA               # RFC 3720 B.4 test vectors
    assert T.crc32c(b'\xff' * 32) == 0x62A8AB43
    assert T.crc32c(b'') == 0


def test_masked_crc_known_values():
    """TF's rule: rotate right by 15 bits, add 0xa282ead8 (mod 2**32); values computed by hand."""
    assert T.mask_crc(0) == 0xA282EAD8
    assert T.mask_crc(0xE3069283) == (0x2507C60D + 0xA282EAD8) & 0xFFFFFFFF   # rotr15(0xE3069283)
    assert T.mask_crc(0xFFFFFFFF) == 0xA282EAD7                                   # wraps around


@pytest.mark.parametrize('n', [1, 7, 65535, 65536 * 3 + 7])
def test_crc32c_equals_bitwise_loop_for_every_buffer_type(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    expected = _byte_loop_crc32c(data)
    assert T.crc32c(data) == expected
    assert T.crc32c(bytearray(data)) == expected
    assert T.crc32c(memoryview(data)) == expected
    assert T.crc32c(np.frombuffer(data, np.uint8)) == expected


def test_crc32c_of_arrays_covers_their_bytes_in_c_order():
    array = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert T.crc32c(array) == _byte_loop_crc32c(array.tobytes())
    assert T.crc32c(array[:, ::2]) == _byte_loop_crc32c(array[:, ::2].tobytes())   # not contiguous
    assert T.crc32c(np.array(0.5, np.float32)) == _byte_loop_crc32c(np.array(0.5, np.float32).tobytes())


@pytest.mark.parametrize('name', REFERENCES)
def test_masked_crc_equals_what_tensorflow_stored(name):
    """The stored checksum of every tensor TF wrote equals mask_crc(crc32c(its bytes))."""
    ckpt = T.TFCheckpoint(DATA / name / 'ckpt' / 'UGATIT.model-1000')
    for key in ckpt:
        assert T.mask_crc(T.crc32c(ckpt.read(key, verify=False))) == ckpt.entries[key].crc32c, key


@pytest.mark.parametrize('name', REFERENCES)
def test_reads_official_checkpoints(name):
    """Names and shapes equal TensorFlow's own listing; every tensor passes its stored CRC32C."""
    ckpt = T.TFCheckpoint(DATA / name / 'ckpt' / 'UGATIT.model-1000')
    listed = json.loads((DATA / name / 'variables.json').read_text())
    assert {k: list(v) for k, v in ckpt.shapes().items()} == listed
    for key in ckpt:
        value = ckpt.read(key)   # raises on a checksum mismatch
        assert value.dtype == np.float32 and value.shape == tuple(listed[key])
    if name == 'tf_head_light64':
        assert ckpt.read('beta2_power').item() == pytest.approx(0.999)


def test_resolves_folder_index_file_and_foreign_checkpoint_paths(tmp_path):
    prefix = DATA / 'tf_2019_full64' / 'ckpt' / 'UGATIT.model-1000'
    assert T.resolve_prefix(prefix.parent) == prefix
    assert T.resolve_prefix(f'{prefix}.index') == prefix
    assert T.resolve_prefix(f'{prefix}.data-00000-of-00001') == prefix
    # Saver records paths of the training machine; the file name inside the folder is used then.
    T.write_checkpoint(tmp_path / 'a' / 'UGATIT.model-7', {'x': np.ones(2, np.float32)})
    (tmp_path / 'a' / 'checkpoint').write_text('model_checkpoint_path: "/elsewhere/run/UGATIT.model-7"\n')
    assert T.resolve_prefix(tmp_path / 'a') == tmp_path / 'a' / 'UGATIT.model-7'
    T.write_checkpoint(tmp_path / 'a' / 'UGATIT.model-8', {'x': np.ones(2, np.float32)})
    (tmp_path / 'a' / 'checkpoint').unlink()
    with pytest.raises(T.CheckpointError, match='several checkpoints'):
        T.resolve_prefix(tmp_path / 'a')
    with pytest.raises(T.CheckpointError, match='no TF checkpoint'):
        T.resolve_prefix(tmp_path / 'missing-1')


def test_write_read_round_trip_over_many_blocks(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f'scope/layer_{i:03d}/kernel': rng.standard_normal((3, i % 5 + 1)).astype(np.float32)
               for i in range(300)}
    tensors.update({'scalar': np.array(0.5, np.float32), 'half': rng.standard_normal(7).astype(np.float16),
                    'ints': np.arange(-3, 3, dtype=np.int64), 'flags': np.array([True, False]),
                    'big': rng.standard_normal(70000).astype(np.float32)})
    T.write_checkpoint(tmp_path / 'm-1', tensors, block_size=512, restart_interval=3)
    ckpt = T.TFCheckpoint(tmp_path)
    assert ckpt.shapes() == {k: v.shape for k, v in tensors.items()}
    for key, value in tensors.items():
        got = ckpt.read(key)
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)


def test_official_entries_survive_a_rewrite_bit_for_bit(tmp_path):
    """Our writer stores the same bytes and (masked) checksums TF stored."""
    original = T.TFCheckpoint(DATA / 'tf_head_light64' / 'ckpt')
    T.write_checkpoint(tmp_path / 'copy-1', {k: original.read(k) for k in original})
    copy = T.TFCheckpoint(tmp_path)
    for key in original:
        assert copy.entries[key].crc32c == original.entries[key].crc32c
        assert copy.entries[key].shape == original.entries[key].shape


def _snappy_literal(data: bytes) -> bytes:
    """A valid Snappy stream made of literals only (what the simplest compressor emits)."""
    out = T._put_varint(len(data))
    for i in range(0, len(data), 60):
        chunk = data[i:i + 60]
        out += bytes([(len(chunk) - 1) << 2]) + chunk
    return out


def test_snappy_decompression():
    # literal "abc", then a 1-byte-offset copy of 8 bytes at offset 3 (overlapping its own output),
    # then a 2-byte-offset copy of 4 bytes at offset 11.
    stream = T._put_varint(15) + bytes([2 << 2]) + b'abc' + bytes([((8 - 4) << 2) | 1, 3]) \
        + bytes([((4 - 1) << 2) | 2]) + struct.pack('<H', 11)
    assert T.snappy_decompress(stream) == b'abcabcabcababca'
    long = bytes(range(200))
    assert T.snappy_decompress(_snappy_literal(long)) == long
    with pytest.raises(T.CheckpointError):
        T.snappy_decompress(T._put_varint(5) + bytes([2 << 2]) + b'abc')


def test_reads_snappy_compressed_index_blocks(tmp_path, monkeypatch):
    """LevelDB tables may compress blocks (type byte 1); TF's writer does not, other writers might."""
    def snappy_block(contents: bytes) -> tuple[bytes, int]:
        return _snappy_literal(contents), T.SNAPPY_COMPRESSION
    monkeypatch.setattr(T, '_encode_block', snappy_block)
    tensors = {f'v{i}': np.full(3, i, np.float32) for i in range(40)}
    T.write_checkpoint(tmp_path / 'c-1', tensors, block_size=128)
    monkeypatch.undo()
    assert _block_types(tmp_path / 'c-1.index') == {T.SNAPPY_COMPRESSION}
    ckpt = T.TFCheckpoint(tmp_path / 'c-1')
    assert sorted(ckpt) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(ckpt.read(key), value)


def _block_types(index_path: Path) -> set[int]:
    """Compression type bytes of every data block, from the footer's index handle."""
    raw = index_path.read_bytes()
    footer = raw[-T.FOOTER_SIZE:]
    _, pos = T._varint(footer, 0)
    _, pos = T._varint(footer, pos)
    offset, pos = T._varint(footer, pos)
    size, _ = T._varint(footer, pos)
    index_block = raw[offset:offset + size]   # the index block itself is stored the same way
    if raw[offset + size] == T.SNAPPY_COMPRESSION:
        index_block = T.snappy_decompress(index_block)
    types = set()
    for _, handle in T._block_entries(index_block):
        block_offset, pos = T._varint(handle, 0)
        block_size, _ = T._varint(handle, pos)
        types.add(raw[block_offset + block_size])
    return types


def test_corruption_is_reported(tmp_path):
    T.write_checkpoint(tmp_path / 'm-1', {'a': np.arange(10, dtype=np.float32), 'b': np.ones(3, np.float32)})
    data = tmp_path / 'm-1.data-00000-of-00001'
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0xFF
    data.write_bytes(bytes(raw))
    ckpt = T.TFCheckpoint(tmp_path / 'm-1')
    with pytest.raises(T.CheckpointError, match='checksum mismatch for a'):
        ckpt.read('a')
    data.write_bytes(bytes(raw[:20]))
    with pytest.raises(T.CheckpointError, match='truncated'):
        ckpt.read('b')
    index = tmp_path / 'm-1.index'
    index.write_bytes(index.read_bytes()[:-1] + b'\0')
    with pytest.raises(T.CheckpointError, match='magic'):
        T.TFCheckpoint(tmp_path / 'm-1')


def test_matches_tensorflow_reader_when_installed(tmp_path):
    """Optional cross-check against tf.train.load_checkpoint (TensorFlow is not a dependency)."""
    tf = pytest.importorskip('tensorflow')
    T.write_checkpoint(tmp_path / 'ours-1', {'x/kernel': np.arange(6, dtype=np.float32).reshape(2, 3),
                                             'y': np.array(3, np.int64)}, block_size=64)
    for prefix in [DATA / name / 'ckpt' / 'UGATIT.model-1000' for name in REFERENCES] + [tmp_path / 'ours-1']:
        theirs = tf.train.load_checkpoint(str(prefix))
        ours = T.TFCheckpoint(prefix)
        assert {k: tuple(v) for k, v in theirs.get_variable_to_shape_map().items()} == ours.shapes()
        for key in ours:
            np.testing.assert_array_equal(ours.read(key), theirs.get_tensor(key))
