"""The one error type the model layer raises for bad names, files and configs."""
from __future__ import annotations


class ModelError(ValueError):
    """A model that cannot be loaded as asked: unknown name, missing or corrupt
    file, unsupported architecture or config.  The message is one line that
    names the problem."""
