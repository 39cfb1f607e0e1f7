"""Read and write TensorFlow V2 checkpoints without TensorFlow.

A V2 checkpoint ``PREFIX`` is ``PREFIX.index``, a sorted string table in LevelDB's format (blocks of
prefix-compressed keys with restart points, a block index and a 48-byte footer), mapping each
variable name to a ``BundleEntryProto`` (dtype, shape, shard, offset, size, masked CRC32C), plus
``PREFIX.data-0000i-of-0000N`` files holding the raw little-endian tensor bytes. The empty key
holds a ``BundleHeaderProto`` (number of shards, endianness). This module decodes just that: the
table (uncompressed or Snappy blocks), the few protobuf fields it needs, and the CRC32C checksums
(computed by the ``google-crc32c`` wheel, several GB/s).

:func:`write_checkpoint` writes the same format (no compression, several blocks) for tests and
benchmarks. TensorFlow itself is never imported: users should not need a 600 MB install to
convert one file. A module of its own, not part of the converter script, because it is a file
format with no U-GAT-IT knowledge: the converter, the tests and any later loader share it.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from errors import CheckpointError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1

# tensorflow/core/framework/types.proto → NumPy ('bfloat16' is widened to float32 on read).
DTYPES = {1: np.dtype('<f4'), 2: np.dtype('<f8'), 3: np.dtype('<i4'), 4: np.dtype('u1'), 5: np.dtype('<i2'),
          6: np.dtype('i1'), 9: np.dtype('<i8'), 10: np.dtype('?'), 14: 'bfloat16', 17: np.dtype('<u2'),
          19: np.dtype('<f2'), 22: np.dtype('<u4'), 23: np.dtype('<u8')}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items() if k != 14}


# ----------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), as TF and LevelDB use it


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC32C of ``data`` (any buffer), by the ``google-crc32c`` wheel's C code (hardware CRC where the
    CPU has it). Its ``value`` takes only read-only or NumPy buffers, so others are viewed as uint8 arrays."""
    if not isinstance(data, bytes):
        data = np.ascontiguousarray(data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8))
        data = data.reshape(-1).view(np.uint8)
    return google_crc32c.value(data)


def mask_crc(crc: int) -> int:
    """LevelDB/TF store CRCs masked (rotated and offset) so that CRCs of CRCs stay meaningful."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Varints and the protobuf fields we need


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError('truncated varint')
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a serialized message: varints as int, fixed32/64 as int,
    length-delimited fields as bytes."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from('<Q', buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from('<I', buf, pos)[0], pos + 4
        else:
            raise CheckpointError(f'unsupported protobuf wire type {wire}')
        fields.append((number, value))
    return fields


@dataclass(frozen=True)
class Entry:
    """One tensor's BundleEntryProto: where its bytes are and what they hold."""

    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int   # masked
    sliced: bool = False


def _parse_entry(buf: bytes) -> Entry:
    values = {'dtype': 0, 'shape': (), 'shard': 0, 'offset': 0, 'size': 0, 'crc32c': 0, 'sliced': False}
    names = {1: 'dtype', 3: 'shard', 4: 'offset', 5: 'size', 6: 'crc32c'}
    for number, value in _proto_fields(buf):
        if number == 2:   # TensorShapeProto: repeated Dim dim = 2 { int64 size = 1; }
            values['shape'] = tuple(dict(_proto_fields(dim)).get(1, 0) for n, dim in _proto_fields(value)
                                    if n == 2)
        elif number == 7:
            values['sliced'] = True
        elif number in names:
            values[names[number]] = value
    return Entry(**values)


def _serialize_entry(entry: Entry) -> bytes:
    dims = b''.join(b'\x12' + _put_varint(len(d)) + d for d in (b'\x08' + _put_varint(s) for s in entry.shape))
    out = b'\x08' + _put_varint(entry.dtype) + b'\x12' + _put_varint(len(dims)) + dims
    if entry.shard:
        out += b'\x18' + _put_varint(entry.shard)
    if entry.offset:
        out += b'\x20' + _put_varint(entry.offset)
    if entry.size:
        out += b'\x28' + _put_varint(entry.size)
    return out + b'\x35' + struct.pack('<I', entry.crc32c)


# ----------------------------------------------------------------------------------------------
# The sorted string table


def snappy_decompress(buf: bytes) -> bytes:
    """Raw Snappy (the block format LevelDB tables use): a varint length, then literals and copies."""
    length, pos = _varint(buf, 0)
    out = bytearray()
    while pos < len(buf):
        tag = buf[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:   # literal; lengths above 60 follow in 1-4 bytes
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                size = int.from_bytes(buf[pos:pos + extra], 'little')
                pos += extra
            size += 1
            out += buf[pos:pos + size]
            pos += size
            continue
        if kind == 1:
            size, offset = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | buf[pos]
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            size, offset = (tag >> 2) + 1, int.from_bytes(buf[pos:pos + width], 'little')
            pos += width
        if not 0 < offset <= len(out):
            raise CheckpointError('corrupt Snappy block')
        for _ in range(size):   # copies may overlap their own output
            out.append(out[-offset])
    if len(out) != length:
        raise CheckpointError('corrupt Snappy block (length mismatch)')
    return bytes(out)


def _read_block(table: bytes, offset: int, size: int) -> bytes:
    if offset + size + BLOCK_TRAILER_SIZE > len(table):
        raise CheckpointError('block beyond the end of the index file (truncated?)')
    contents = table[offset:offset + size]
    kind = table[offset + size]
    stored = struct.unpack_from('<I', table, offset + size + 1)[0]
    if mask_crc(crc32c(table[offset:offset + size + 1])) != stored:
        raise CheckpointError('index block checksum mismatch (corrupt file)')
    if kind == SNAPPY_COMPRESSION:
        return snappy_decompress(contents)
    if kind != NO_COMPRESSION:
        raise CheckpointError(f'unsupported index block compression {kind}')
    return contents


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Decode every (key, value) of a block; keys share a prefix with their predecessor."""
    if len(block) < 4:
        raise CheckpointError('index block too short')
    n_restarts = struct.unpack_from('<I', block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    if end < 0:
        raise CheckpointError('corrupt index block (restart array)')
    entries, key, pos = [], b'', 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + value_len]))
        pos += value_len
    return entries


def _table_entries(table: bytes) -> list[tuple[bytes, bytes]]:
    if len(table) < FOOTER_SIZE or struct.unpack_from('<Q', table, len(table) - 8)[0] != TABLE_MAGIC:
        raise CheckpointError('not a TF checkpoint index (bad magic number)')
    footer = table[-FOOTER_SIZE:]
    _, pos = _varint(footer, 0)          # metaindex handle (unused)
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    entries = []
    for _, handle in _block_entries(_read_block(table, index_offset, index_size)):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        entries += _block_entries(_read_block(table, offset, size))
    return entries


# ----------------------------------------------------------------------------------------------
# Public API


def resolve_prefix(path: str | os.PathLike) -> Path:
    """A checkpoint prefix from a prefix, its ``.index``/``.data-*`` file, or its folder (whose
    ``checkpoint`` file names the newest one, as tf.train.latest_checkpoint reads it)."""
    path = Path(path)
    if path.is_dir():
        return _prefix_in_folder(path)
    text = str(path)
    match = re.match(r'(.*)\.(index|data-\d+-of-\d+)$', text)
    prefix = Path(match.group(1)) if match else path
    if not Path(f'{prefix}.index').is_file():
        raise CheckpointError(f'no TF checkpoint at {path}: expected {prefix}.index and {prefix}.data-* '
                              f'(pass the prefix such as .../UGATIT.model-1000000, or its folder)')
    return prefix


def _prefix_in_folder(folder: Path) -> Path:
    state = folder / 'checkpoint'
    if state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(), re.MULTILINE)
        if match:
            named = Path(match.group(1))
            # Saver may have written a path relative to the training run's working directory or an
            # absolute one from another machine: fall back to the file name inside this folder.
            for candidate in (named if named.is_absolute() else folder / named, folder / named.name):
                if Path(f'{candidate}.index').is_file():
                    return candidate
    indexes = sorted(folder.glob('*.index'))
    if len(indexes) == 1:
        return indexes[0].with_suffix('')
    if not indexes:
        raise CheckpointError(f'no TF checkpoint (*.index) in {folder}')
    names = ', '.join(p.stem for p in indexes)
    raise CheckpointError(f'{folder} holds several checkpoints ({names}) and its checkpoint file names none '
                          f'of them: pass one prefix')


class TFCheckpoint:
    """A TF V2 checkpoint: names, shapes and dtypes from the index; values read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.prefix = resolve_prefix(path)
        raw = Path(f'{self.prefix}.index').read_bytes()
        header, self.entries = None, {}
        for key, value in _table_entries(raw):
            if key == b'':
                header = dict(_proto_fields(value))
            else:
                self.entries[key.decode('utf-8')] = _parse_entry(value)
        if header is None:
            raise CheckpointError(f'{self.prefix}.index has no bundle header (not a V2 checkpoint?)')
        if header.get(2, 0) != 0:
            raise CheckpointError(f'{self.prefix} was written big-endian; only little-endian checkpoints are read')
        self.num_shards = header.get(1, 1)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in self.entries.items()}

    def data_path(self, shard: int) -> Path:
        return Path(f'{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}')

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """The tensor ``name`` as a writable NumPy array (bfloat16 widened to float32)."""
        entry = self.entries[name]
        if entry.sliced:
            raise CheckpointError(f'{name} is stored as partitioned slices, which this reader does not support')
        if entry.dtype not in DTYPES:
            raise CheckpointError(f'{name} has TF dtype {entry.dtype}, which this reader does not support')
        dtype = DTYPES[entry.dtype]
        storage = np.dtype('<u2') if dtype == 'bfloat16' else dtype
        count = int(np.prod(entry.shape, dtype=np.int64))
        if count * storage.itemsize != entry.size:
            raise CheckpointError(f'{name}: {entry.size} bytes stored for shape {entry.shape}')
        array = np.empty(count, dtype=storage)
        path = self.data_path(entry.shard)
        try:
            with open(path, 'rb') as f:
                f.seek(entry.offset)
                got = f.readinto(memoryview(array).cast('B'))
        except FileNotFoundError:
            raise CheckpointError(f'missing data file {path}') from None
        if got != entry.size:
            raise CheckpointError(f'{path} ends inside {name} (truncated download?)')
        if verify and mask_crc(crc32c(array)) != entry.crc32c:
            raise CheckpointError(f'checksum mismatch for {name} in {path} (corrupt download?)')
        if dtype == 'bfloat16':
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.reshape(entry.shape)


def write_checkpoint(prefix: str | os.PathLike, tensors: dict[str, np.ndarray], block_size: int = 4096,
                     restart_interval: int = 16) -> None:
    """Write ``tensors`` as a single-shard TF V2 checkpoint at ``prefix`` (plus the folder's
    ``checkpoint`` file), as tf.train.Saver would: uncompressed blocks of about ``block_size``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    entries, offset = {}, 0
    with open(f'{prefix}.data-00000-of-00001', 'wb') as data:
        for name in sorted(tensors):
            array = np.asarray(tensors[name], order='C')   # (ascontiguousarray would make scalars 1-d)
            array = array.astype(array.dtype.newbyteorder('<'), copy=False)
            data.write(memoryview(array).cast('B'))
            entries[name] = Entry(DTYPE_CODES[array.dtype], tuple(array.shape), 0, offset, array.nbytes,
                                  mask_crc(crc32c(array)))
            offset += array.nbytes
    header = b'\x08\x01\x1a\x02\x08\x01'   # num_shards 1, little-endian, version {producer 1}
    records = [(b'', header)] + [(name.encode(), _serialize_entry(entries[name])) for name in sorted(entries)]
    Path(f'{prefix}.index').write_bytes(_build_table(records, block_size, restart_interval))
    (prefix.parent / 'checkpoint').write_text(f'model_checkpoint_path: "{prefix.name}"\n'
                                              f'all_model_checkpoint_paths: "{prefix.name}"\n')


def _build_block(records: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, previous = bytearray(), [], b''
    for i, (key, value) in enumerate(records):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += _put_varint(shared) + _put_varint(len(key) - shared) + _put_varint(len(value))
        out += key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f'<{len(restarts)}I', *restarts) + struct.pack('<I', len(restarts))


def _encode_block(contents: bytes) -> tuple[bytes, int]:
    """Blocks are stored uncompressed, as TF's BundleWriter does (tests swap in Snappy)."""
    return contents, NO_COMPRESSION


def _build_table(records: list[tuple[bytes, bytes]], block_size: int, restart_interval: int) -> bytes:
    table = bytearray()

    def add_block(contents: bytes) -> bytes:
        contents, kind = _encode_block(contents)
        handle = _put_varint(len(table)) + _put_varint(len(contents))
        trailer = bytes([kind])
        table.extend(contents + trailer + struct.pack('<I', mask_crc(crc32c(contents + trailer))))
        return handle

    index, pending, size = [], [], 0
    for record in records:
        pending.append(record)
        size += len(record[0]) + len(record[1]) + 3
        if size >= block_size:
            index.append((pending[-1][0], add_block(_build_block(pending, restart_interval))))
            pending, size = [], 0
    if pending:
        index.append((pending[-1][0], add_block(_build_block(pending, restart_interval))))
    metaindex = add_block(_build_block([], restart_interval))
    index_handle = add_block(_build_block(index, 1))
    footer = (metaindex + index_handle).ljust(FOOTER_SIZE - 8, b'\0') + struct.pack('<Q', TABLE_MAGIC)
    return bytes(table + footer)
