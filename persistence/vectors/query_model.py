"""The query model: all-MiniLM-L6-v2 computed in int8, for search queries only.

The stored model (``embeddings.prepare_model_dir``) keeps int8 weights but
dequantizes them at load and computes in float32: 7-11 ms of CPU per short
query on one core, the largest single cost of a reply that recalls. This
module derives from it, once, a dynamically quantized copy (onnxruntime's
quantizer: every MatMul and the token embeddings in int8, weights per output
channel): 5-6.6 ms per query, vectors within cosine 0.98 (mean 0.99) of the
stored model's, and the same LoCoMo recall@1/5/10 (docs/benchmarks.md,
"The query model").

Only questions use it. What is stored keeps the exact model's vectors, so
nothing is reembedded, and a stored vector never depends on which path
embedded it.

Contract: ``prepare_query_model_dir(model_dir)`` returns a directory that
fastembed loads like the stored model's (the quantized ``model.onnx`` beside
the same tokenizer files). It is built in a temporary directory and renamed
into place, so a crash or two processes building at once never leave a half
model under the real name. It is cached per source model and onnxruntime
version under ``cache_root()``, shared by every data dir of the machine (the
quantizer takes seconds; tests and several installs build it once); when that
directory cannot be written, it is built under the data dir's ``models``.
Blocking (seconds on the first call, milliseconds after): call it from a
worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "BOTERNITY_MODEL_CACHE"  # where derived models are kept (default below)
KIND = "all-MiniLM-L6-v2-query-int8"


def cache_root() -> Path:
    """``$BOTERNITY_MODEL_CACHE``, else ``$XDG_CACHE_HOME/boternity/models``
    (``~/.cache/boternity/models`` when XDG_CACHE_HOME is unset)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "boternity" / "models"


def _key(source: Path) -> str:
    import onnxruntime

    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return f"{KIND}-{digest}-ort{onnxruntime.__version__}"


def _quantize(source: Path, out: Path, work: Path) -> None:
    """Write the int8 model of ``source`` to ``out`` (``work``: a scratch directory)."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The stored model keeps int8 weights as Cast+Mul chains; onnxruntime folds
    # them into float32 weights at load. That folded graph is what the
    # quantizer can read (it quantizes float MatMuls, not the chains).
    folded = work / "folded.onnx"
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    root = logging.getLogger()
    quiet = _DropQuantizerAdvice()
    root.addFilter(quiet)  # it logs advice on the root logger on every run
    try:
        quantize_dynamic(folded, out, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gather"])
    finally:
        root.removeFilter(quiet)


class _DropQuantizerAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _build(model_dir: Path, root: Path) -> Path:
    source = model_dir / "model.onnx"
    target = root / _key(source)
    if (target / "model.onnx").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        staged = work / "model"
        staged.mkdir()
        log.info("building the int8 query model (once per machine) in %s", root)
        _quantize(source, staged / "model.onnx", work)
        for name in os.listdir(model_dir):
            if name != "model.onnx":
                shutil.copyfile(model_dir / name, staged / name)
        try:
            staged.rename(target)
        except OSError:
            if not (target / "model.onnx").is_file():
                raise  # not another process's finished build: a real failure
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def prepare_query_model_dir(model_dir: Path) -> Path:
    """The query model's directory, built from the stored model in ``model_dir`` if needed."""
    try:
        root = cache_root()
    except RuntimeError as exc:  # no home directory to find ~/.cache in
        log.info("no model cache (%s): building beside the data", exc)
        return _build(model_dir, model_dir.parent)
    try:
        return _build(model_dir, root)
    except OSError as exc:
        # A read-only or missing home (a locked-down container), a cache path
        # that is not a directory: keep it with the data instead.
        log.info("model cache %s unusable (%s): building beside the data", root, exc)
        return _build(model_dir, model_dir.parent)
