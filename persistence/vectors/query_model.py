"""The query model: all-MiniLM-L6-v2 computed in int8, for search queries only.

The stored model (``embeddings.prepare_model_dir``) keeps int8 weights but
dequantizes them at load and computes in float32: 7-11 ms of CPU per short
query on one core, the largest single cost of a reply that recalls. This
module derives from it, once, a dynamically quantized copy: each layer's
attention fused into one operator (``attention_fusion``; onnxruntime's
transformer optimizer fuses the layer norms and GELUs), then onnxruntime's
quantizer (every MatMul, the attention's projections and the token
embeddings in int8, weights per output channel). About 40% less CPU per
query than the stored model, vectors within cosine 0.98 (mean 0.99) of its
own, and the same LoCoMo recall@1/5/10 (docs/benchmarks.md, "The query
model"). A build that cannot fuse (another export of the model) quantizes
it unfused, as before, and says so in the log.

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

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "BOTERNITY_MODEL_CACHE"  # where derived models are kept (default below)
KIND = "all-MiniLM-L6-v2-query-int8"
RECIPE = 2  # how it is derived; a model cached by another recipe is not reused


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
    return f"{KIND}-r{RECIPE}-{digest}-ort{onnxruntime.__version__}"


def _quantize(source: Path, out: Path, work: Path) -> None:
    """Write the int8 model of ``source`` to ``out`` (``work``: a scratch directory)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _fused(_fold(source, work), json.loads((source.parent / "config.json").read_text()))
    root = logging.getLogger()
    quiet = _DropQuantizerAdvice()
    root.addFilter(quiet)  # it logs advice on the root logger on every run
    try:
        quantize_dynamic(model, out, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gather", "Attention"])
    finally:
        root.removeFilter(quiet)


def _fold(source: Path, work: Path) -> Any:
    """``source`` as float32 weights (an ``onnx.ModelProto``; ``work``: a scratch directory).

    The stored model keeps int8 weights as Cast+Mul chains; onnxruntime folds
    them into float32 weights at load. That folded graph is what the fusions
    and the quantizer can read (they match float MatMuls, not the chains).
    """
    import onnx
    import onnxruntime

    folded = work / "folded.onnx"
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return onnx.load(folded)


def _fused(folded: Any, config: dict[str, Any]) -> Any:
    """``folded`` with each layer's attention, layer norms and GELUs fused, when
    the result computes the same vectors; else ``folded`` as it was."""
    from onnxruntime.transformers.optimizer import optimize_model

    from persistence.vectors.attention_fusion import fuse_attention

    model = copy.deepcopy(folded)
    layers = fuse_attention(model, config["num_attention_heads"])
    # The rest (SkipLayerNormalization, BiasGelu) is the optimizer's own BERT
    # fusion; its onnxruntime pass (opt_level > 0) is left to the session at load.
    model = optimize_model(model, model_type="bert", num_heads=config["num_attention_heads"],
                           hidden_size=config["hidden_size"], opt_level=0).model
    if layers != config["num_hidden_layers"] or not _same_output(folded, model):
        log.warning("the query model's attention could not be fused (%d of %d layers): "
                    "quantizing it unfused (as close to the exact model, ~15%% slower)",
                    layers, config["num_hidden_layers"])
        return folded
    return model


def _same_output(a: Any, b: Any) -> bool:
    """Whether two models give the same hidden states for a padded batch of two."""
    import numpy as np
    import onnxruntime

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(2, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # the second text is shorter: padding must be masked out
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    outputs = [onnxruntime.InferenceSession(m.SerializeToString(),
                                            providers=["CPUExecutionProvider"]).run(None, feed)[0]
               for m in (a, b)]
    kept = mask.astype(bool)  # hidden states of padding are never pooled
    return bool(np.allclose(outputs[0][kept], outputs[1][kept], atol=1e-4))


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
