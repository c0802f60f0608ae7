"""dscompile: give an existing PyTorch language model DeepSeek's efficiency designs (MLA, MoE, MTP) by compiling it.

Entry points: ``torch.compile(model, backend="deepseek_opt")`` (no import needed), :func:`optimize`,
:func:`inspect`, :func:`diff`, :func:`export_onnx` and the ``dscompile`` command line.
"""

import importlib
from typing import Any

from .api import OptimizedModel, inspect, optimize
from .backend import deepseek_opt
from .diff import GraphDiff, diff
from .errors import (
    CacheError,
    CaptureError,
    ConfigError,
    DscompileError,
    LoweringError,
    MatchError,
    ModelNotFoundError,
    UnsupportedError,
)
from .heal import HealReport, heal
from .live import LiveMonitor
from .log import configure as configure_logging
from .lower.onnx import export_onnx
from .lower.onnx_runtime import export_onnx_runtime, onnx_generate
from .patterns import MatchSet
from .profile import PRESETS, MLAConfig, MoEConfig, MTPConfig, Profile, load_profile_file
from .report import Report
from .report_html import save_plots, write_html_report
from .saved import load_optimized
from .train_mtp import MTPTrainReport, measure_mtp, train_mtp

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "CacheError", "CaptureError", "ConfigError", "DscompileError", "GraphDiff", "HealReport",
    "LoweringError", "MLAConfig", "MTPConfig", "MTPTrainReport", "MatchError", "MatchSet", "MoEConfig",
    "ModelNotFoundError", "OptimizedModel", "Profile", "Report", "UnsupportedError", "configure_logging",
    "deepseek_opt", "diff", "export_onnx", "heal", "inspect", "load_optimized", "load_profile_file", "models",
    "measure_mtp", "optimize", "train_mtp",
    "LiveMonitor", "save_plots", "write_html_report",
    "export_onnx_runtime", "onnx_generate",
]

configure_logging()


def __getattr__(name: str) -> Any:
    """``dscompile.models`` is imported on first use: it pulls in transformers, which plain compiles do not need."""
    if name == "models":
        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module 'dscompile' has no attribute {name!r}")
