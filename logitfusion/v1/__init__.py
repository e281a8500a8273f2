"""Generated protobuf/gRPC modules of protos/logitfusion/v1/ (regenerate with `python -m logitfusion.protos_build`).

Never edit the *_pb2*.py[i] files here by hand; a test regenerates them and fails on any difference.
"""
