"""Benchmarks: what the service and the models cost, measured side by side.

    python -m scripts.bench                     # serving: graft vs raw ONNX Runtime vs an eager peer (serving.py)
    python -m scripts.bench.sentiment_int8      # sentiment fp32 vs int8 (sentiment_int8.py)

`peer.py` is the naive FastAPI + PyTorch server the serving benchmark compares against.
Benchmarks may import the service and the training code; neither imports them.
"""
