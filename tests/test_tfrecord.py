"""synthesis.tfrecord (TFRecord framing and the Example proto without TensorFlow), checked
against TensorFlow's own writer, reader and proto classes, and the entry points that must never
load TensorFlow next to PyTorch (issue 13)."""

from __future__ import annotations

import ast
import os
import pathlib
import struct

import numpy as np
import pytest

from synthesis import tfrecord
from wdam_jax.data.tf_setup import import_tensorflow

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_crc32c_known_values_and_long_inputs():
    # RFC 3720 (iSCSI) appendix B.4 test vectors and the classic check value.
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA
    assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tfrecord.crc32c(bytes(range(32))) == 0x46DD794E
    assert tfrecord.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert tfrecord.crc32c(b"") == 0
    # The lane-parallel path (>= 4 KiB) against the byte-at-a-time loop, around the lane sizes.
    rng = np.random.default_rng(0)
    for n in (4095, 4096, 4097, 8191, 65536 + 3, 300_001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tfrecord.crc32c(data) == tfrecord._raw_crc_small(data, 0xFFFFFFFF) ^ 0xFFFFFFFF, n


def _tf_example(tf, features: dict) -> bytes:
    def feature(v):
        v = v if isinstance(v, list) else [v]
        if isinstance(v[0], bytes | str):
            b = [x.encode() if isinstance(x, str) else x for x in v]
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=b))
        if isinstance(v[0], int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=v))
        return tf.train.Feature(float_list=tf.train.FloatList(value=v))

    proto = tf.train.Example(
        features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})
    )
    return proto.SerializeToString(deterministic=True)


FEATURES = {
    "image/encoded": os.urandom(3000),
    "image/source": "bottle/train/good/000.png",
    "fmas/prompt": "a crack, ünïcode",
    "empty": b"",
    "fmas/seed": 2**31 + 5,
    "negative": [-1, 0, 1, -(2**63), 2**63 - 1],
    "fmas/cfg": 7.25,
    "floats": [0.1, -3.5, 1e30, float("inf")],
    "many/bytes": [b"a", b"", b"ccc"],
}


def test_example_encoding_is_byte_identical_to_tensorflow():
    tf = import_tensorflow()
    ours = tfrecord.encode_example(FEATURES)
    assert ours == _tf_example(tf, FEATURES)
    parsed = tf.train.Example.FromString(ours).features.feature
    assert list(parsed["negative"].int64_list.value) == FEATURES["negative"]
    assert parsed["fmas/prompt"].bytes_list.value == [FEATURES["fmas/prompt"].encode()]


def test_parse_example_reads_what_tensorflow_writes():
    tf = import_tensorflow()
    # Non-deterministic (insertion-ordered) serialisation too: order must not matter.
    proto = tf.train.Example.FromString(_tf_example(tf, FEATURES))
    for raw in (proto.SerializeToString(), proto.SerializeToString(deterministic=True)):
        got = tfrecord.parse_example(raw)
        assert set(got) == set(FEATURES)
        assert got["image/encoded"] == [FEATURES["image/encoded"]]
        assert got["fmas/prompt"] == [FEATURES["fmas/prompt"].encode()]
        assert got["negative"] == FEATURES["negative"] and got["fmas/seed"] == [2**31 + 5]
        np.testing.assert_array_equal(np.float32(got["floats"]), np.float32(FEATURES["floats"]))
        assert got["many/bytes"] == FEATURES["many/bytes"] and got["empty"] == [b""]
        assert tfrecord.parse_example(raw, names=["fmas/cfg"]) == {"fmas/cfg": [7.25]}
    # Unpacked numbers (proto2 writers) are valid encodings too.
    unpacked = tfrecord._field(
        1,
        tfrecord._field(
            1,
            tfrecord._field(1, b"n")
            + tfrecord._field(2, tfrecord._field(3, bytes([0x08, 0x05, 0x08, 0x07]))),
        ),
    )
    assert tfrecord.parse_example(unpacked) == {"n": [5, 7]}
    with pytest.raises(tfrecord.RecordError, match="Malformed Example"):
        tfrecord.parse_example(b"\x0a\x05\x0a")


def test_record_files_match_tensorflows_writer_and_reader(tmp_path):
    tf = import_tensorflow()
    rng = np.random.default_rng(1)
    records = [b"", b"x", rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes(), b"end"]
    ours, theirs = tmp_path / "ours.tfrecord", tmp_path / "theirs.tfrecord"
    tfrecord.write_records(ours, records)
    with tf.io.TFRecordWriter(str(theirs)) as w:
        for r in records:
            w.write(r)
    assert ours.read_bytes() == theirs.read_bytes()
    assert [r.numpy() for r in tf.data.TFRecordDataset([str(ours)])] == records
    assert list(tfrecord.read_records(theirs)) == records


def test_damaged_record_files_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "a.tfrecord"
    tfrecord.write_records(path, [b"first record", b"second record"])
    whole = path.read_bytes()
    first = len(tfrecord.frame(b"first record"))
    cases = {
        "truncated data": whole[: first + 15],
        "truncated length header": whole[: first + 5],
        "corrupt length": whole[:first] + b"\x09" + whole[first + 1 :],
        "data checksum mismatch": whole[:-6] + b"X" + whole[-5:],
    }
    for what, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(tfrecord.RecordError, match=what) as err:
            list(tfrecord.read_records(path))
        assert str(path) in str(err.value) and "record 1" in str(err.value)
    path.write_bytes(b"not a record file at all")
    with pytest.raises(tfrecord.RecordError, match="record 0"):
        list(tfrecord.read_records(path))
    assert struct.unpack("<Q", whole[:8])[0] == len(b"first record")


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_synthesis_side_never_imports_tensorflow():
    """The crash of issue 13: with the CUDA torch build, TensorFlow loaded before torch makes
    triton segfault. Nothing that runs in a process with torch may import TensorFlow."""
    paths = [*(REPO / "synthesis").rglob("*.py")]
    paths += [REPO / "launch" / f for f in ("synthesize.py", "subband_analysis.py")]
    for path in paths:
        tf_imports = {m for m in _imports(path) if m.split(".")[0] == "tensorflow"}
        assert not tf_imports, f"{path.relative_to(REPO)} imports {tf_imports}"
        assert "tf_setup" not in path.read_text(), path
