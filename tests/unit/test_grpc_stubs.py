"""The checked-in gRPC stubs must match proto/ (regenerate with `python -m loraplex.server.grpc_codegen`)."""

from loraplex.server import grpc_codegen


def test_checked_in_stubs_are_fresh():
    assert grpc_codegen.main(["--check"]) == 0


def test_a_changed_proto_is_detected(tmp_path, monkeypatch):
    proto = tmp_path / "loraplex" / "v1" / "loraplex.proto"
    proto.parent.mkdir(parents=True)
    proto.write_text(grpc_codegen.PROTO_FILES[0].read_text().replace("string request_id = 6;",
                                                                     "string request_id = 6;\n  bool extra = 99;"))
    monkeypatch.setattr(grpc_codegen, "PROTO_ROOT", tmp_path)
    monkeypatch.setattr(grpc_codegen, "PROTO_FILES", [proto])
    assert grpc_codegen.main(["--check"]) == 1
