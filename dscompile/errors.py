"""The errors dscompile raises; each message names the problem and what to do about it."""


class DscompileError(Exception):
    """Base class of every error dscompile raises on purpose."""


class ConfigError(DscompileError, ValueError):
    """An option, profile or argument is invalid."""


class CacheError(DscompileError):
    """A cached artefact on disk is missing pieces or corrupt."""


class CaptureError(DscompileError):
    """The model could not be captured as a graph."""


class MatchError(DscompileError):
    """The model has no subgraph that the requested rewrite needs."""


class LoweringError(DscompileError):
    """Lowering or export failed."""


class ModelNotFoundError(DscompileError):
    """A named model or checkpoint could not be found."""


class UnsupportedError(DscompileError, NotImplementedError):
    """The request is valid but this version cannot carry it out yet."""
