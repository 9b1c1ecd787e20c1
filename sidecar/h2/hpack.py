"""HPACK (RFC 7541) for the HTTP/2 data path: a caching decoder and a stateless encoder.

Decoding uses the pure-Python `hpack` package (static/dynamic tables, Huffman) for the real
work and amortises it: gRPC peers (grpc-core, h2load, nginx, Go) send nearly the same header
block on every call.  A block decodes to the same list whenever the dynamic table is in the
same state, so results are cached under (block, table state); see `Decoder`.  The cache is
exact, never merely likely: a hit is only taken in the very table state it was made in.

Encoding towards a peer never touches the peer's dynamic table: static-table indexes where one
matches, literals without indexing otherwise (never-indexed for credentials).  That makes every
encoded field a pure function of (name, value), so encoded fields are cached too.
"""
from __future__ import annotations

import hpack as _hpack
from hpack import exceptions as _hx
from hpack.table import HeaderTable as _Table

from sidecar.h2.frames import COMPRESSION_ERROR, ConnectionError_

Headers = tuple[tuple[bytes, bytes], ...]

_STATIC = _Table.STATIC_TABLE
_STATIC_PAIR = {}
_STATIC_NAME = {}
for _i, (_n, _v) in enumerate(_STATIC, 1):
    _STATIC_PAIR.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)
_NEVER_INDEX = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})

CACHE_ENTRIES = 512  # distinct header blocks kept per connection
CACHE_BLOCK_MAX = 2048  # longer blocks are not worth keeping


class HeaderListTooLarge(Exception):
    """The decoded header list exceeds the advertised SETTINGS_MAX_HEADER_LIST_SIZE: the stream
    is refused, the connection (whose HPACK state is intact) goes on."""


def encode_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix; `first` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """(value, next position) of the integer whose prefix is in block[pos]."""
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(block):
            raise ValueError("integer truncated")
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
        if shift > 56:
            raise ValueError("integer too large")


def encode_str(data: bytes) -> bytes:
    """A raw (not Huffman coded) string literal: decoding it costs the peer nothing."""
    return encode_int(len(data), 7) + data


def mutates_table(block: bytes) -> bool:
    """Could decoding `block` change the dynamic table?  Walks the representations without
    decoding strings.  A block this cannot walk is treated as mutating (never cached); the real
    decoder then reports what is wrong with it."""
    pos, n = 0, len(block)
    try:
        while pos < n:
            b = block[pos]
            if b & 0x80:  # indexed field
                _, pos = decode_int(block, pos, 7)
                continue
            if b & 0xC0 == 0x40 or b & 0xE0 == 0x20:  # incremental indexing / size update
                return True
            index, pos = decode_int(block, pos, 4)  # without indexing / never indexed
            if index == 0:
                length, pos = decode_int(block, pos, 7)
                pos += length
            length, pos = decode_int(block, pos, 7)
            pos += length
        return pos != n
    except (ValueError, IndexError):
        return True


class Decoder:
    """One connection's receiving HPACK context.

    The cache maps a block to its decoded list *and the table state it was decoded in* (a
    token renewed whenever the table changes).  Two kinds of block hit:
      - blocks that cannot touch the table (indexed and non-indexed literals only);
      - blocks that insert entries but leave the table exactly as they found it: once a peer
        has re-inserted the same fields often enough (nginx sends `server`, `date` … with
        incremental indexing on every response), the table holds only copies of them and one
        more insertion evicts precisely what it adds.  That is checked by comparing the table
        before and after the slow decode, never assumed.
    """

    __slots__ = ("_dec", "_cache", "_token", "max_list_size")

    def __init__(self, max_list_size: int = 16384, table_size: int = 4096):
        # hpack's own list limit is only a decompression-bomb guard (it aborts mid-block, which
        # breaks the shared table: a connection error); the advertised limit is checked after
        # a complete decode, so exceeding it costs one stream, not the connection.
        self._dec = _hpack.Decoder(max_header_list_size=max(max_list_size * 4, 65536))
        self._dec.max_allowed_table_size = table_size  # what we advertise: SETTINGS_HEADER_TABLE_SIZE
        self._dec.header_table_size = table_size
        self._cache: dict[bytes, tuple[Headers, object]] = {}
        self._token = object()
        self.max_list_size = max_list_size

    def _state(self) -> tuple:
        table = self._dec.header_table
        return table.maxsize, tuple(table.dynamic_entries)

    def decode(self, block: bytes) -> Headers:
        hit = self._cache.get(block)
        if hit is not None and hit[1] is self._token:
            headers = hit[0]
        else:
            before = self._state() if mutates_table(block) else None
            try:
                headers = tuple((n, v) for n, v in self._dec.decode(block, raw=True))
            except (_hx.HPACKError, ValueError, IndexError) as exc:
                raise ConnectionError_(COMPRESSION_ERROR, f"bad header block: {exc}") from None
            if before is not None and self._state() != before:
                # A new table: every cached result is void, this block's included (it was
                # decoded in the table that is gone).
                self._token = object()
                self._cache.clear()
            elif len(block) <= CACHE_BLOCK_MAX:
                if len(self._cache) >= CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[block] = (headers, self._token)
        if self.max_list_size:
            size = 0
            for n, v in headers:
                size += len(n) + len(v) + 32
            if size > self.max_list_size:
                raise HeaderListTooLarge(f"header list of {size} octets exceeds {self.max_list_size}")
        return headers


class Encoder:
    """One connection's sending side; stateless on the wire, so it needs no table-size
    negotiation with the peer."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes], bytes] = {}

    def encode(self, headers) -> bytes:
        cache = self._cache
        parts = []
        for pair in headers:
            enc = cache.get(pair)
            if enc is None:
                enc = encode_field(pair[0], pair[1])
                if len(cache) >= 2048:
                    cache.clear()
                cache[pair] = enc
            parts.append(enc)
        return b"".join(parts)


def encode_field(name: bytes, value: bytes) -> bytes:
    index = _STATIC_PAIR.get((name, value))
    if index is not None:
        return encode_int(index, 7, 0x80)
    first = 0x10 if name in _NEVER_INDEX else 0x00
    index = _STATIC_NAME.get(name)
    if index is not None:
        return encode_int(index, 4, first) + encode_str(value)
    return bytes((first,)) + encode_str(name) + encode_str(value)
