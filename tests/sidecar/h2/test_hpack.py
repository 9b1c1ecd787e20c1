"""HPACK: RFC 7541 appendix C examples through our caching decoder, the cache staying exact
when the dynamic table changes, and the stateless encoder round-tripping."""
from __future__ import annotations

import pytest

from sidecar.h2 import frames as F
from sidecar.h2.hpack import (Decoder, Encoder, HeaderListTooLarge, decode_int, encode_field, encode_int,
                              mutates_table)

REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")]
REQ2 = REQ + [(b"cache-control", b"no-cache")]
REQ3 = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
        (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


@pytest.mark.parametrize("blocks", [
    # C.3: requests without Huffman coding
    ["8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
     "8286 84be 5808 6e6f 2d63 6163 6865",
     "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"],
    # C.4: the same requests with Huffman coding
    ["8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
     "8286 84be 5886 a8eb 1064 9cbf",
     "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"],
], ids=["C.3", "C.4"])
def test_rfc7541_request_examples(blocks):
    dec = Decoder()
    for block, want in zip(blocks, (REQ, REQ2, REQ3)):
        assert list(dec.decode(h(block))) == want


RESP1 = [(b":status", b"302"), (b"cache-control", b"private"), (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
         (b"location", b"https://www.example.com")]
RESP2 = [(b":status", b"307")] + RESP1[1:]
RESP3 = [(b":status", b"200"), (b"cache-control", b"private"), (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
         (b"location", b"https://www.example.com"), (b"content-encoding", b"gzip"),
         (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")]


def test_rfc7541_c5_responses_with_eviction():
    """C.5: a 256-octet table; each response evicts older entries, and indexed references in
    the next block must see the table as it is after the eviction (no stale cache)."""
    dec = Decoder(table_size=256)
    blocks = [
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a "
        "3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "4803 3330 37c1 c0bf",
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 "
        "677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 "
        "553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
    ]
    for block, want in zip(blocks, (RESP1, RESP2, RESP3)):
        assert list(dec.decode(h(block))) == want


def test_cached_block_follows_the_dynamic_table():
    """The same indexed-only block decodes differently after the table changed; the cache
    must never hand back the old answer."""
    dec = Decoder()
    insert = lambda v: b"\x40" + encode_int(1, 7) + b"x" + encode_int(len(v), 7) + v  # noqa: E731
    ref = b"\xbe"  # dynamic index 62: the newest entry
    assert dec.decode(insert(b"1")) == ((b"x", b"1"),)
    assert dec.decode(ref) == ((b"x", b"1"),)
    assert dec.decode(ref) == ((b"x", b"1"),)  # served from the cache
    assert dec.decode(insert(b"2")) == ((b"x", b"2"),)
    assert dec.decode(ref) == ((b"x", b"2"),)
    with pytest.raises(F.ConnectionError_) as info:  # size update to 0 empties the table
        dec.decode(b"\x20" + ref)
    assert info.value.code == F.COMPRESSION_ERROR


def test_mutation_scan():
    assert not mutates_table(h("8286 84be"))
    assert not mutates_table(b"\x00\x01a\x01b" + b"\x10\x01a\x01b")  # without / never indexed
    assert mutates_table(b"\x40\x01a\x01b")
    assert mutates_table(b"\x3f\xe1\x1f")  # size update
    assert mutates_table(b"\x00\x05ab")  # truncated: never cached


def test_bad_blocks_are_compression_errors():
    for bad in (b"\x80", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x00\x05ab", b"\xfe"):
        with pytest.raises(F.ConnectionError_) as info:
            Decoder().decode(bad)
        assert info.value.code == F.COMPRESSION_ERROR


def test_header_list_limit_is_per_stream():
    dec = Decoder(max_list_size=100)
    block = Encoder().encode([(b"a", b"x" * 80)])
    with pytest.raises(HeaderListTooLarge):
        dec.decode(block)
    assert dec.decode(Encoder().encode([(b"a", b"x")])) == ((b"a", b"x"),)  # state intact


@pytest.mark.parametrize("value,bits", [(0, 5), (10, 5), (30, 5), (31, 5), (1337, 5), (2 ** 40, 7), (127, 7)])
def test_integers_round_trip(value, bits):
    enc = encode_int(value, bits)
    assert decode_int(enc, 0, bits) == (value, len(enc))
    if value == 1337 and bits == 5:
        assert enc == b"\x1f\x9a\x0a"  # RFC 7541 C.1.2


def test_encoder_round_trips_and_never_indexes():
    fields = [(b":method", b"POST"), (b":path", b"/a.B/C"), (b"content-type", b"application/grpc"),
              (b"authorization", b"Bearer t"), (b"x-bin", bytes(range(256))), (b"te", b"trailers")]
    enc = Encoder()
    block = enc.encode(fields)
    assert block == enc.encode(fields)  # cached, same bytes
    assert not mutates_table(block)
    assert list(Decoder().decode(block)) == fields
    assert encode_field(b":method", b"POST") == b"\x83"  # a static-table hit is one octet
    assert encode_field(b"authorization", b"x")[0] & 0xF0 == 0x10  # never indexed


def test_repeated_insertions_reach_a_fixed_point_and_hit():
    """nginx re-inserts `server`/`date` on every response: after the table is full of copies,
    the block leaves the table as it found it and is served from the cache."""
    dec = Decoder(table_size=256)
    block = b"\x40\x06server\x05nginx" + b"\x40\x04date\x1dMon, 21 Oct 2013 20:13:21 GMT"
    for _ in range(10):
        assert dec.decode(block) == ((b"server", b"nginx"), (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"))
    assert block in dec._cache and dec._cache[block][1] is dec._token
    token = dec._token
    assert dec.decode(block)[0] == (b"server", b"nginx")
    assert dec._token is token  # a fixed point: the table did not change
    assert dec.decode(b"\xbf") == ((b"server", b"nginx"),)  # index 63: the table is right


@pytest.mark.parametrize("seed", range(20))
def test_cache_agrees_with_a_plain_decoder(seed):
    """Random sequences of inserting, referencing and resizing blocks: our decoder (with its
    cache) and a fresh hpack decoder (without) must give the same lists and the same errors."""
    import random

    import hpack as ref_hpack
    rng = random.Random(seed)
    enc_lit = lambda n, v: b"\x40" + encode_int(len(n), 7) + n + encode_int(len(v), 7) + v  # noqa: E731
    pool = [enc_lit(b"a", b"1"), enc_lit(b"b", b"x" * 40), enc_lit(b"a", b"1") + enc_lit(b"c", b"3"),
            b"\xbe", b"\xbf", b"\xbe\xbf\xc0", b"\x82\x86", b"\x20", b"\x3f\x61", b"\x3f\xe1\x01",
            b"\x0f\x2f\x01z", b"\x00\x01q\x01r"]
    ours = Decoder(max_list_size=0, table_size=256)
    ref = ref_hpack.Decoder()
    ref.max_allowed_table_size = ref.header_table_size = 256
    for _ in range(300):
        block = rng.choice(pool)
        try:
            want = [tuple(x) for x in ref.decode(block, raw=True)]
        except Exception:
            want = "error"
        try:
            got = [tuple(x) for x in ours.decode(block)]
        except F.ConnectionError_:
            got = "error"
        assert got == want, block
        if want == "error":  # both connections would be dead now; start both afresh
            ours = Decoder(max_list_size=0, table_size=256)
            ref = ref_hpack.Decoder()
            ref.max_allowed_table_size = ref.header_table_size = 256
