"""int8 quantization with calibrated, fixed activation scales (`--quantize int8`).

ONNX Runtime's dynamic quantization picks every activation's scale from the batch at run time,
so a text's logits depend on which texts share its batch (measured: up to 0.3 in logits alone
vs in a batch of 32), and the service's "same answer alone or batched" promise breaks. Here the
weights are quantized as ONNX Runtime's dynamic quantizer does (int8, one scale per tensor), but
each activation gets one uint8 scale and zero point, calibrated once on training inputs and
stored in the graph: `QuantizeLinear` with constant parameters feeds `MatMulIntegerToFloat`
(dequantization and bias folded into the integer GEMM). Integer accumulation is exact, so a
text's logits no longer depend on its batch-mates, and the kernels are the ones dynamic
quantization runs: the speed is the same (docs/sentiment_int8.md).

Calibration ranges are the min and max over real tokens only: padding rows never reach a real
token's logits (attention and pooling mask them), so they need not fit the range.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models.text import TextTokenizer

MS_DOMAIN = "com.microsoft"


class QuantizationError(RuntimeError):
    """The graph does not have the shape this quantizer rewrites; nothing was written."""


@dataclass(frozen=True)
class Int8Result:
    activations: int  # activation tensors given a fixed scale
    gemms: int  # integer GEMMs (MatMulIntegerToFloat) in the written graph
    calibration_rows: int  # real tokens (or pooled rows) the ranges were taken over


def _dynamic_int8(fp32: Path) -> onnx.ModelProto:
    """ONNX Runtime's weight quantization (int8 per tensor), dynamic activations for now."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dynamic.onnx"
        quantize_dynamic(fp32, out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        return onnx.load(str(out))


def _ranges(
    model: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[dict[str, np.ndarray]]
) -> tuple[dict[str, tuple[float, float]], int]:
    """Min and max of each named float tensor over the calibration batches, real tokens only."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in tensors:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    # Unfused, so that every tensor named in the quantized graph exists at run time.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    lo = dict.fromkeys(tensors, 0.0)  # the range always holds 0: exact zero point, exact padding zeros
    hi = dict.fromkeys(tensors, 0.0)
    rows = 0
    for f in feeds:
        mask = f["attention_mask"].astype(bool) if "attention_mask" in f else None
        rows += int(mask.sum()) if mask is not None else len(next(iter(f.values())))
        for name, v in zip(tensors, sess.run(list(tensors), f), strict=True):
            if mask is not None and v.ndim == 3 and v.shape[:2] == mask.shape:
                v = v[mask]  # per-token activations: real tokens only
            if v.size:
                lo[name] = min(lo[name], float(v.min()))
                hi[name] = max(hi[name], float(v.max()))
    return {n: (lo[n], hi[n]) for n in tensors}, rows


def _uint8_params(lo: float, hi: float) -> tuple[float, int]:
    scale = (hi - lo) / 255.0
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0  # an all-zero activation: any scale represents it exactly
    return float(scale), int(np.clip(round(-lo / scale), 0, 255))


def quantize_int8(fp32: Path, int8: Path, calibration: Sequence[dict[str, np.ndarray]]) -> Int8Result:
    """Write an int8 model of `fp32` whose activation scales come from `calibration` feeds.

    `calibration` holds model feeds (input_ids, attention_mask, ...) built by the serving
    tokenizer from training texts. Raises QuantizationError when the graph is not one this
    rewrite understands (it never writes a half-rewritten model).
    """
    if not calibration:
        raise QuantizationError("static int8 needs calibration inputs; got none")
    model = _dynamic_int8(Path(fp32))
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}

    dqls = [n for n in g.node if n.op_type == "DynamicQuantizeLinear"]
    if not dqls:
        raise QuantizationError(f"{fp32}: no MatMul/Gemm with constant weights to quantize")
    ranges, rows = _ranges(model, [n.input[0] for n in dqls], calibration)

    replace: dict[int, onnx.NodeProto] = {}  # id(old node) -> new node in its place
    drop: set[int] = set()
    for n in dqls:
        y, y_scale, y_zp = n.output
        scale, zp = _uint8_params(*ranges[n.input[0]])
        g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), y_scale))
        g.initializer.append(numpy_helper.from_array(np.array(zp, np.uint8), y_zp))
        replace[id(n)] = helper.make_node("QuantizeLinear", [n.input[0], y_scale, y_zp], [y], name=f"{y}/static")

    act_scales = {n.output[1] for n in dqls}
    gemms = 0
    for n in [n for n in g.node if n.op_type == "MatMulInteger"]:
        # ONNX Runtime's quantizer writes MatMulInteger -> Cast(float) -> Mul(a_scale * b_scale) [-> Add(bias)].
        qa, qb, a_zp, b_zp = n.input
        cast = consumers.get(n.output[0], [])
        mul = consumers.get(cast[0].output[0], []) if len(cast) == 1 else []
        if len(cast) != 1 or cast[0].op_type != "Cast" or len(mul) != 1 or mul[0].op_type != "Mul":
            raise QuantizationError(f"{n.name}: unexpected nodes after MatMulInteger")
        cast, mul = cast[0], mul[0]
        scales = producer.get(mul.input[1])
        if scales is None or scales.op_type != "Mul":
            raise QuantizationError(f"{n.name}: scale product not found")
        a_scale, b_scale = scales.input
        if b_scale in act_scales:  # the product's operands in the other order
            a_scale, b_scale = b_scale, a_scale
        if a_scale not in act_scales:
            raise QuantizationError(f"{n.name}: activation scale not found")
        out, bias = mul.output[0], None
        after = consumers.get(out, [])
        if len(after) == 1 and after[0].op_type == "Add":
            other = next(i for i in after[0].input if i != out)
            n_cols = inits[qb].dims[-1] if qb in inits else None
            if other in inits and list(inits[other].dims) == [n_cols]:  # a per-column bias folds into the GEMM
                bias, out = other, after[0].output[0]
                drop.add(id(after[0]))
        drop.update({id(cast), id(mul)})
        if len(consumers[scales.output[0]]) == 1:
            drop.add(id(scales))
        replace[id(n)] = helper.make_node(
            "MatMulIntegerToFloat",
            [qa, qb, a_scale, b_scale, a_zp, b_zp, *([bias] if bias else [])],
            [out],
            name=f"{out}/to_float",
            domain=MS_DOMAIN,
        )
        gemms += 1

    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    left = {n.op_type for n in g.node} & {"DynamicQuantizeLinear", "MatMulInteger"}
    if left:
        raise QuantizationError(f"{fp32}: {sorted(left)} left after the rewrite")
    onnx.checker.check_model(model)
    onnx.save(model, str(int8))
    return Int8Result(activations=len(dqls), gemms=gemms, calibration_rows=rows)


# ---- measuring int8 against fp32 ----------------------------------------------------------------
def text_batches(tok: TextTokenizer, texts: Sequence[str], batch_size: int, names: list[str]) -> list[dict]:
    """The serving tokenizer's feeds for `texts`, in batches of `batch_size` padded to their longest."""
    return [tok(texts[i : i + batch_size]).feeds(names) for i in range(0, len(texts), batch_size)]


def _pass_seconds(sess: Any, feeds: list[dict]) -> float:
    start = time.perf_counter()
    for f in feeds:
        sess.run(None, f)
    return time.perf_counter() - start


def compare_throughput(
    fp32: Any,
    int8: Any,
    tok: TextTokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    repeats: int = 5,
    max_texts: int = 512,
) -> dict[str, float]:
    """Texts per second of two ORT sessions on the same batches: median of alternating passes."""
    texts = list(texts[:max_texts])
    names = [i.name for i in fp32.get_inputs()]
    feeds = text_batches(tok, texts, batch_size, names)
    for sess in (fp32, int8):  # first runs allocate and pick kernels
        sess.run(None, feeds[0])
    t32, t8 = [], []
    for _ in range(repeats):
        t32.append(_pass_seconds(fp32, feeds))
        t8.append(_pass_seconds(int8, feeds))
    m32, m8 = statistics.median(t32), statistics.median(t8)
    threads = fp32.get_session_options().intra_op_num_threads
    return {
        "texts": len(texts),
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": threads,
        "fp32_texts_per_s": len(texts) / m32,
        "int8_texts_per_s": len(texts) / m8,
        "fp32_pass_s": [round(t, 3) for t in t32],
        "int8_pass_s": [round(t, 3) for t in t8],
        "speedup": m32 / m8,
        "mean_tokens": float(np.mean([f["attention_mask"].sum() / len(f["attention_mask"]) for f in feeds])),
    }


def batch_dependence(sess: Any, tok: TextTokenizer, texts: list[str]) -> float:
    """Max |logits of a text run alone - the same text's logits in a batch of 32|."""
    names = [i.name for i in sess.get_inputs()]
    together = np.concatenate(
        [sess.run(None, tok(texts[i : i + 32]).feeds(names))[0] for i in range(0, len(texts), 32)]
    )
    alone = np.concatenate([sess.run(None, tok([t]).feeds(names))[0] for t in texts])
    return float(np.abs(together - alone).max())
