"""Drives halod with a stock Python grpcio client over its unix socket (issue 8, item 7).

Run by cli/tests/hardening.rs:  python3 grpcio_client.py SOCKET PROTO_DIR MODEL
Generates the stubs from the .proto with grpcio-tools, talks to the daemon with grpcio's default
channel options (so grpcio sends its own :authority), and prints one JSON object with what it saw.
"""
import json
import sys
import tempfile

import grpc
from grpc_tools import protoc

sock, proto_dir, model = sys.argv[1:4]
out = tempfile.mkdtemp()
rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
                  "halo/v1/halo.proto"])
if rc != 0:
    sys.exit(f"protoc failed with {rc}")
sys.path.insert(0, out)
from halo.v1 import halo_pb2 as pb  # noqa: E402
from halo.v1 import halo_pb2_grpc as rpc  # noqa: E402

result = {}
with grpc.insecure_channel(f"unix:{sock}") as channel:
    stub = rpc.HaloStub(channel)
    status = stub.Status(pb.StatusRequest(), timeout=60)
    result["version"] = status.version
    result["models"] = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=60).models]
    events = list(stub.Generate(pb.GenerateRequest(model=model, text="The capital of France is",
                                                   temperature=0, max_tokens=3), timeout=600))
    result["job_started"] = any(e.HasField("started") for e in events)
    result["tokens"] = [e.token.token for e in events if e.HasField("token")]
    done = [e.done for e in events if e.HasField("done")]
    result["finish_reason"] = done[0].finish_reason if done else None
    # Both a prompt and messages: refused, not silently using the text (item 8).
    try:
        list(stub.Generate(pb.GenerateRequest(
            model=model, text="Hello", messages=[pb.ChatMessage(role="user", content="Hi")]),
            timeout=60))
        result["both"] = "accepted"
    except grpc.RpcError as e:
        result["both"] = e.code().name
        result["both_message"] = e.details()
print(json.dumps(result))
