"""gRPC-Web framing, binary and text."""
import base64

import pytest

from sidecar.filters import grpcweb


def test_frames_round_trip_and_trailers():
    body = grpcweb.frame(b"abc") + grpcweb.frame(b"") + grpcweb.trailer_frame(0, "")
    assert grpcweb.decode_messages(body) == [b"abc", b""]
    t = grpcweb.trailer_frame(5, "not found: ü%", [("x-a", "1"), ("x-b-bin", b"\x00")])
    assert t[0] == 0x80 and b"grpc-status:5\r\n" in t and b"grpc-message:not found: %C3%BC%25\r\n" in t
    assert b"x-a:1" in t and b"x-b-bin" not in t


def test_text_may_be_several_padded_pieces():
    one, two = grpcweb.frame(b"a"), grpcweb.frame(b"bc")
    text = base64.b64encode(one) + b"\r\n" + base64.b64encode(two)
    assert grpcweb.decode_messages(grpcweb.decode_text(text)) == [b"a", b"bc"]


@pytest.mark.parametrize("body", [b"\x00\x00\x00", b"\x00\x00\x00\x00\x05ab", b"\x01\x00\x00\x00\x00"])
def test_malformed_bodies_are_errors(body):
    with pytest.raises(grpcweb.GrpcWebError):
        grpcweb.decode_messages(body)


def test_content_types():
    assert grpcweb.is_grpc_web("application/grpc-web+proto") and grpcweb.is_text("application/grpc-web-text")
    assert not grpcweb.is_grpc_web("application/grpc")
    assert grpcweb.response_type("application/grpc-web-text+proto") == "application/grpc-web-text+proto"
    with pytest.raises(grpcweb.GrpcWebError):
        grpcweb.decode_text(b"!!!!")
