"""nnserve's gRPC model server: self-describing ONNX models over KServe v2 and nnserve's task API.

The package has two parts and the process around them; the folder of a module says what it may import
(tests/server/test_layout.py holds every module to this):

- `core/`: the model repository, served models, the batcher, tasks, generation, images, text, statistics
  and metrics. numpy, onnxruntime and the contract (`nnserve_contract`); nothing of gRPC, nothing of `edge/`.
- `edge/`: the gRPC edge. The servicers (protobuf <-> numpy through the codec, then one call into the core),
  the status guard, auth, TLS, tracing, health, the start-up line (`listening`), and `app`, which
  assembles them into a server. It imports the core, never the other way round.
- `settings.py`: the one typed settings object; it imports nothing of nnserve's, and everyone may import it.
- `process/`: `cli` (the `nnserve` command), `workers` and `worker_metrics` (several server processes on
  one port), `event_loop`, `allocator`; they may import anything, and nothing but them imports them.
"""

__version__ = "0.1.0"
