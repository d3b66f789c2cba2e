"""Execution paths: how a normalised batch (B, 3, S, S) becomes logits and [CLS] features.

Paths (``ExecutionPath.name``):

* ``fp32-eager``   PyTorch fp32, explicit attention (softmax(QK^T)V written out): the reference.
* ``fp32-fused``   PyTorch fp32, fused ``scaled_dot_product_attention``.
* ``bf16-explicit`` / ``bf16-fused``  mixed precision, explicit or fused attention: the
  encoder blocks run under CPU bf16 autocast (matmuls in bf16 on the AVX512-BF16 units;
  LayerNorm, softmax and the residual stream stay fp32), while the patch embedding (a conv
  stem with BatchNorm in some models) and the classifier head run in fp32. Holding the whole
  model in bf16 was as fast but flipped 6x more top-1 answers on the shipped model (99.42%
  vs 99.90% agreement with fp32 on blood-cells; BENCHMARKS.md "Inference").
* ``...-jit`` (e.g. ``bf16-explicit-jit``): the same traced and frozen with TorchScript (weight
  casts folded away) and run with oneDNN Graph fusion (matmul + bias + GELU / add / LayerNorm
  fused), ~20-30% faster than eager bf16 here, but it costs ~15-30 s of tracing and
  compilation before full speed (the first calls for each new batch shape are slow), so it
  pays off only for long runs (thousands of images, a server); its fused kernels also agree
  slightly less with fp32. Opt-in. Batches are padded to the next power of two to bound the
  number of compiled shapes. TorchScript is deprecated upstream: if tracing fails the runner
  falls back to eager and says so in ``note``.
* ``onnx-fp32`` / ``onnx-int8``  ONNX Runtime on an exported graph (see ``export.py``).

Every runner returns ``(logits, features)`` as fp32 tensors; ``features`` is the [CLS]
feature (B, D) used for the unfamiliar-image score (None when the graph has no such output).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ExecutionPath",
    "TORCH_PATHS",
    "JIT_PATHS",
    "PATHS",
    "TorchRunner",
    "LogitsAndFeatures",
    "Float32",
    "synthetic_batch",
    "OnnxRunner",
    "cpu_count",
    "cpu_supports_bf16",
    "configure_threads",
]


@dataclass(frozen=True)
class ExecutionPath:
    backend: str  # "torch" | "onnx"
    precision: str  # "fp32" | "bf16" | "int8"
    fused_attn: bool = False  # torch only
    jit: bool = False  # torch only: TorchScript trace + freeze + oneDNN Graph fusion

    @property
    def name(self) -> str:
        if self.backend == "onnx":
            return f"onnx-{self.precision}"
        if self.jit:
            return f"{self.precision}-{'fused' if self.fused_attn else 'explicit'}-jit"
        if self.precision == "fp32":
            return "fp32-fused" if self.fused_attn else "fp32-eager"
        return f"{self.precision}-{'fused' if self.fused_attn else 'explicit'}"

    @classmethod
    def parse(cls, name: str) -> "ExecutionPath":
        for path in PATHS:
            if path.name == name:
                return path
        raise ValueError(f"unknown execution path {name!r}; known: {', '.join(p.name for p in PATHS)}")


TORCH_PATHS = (
    ExecutionPath("torch", "fp32", False),
    ExecutionPath("torch", "fp32", True),
    ExecutionPath("torch", "bf16", False),
    ExecutionPath("torch", "bf16", True),
)
JIT_PATHS = tuple(ExecutionPath("torch", p.precision, p.fused_attn, jit=True) for p in TORCH_PATHS)
PATHS = TORCH_PATHS + JIT_PATHS + (ExecutionPath("onnx", "fp32"), ExecutionPath("onnx", "int8"))


def cpu_count() -> int:
    """CPUs this process may run on (respects affinity masks / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Use every available core for intra-op parallelism. Returns the thread count."""
    n = threads or cpu_count()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX) and a tiny bf16
    matmul gives the fp32 answer. Emulated bf16 is slower than fp32, so it does not count."""
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    if not native:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(16, 32, generator=g)
        b = torch.randn(32, 8, generator=g)
        got = (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).float()
        return bool(torch.isfinite(got).all() and torch.allclose(got, a @ b, atol=0.5, rtol=0.05))
    except RuntimeError:
        return False


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LogitsAndFeatures(nn.Module):
    """forward(x) -> (logits, [CLS] features): one pass serves both.

    With ``autocast_dtype`` the features are computed under CPU autocast to that dtype and the
    head runs in fp32 on fp32 features."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.autocast_dtype is None:
            features = self.model.forward_features(x)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                features = self.model.forward_features(x)
            features = features.float()
        return self.model.head(features), features


class Float32(nn.Module):
    """Runs the wrapped module in fp32 even inside an autocast region."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.inner(x.float())


def synthetic_batch(size: int, n: int = 4, seed: int = 1234) -> torch.Tensor:
    """Deterministic smooth 'images' on the normalised scale (B, 3, size, size): low-frequency
    colour fields plus a little noise, for sanity-checking a path or an exported graph."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return x + 0.1 * torch.randn(n, 3, size, size, generator=g)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class TorchRunner:
    """Runs a ``VisionTransformer`` (or the torchvision wrapper) on one execution path.

    The model is put in eval mode. For bf16 a copy is made whose patch embedding is pinned to
    fp32 (see the module docstring); the caller's model is left as it was. ``note`` says when
    a JIT path fell back to eager.
    """

    def __init__(self, model: nn.Module, path: ExecutionPath, device: str | torch.device = "cpu"):
        if path.backend != "torch" or path.precision not in _DTYPES:
            raise ValueError(f"{path.name} is not a PyTorch path")
        self.device = torch.device(device)
        autocast = _DTYPES[path.precision] if path.precision != "fp32" else None
        self.note = ""
        self.model = model if autocast is None else copy.deepcopy(model)
        self.model.to(device=self.device, dtype=torch.float32).eval()
        self.model.set_fused_attn(path.fused_attn)
        if autocast is not None and isinstance(getattr(self.model, "patch_embed", None), nn.Module):
            self.model.patch_embed = Float32(self.model.patch_embed)
        self.module: nn.Module = LogitsAndFeatures(self.model, autocast).eval()
        if path.jit:
            try:
                self.module = self._trace(self.module)
            except Exception as e:  # TorchScript cannot handle some model: eager still works
                self.note = f"TorchScript tracing failed ({type(e).__name__}: {e}); running eager"
                path = ExecutionPath("torch", path.precision, path.fused_attn)
        self.path = path

    def _trace(self, module: nn.Module) -> nn.Module:
        import warnings

        size = self.model.config.image_size
        example = torch.zeros(1, 3, size, size, device=self.device)
        torch.jit.enable_onednn_fusion(True)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on constant shape checks, deprecation
            traced = torch.jit.trace(module, example, check_trace=False)  # records the casts
            return torch.jit.freeze(traced)  # folds the weight casts into bf16 constants

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(device=self.device, dtype=torch.float32)
        n = x.shape[0]
        if self.path.jit:
            padded = _next_power_of_two(n)
            if padded != n:  # fewer distinct shapes to compile
                x = torch.cat([x, x[:1].expand(padded - n, *x.shape[1:])])
            with torch.no_grad():  # TorchScript modules do not run under inference_mode
                logits, features = self.module(x)
        else:
            with torch.inference_mode():
                logits, features = self.module(x)
        return logits[:n].float().cpu(), features[:n].float().cpu()


class OnnxRunner:
    """ONNX Runtime session over an exported graph with inputs ``images`` and outputs
    ``logits`` (+ ``features`` when exported with them). ``precision`` (for reporting) is read
    from the graph's ``int8`` metadata when not given."""

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None,
                 precision: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - optional dependency
            raise RuntimeError(
                "the ONNX backend needs onnxruntime: pip install 'celluscan[onnx]'"
            ) from e
        self.onnx_path = Path(onnx_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_count()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(self.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.onnx_path}: cannot load ONNX model: {e}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "logits" not in self.output_names:
            raise ValueError(f"{self.onnx_path}: ONNX graph has no 'logits' output "
                             f"(outputs: {self.output_names})")
        if precision is None:  # export.py marks quantised graphs in the metadata
            meta = self.session.get_modelmeta().custom_metadata_map
            precision = "int8" if meta.get("int8") == "1" else "fp32"
        self.path = ExecutionPath("onnx", precision)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})
        named = dict(zip(self.output_names, outputs))
        features = named.get("features")
        return (torch.from_numpy(named["logits"]).float(),
                None if features is None else torch.from_numpy(features).float())
