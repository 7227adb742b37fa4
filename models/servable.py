"""The one rule for which version of a model is served, used by the server and by every tool.

A version is *servable* when all of this holds, checked in this order by `open_version`:

1. the folder is a valid artifact (schema, every file's sha256; `models.artifact`; a server
   remembers the checksums of files it hashed before, `models.checksums`);
2. its manifest names this model and a task graft serves;
3. ONNX Runtime opens `model.onnx`, and the graph's inputs are the ones the manifest declares;
4. the task can serve the graph (`check_task`): a detector's graph returns `boxes` and `scores`
   without NMS inside; a text model's embedding covers its tokenizer's whole vocabulary;
5. the stored warm-up sample, run through the serving preprocessing, reproduces the output
   recorded at export (within the manifest's tolerance).

Any exception along the way refuses the version, whatever its type: ONNX Runtime raises plain
`Exception` subclasses for graphs it cannot load, and a refused version must never stop a scan.

Which version is served: walk `serving_order` (the pinned version first, then every version
newest first) and take the first one that is already served or opens. So a bad pin or a bad new
version keeps what is served, and a server starting from scratch falls back to the newest version
that works. `pick` is that walk; the server caches refusals around it, `scripts.registry`
(`list`, `pin`, `prune`) and the trainers' `--init-from` call it as is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from . import versions
from .artifact import Artifact, load_artifact, sha256_file
from .checksums import ChecksumCache
from .errors import ArtifactError
from .runtime import CPU_PROVIDER, create_session

if TYPE_CHECKING:
    import onnxruntime as ort

T = TypeVar("T")

SERVED_TASKS = ("image-classification", "object-detection", "sentiment")


@dataclass
class OpenedVersion:
    """A version that passed every check: its artifact and an ONNX Runtime session on it."""

    artifact: Artifact
    session: ort.InferenceSession
    # Seconds spent on each step of opening it: "verify" (manifest and checksums), "session"
    # (ONNX Runtime), "checks" (task checks and the warm-up sample). Cold-start accounting.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


# ---- warm-up: the stored sample through the serving preprocessing ---------------------------
def _warmup_image_classification(artifact: Artifact, session: ort.InferenceSession, data: bytes) -> np.ndarray:
    from .preprocess import ImagePreprocessor

    tensor, _ = ImagePreprocessor(artifact.manifest.preprocessing).from_bytes(data)  # type: ignore[arg-type]
    out = session.get_outputs()[0].name
    return session.run([out], {session.get_inputs()[0].name: tensor[None]})[0]


def _warmup_detection(artifact: Artifact, session: ort.InferenceSession, data: bytes) -> np.ndarray:
    from .detection import postprocess
    from .preprocess import ImagePreprocessor

    post = artifact.manifest.postprocessing
    pre = ImagePreprocessor(artifact.manifest.preprocessing)  # type: ignore[arg-type]
    tensor, geometry = pre.from_bytes(data, draft=False)  # as the service decodes uploads
    boxes, scores = session.run(["boxes", "scores"], {session.get_inputs()[0].name: tensor[None]})
    rows = postprocess(
        boxes[0],
        scores[0],
        score_threshold=post.score_threshold,  # type: ignore[union-attr]
        nms_iou=post.nms_iou,  # type: ignore[union-attr]
        max_detections=post.max_detections,  # type: ignore[union-attr]
        geometry=geometry,
    ).as_rows()
    return rows if len(rows) else np.zeros((0,), dtype=np.float32)


def _warmup_sentiment(artifact: Artifact, session: ort.InferenceSession, data: bytes) -> np.ndarray:
    from .text import load_text_tokenizer

    try:
        texts = json.loads(data.decode("utf-8"))["texts"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"warm-up file: expected {{'texts': [...]}} ({e})") from e
    tokenizer = load_text_tokenizer(artifact.manifest.preprocessing, artifact.path)  # type: ignore[arg-type]
    names = [i.name for i in session.get_inputs()]
    return session.run([session.get_outputs()[0].name], tokenizer(texts).feeds(names))[0]


WARMUPS: dict[str, Callable[[Artifact, Any, bytes], np.ndarray]] = {
    "image-classification": _warmup_image_classification,
    "object-detection": _warmup_detection,
    "sentiment": _warmup_sentiment,
}


def check_task(artifact: Artifact, session: ort.InferenceSession) -> None:
    """Refuse a graph the task's serving code cannot use, before a request finds out."""
    m = artifact.manifest
    outputs = {o.name for o in session.get_outputs()}
    if m.task == "object-detection":
        post = m.postprocessing
        if post is not None and getattr(post, "nms_in_graph", False):
            raise ArtifactError("graphs with NMS inside are not supported by this service")
        if not {"boxes", "scores"} <= outputs:
            raise ArtifactError(
                f"a detector's graph must return 'boxes' and 'scores', this one returns {sorted(outputs)}"
            )
    if m.task == "sentiment":
        from .text import load_text_tokenizer

        # Every id the tokenizer can produce must be a row of the embedding: a tokenizer larger
        # than the model would fail on the first request holding a rare token.
        tokenizer = load_text_tokenizer(m.preprocessing, artifact.path)  # type: ignore[arg-type]
        last = tokenizer.vocab_size - 1
        feeds = {
            "input_ids": np.array([[last]], dtype=np.int64),
            "attention_mask": np.ones((1, 1), dtype=np.int64),
            "token_type_ids": np.zeros((1, 1), dtype=np.int64),
        }
        try:
            session.run(None, {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds})
        except Exception as e:
            raise ArtifactError(
                f"the model cannot take token id {last}, the last of its tokenizer's vocabulary: {_one_line(e)}"
            ) from e


def check_warmup(artifact: Artifact, session: ort.InferenceSession) -> None:
    """Refuse a version whose stored warm-up sample no longer gives the output recorded at export."""
    w = artifact.manifest.warmup
    if w is None:
        return  # artifacts from before warm-up samples existed: served unverified (logged by the server)
    data = artifact.file(w.file).read_bytes()
    got = np.asarray(WARMUPS[artifact.manifest.task](artifact, session, data), dtype=np.float32)
    expected = np.asarray(w.expected, dtype=np.float32)
    if got.shape != expected.shape:
        raise ArtifactError(f"warm-up output shape {got.shape} != the {expected.shape} recorded at export")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not np.isfinite(diff) or diff > w.atol:
        raise ArtifactError(
            f"warm-up output differs from the one recorded at export by {diff:.3g} (tolerance {w.atol:g}); "
            "the model or its preprocessing changed"
        )


# ---- the rule ---------------------------------------------------------------------------
def open_version(
    folder: Path,
    *,
    name: str | None = None,
    threads: int = 1,
    providers: tuple[str, ...] = (CPU_PROVIDER,),
    checksums: ChecksumCache | None = None,
) -> OpenedVersion:
    """Open and verify one version folder, or raise ArtifactError saying why it is refused.

    `checksums`: where a server remembers the sha256 of files it verified before (unchanged files
    are not hashed again; the comparison with the manifest is made every time)."""
    folder = Path(folder)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        if checksums is None:
            artifact = load_artifact(folder)
        else:
            with checksums.version(folder, sha256_file) as hasher:
                artifact = load_artifact(folder, hash_file=hasher)
        timings["verify"] = time.perf_counter() - started
        m = artifact.manifest
        if name is not None and m.name != name:
            raise ArtifactError(f"manifest name {m.name!r} does not match folder {name!r}")
        if m.task not in SERVED_TASKS:
            raise ArtifactError(f"task {m.task!r} is not served by this version of graft")
        try:
            session = create_session(artifact.model_path, threads=threads, providers=providers)
        except Exception as e:  # onnxruntime's errors derive from Exception only
            raise ArtifactError(f"ONNX Runtime cannot load {m.model_file}: {_one_line(e)}") from e
        timings["session"] = time.perf_counter() - started - timings["verify"]
        graph_inputs = {i.name for i in session.get_inputs()}
        declared = {i.name for i in m.inputs}
        if graph_inputs != declared:
            raise ArtifactError(f"manifest inputs {sorted(declared)} do not match the graph's {sorted(graph_inputs)}")
        try:
            check_task(artifact, session)
            check_warmup(artifact, session)
        except ArtifactError:
            raise
        except Exception as e:
            raise ArtifactError(f"warm-up failed: {_one_line(e)}") from e
    except ArtifactError as e:
        raise ArtifactError(_relative(str(e), folder)) from e
    except Exception as e:  # anything else (a permission error, a bug in a task's code) refuses too
        raise ArtifactError(f"{type(e).__name__}: {_one_line(e)}") from e
    timings["checks"] = time.perf_counter() - started - timings["verify"] - timings["session"]
    return OpenedVersion(artifact, session, timings)


def serving_order(root: Path, name: str) -> list[str]:
    """Versions to try, in order: the pinned one first, then every version newest first.

    A pin that cannot be read is an error (the caller reports it); a pin naming a version that
    is not there is tried and refused like any other unservable version.
    """
    pin = versions.read_pin(root, name)
    newest_first = list(reversed(versions.list_versions(root, name)))
    return [pin, *[v for v in newest_first if v != pin]] if pin else newest_first


def pick(order: list[str], *, current: str | None, try_open: Callable[[str], T | None]) -> tuple[str | None, T | None]:
    """Walk `order`: stop at the version already served (keep it) or the first one `try_open` opens.

    Returns (version to serve, its newly opened object or None when it is `current` or nothing
    is servable).
    """
    for version in order:
        if version == current:
            return current, None
        opened = try_open(version)
        if opened is not None:
            return version, opened
    return current, None


def served_version(root: Path, name: str, errors: dict[str, str] | None = None) -> str | None:
    """What a freshly started server would serve for `name`, or None. `errors` collects refusals."""
    try:
        order = serving_order(root, name)
    except (ArtifactError, OSError) as e:
        if errors is not None:
            errors["CURRENT"] = str(e)
        return None

    def try_open(version: str) -> OpenedVersion | None:
        try:
            return open_version(Path(root) / name / version, name=name)
        except ArtifactError as e:
            if errors is not None:
                errors[version] = str(e)
            return None

    version, _ = pick(order, current=None, try_open=try_open)
    return version


def resolve_ref(root: Path, ref: str) -> Path:
    """An artifact reference as users write it: a folder path, NAME/VERSION, or NAME (the version a
    fresh server would serve). Raises ArtifactError naming what is missing."""
    p = Path(ref)
    if p.is_dir() and (p / "manifest.json").is_file():
        return p
    name, _, version = ref.partition("/")
    if not version:
        errors: dict[str, str] = {}
        version = served_version(root, name, errors) or ""
        if not version:
            why = "; ".join(f"{v}: {e}" for v, e in errors.items()) or "it has no versions"
            raise ArtifactError(f"{ref!r}: no servable version of {name!r} in {root} ({why})")
    folder = Path(root) / name / version
    if not folder.is_dir():
        raise ArtifactError(f"{ref!r}: {folder} does not exist")
    return folder


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500] + ("..." if len(text) > 500 else "")


def _relative(message: str, folder: Path) -> str:
    """Errors name `<name>/<version>`, not the server's absolute paths (they reach /models)."""
    short = f"{folder.parent.name}/{folder.name}"
    for p in {str(folder), str(folder.resolve())}:
        message = message.replace(p, short)
    return message
