#!/usr/bin/env python3
"""Call bitsync.v1.Federation/ListManifests with Python grpcio over mutual TLS.

A third-party client for tests/serve_binary.rs: it shares no code with
bitsync. The stubs are generated from proto/ by the test, at test time:

    python3 -m grpc_tools.protoc -I proto --python_out=STUBS \
        --grpc_python_out=STUBS proto/bitsync/v1/*.proto

The node's certificate is pinned as the only root; every node certificate
names "bitsync", so that is the TLS target name. The client authenticates
with another node's key (node.key, PKCS#8 PEM) and certificate
(`bitsync id --cert`, the PEM after the id line).

Prints one JSON object on stdout: the listing, or {"error": CODE, "message": ...}
with exit code 3 when the call fails with a gRPC status.
"""

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stubs", required=True, help="directory holding the generated bitsync/v1/*_pb2*.py")
    ap.add_argument("--address", required=True, help="host:port of the node's federation listener")
    ap.add_argument("--server-cert", required=True, help="the node's certificate PEM (pinned as the root)")
    ap.add_argument("--cert", required=True, help="the caller's certificate PEM")
    ap.add_argument("--key", required=True, help="the caller's node.key (PKCS#8 PEM)")
    ap.add_argument("--after-seq", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()

    sys.path.insert(0, args.stubs)
    import grpc  # noqa: E402
    from bitsync.v1 import federation_pb2, federation_pb2_grpc  # noqa: E402

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.server_cert),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    )
    options = [("grpc.ssl_target_name_override", "bitsync")]
    with grpc.secure_channel(args.address, creds, options=options) as channel:
        stub = federation_pb2_grpc.FederationStub(channel)
        request = federation_pb2.ListManifestsRequest(after_seq=args.after_seq, limit=args.limit)
        try:
            resp = stub.ListManifests(request, timeout=args.timeout)
        except grpc.RpcError as e:
            print(json.dumps({"error": e.code().name, "message": e.details()}))
            return 3
    out = {
        "manifests": [
            {
                "content_id": m.content_id,
                "seq": m.seq,
                "kind": m.kind,
                "size": m.size,
                "chunk_count": m.chunk_count,
                "publisher": m.publisher,
            }
            for m in resp.manifests
        ],
        "next_after_seq": resp.next_after_seq,
        "more": resp.more,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
