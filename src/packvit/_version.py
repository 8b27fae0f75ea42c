"""The one version of packvit: ``packvit.__version__``, pip's metadata (pyproject reads it) and every manifest."""

__version__ = "0.3.0"
