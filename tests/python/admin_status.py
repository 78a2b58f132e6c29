#!/usr/bin/env python3
"""Call bitsync.v1.Admin/Status with Python grpcio on a node's admin.sock.

A stock client for tests/serve_binary.rs (stubs generated from proto/ at
test time, as for list_manifests.py). grpcio derives the HTTP/2 :authority
of a unix: target from the socket path, percent-encoded, which the node's
HTTP/2 layer refuses; `--authority localhost` sets the channel option
`grpc.default_authority`, the one option a grpcio client needs
(docs/PROTOCOL.md section 11).

Prints one JSON object: {"node_id": ...}, or {"error": CODE, "message": ...}
with exit code 3 when the call fails with a gRPC status.
"""

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stubs", required=True, help="directory holding the generated bitsync/v1/*_pb2*.py")
    ap.add_argument("--socket", required=True, help="the node's admin.sock")
    ap.add_argument("--authority", help="sent as :authority (grpc.default_authority)")
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()

    sys.path.insert(0, args.stubs)
    import grpc  # noqa: E402
    from bitsync.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402

    options = [("grpc.default_authority", args.authority)] if args.authority else []
    with grpc.insecure_channel("unix:" + args.socket, options=options) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            resp = stub.Status(admin_pb2.StatusRequest(), timeout=args.timeout)
        except grpc.RpcError as e:
            print(json.dumps({"error": e.code().name, "message": e.details()}))
            return 3
    print(json.dumps({"node_id": resp.node_id}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
