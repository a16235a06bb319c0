"""What the keeper does with stored global models: list them with their
trail and validations, export one to a file, and have one validated by the
fl_model_validate function (`fedkeeper model`; docs/models.md)."""
from __future__ import annotations

from .catalog import ModelTrailError, model_doc, model_rows, pick_model, session_doc
from .code import session_code, session_spec
from .export import SUFFIXES, export_model

__all__ = ["SUFFIXES", "ModelTrailError", "export_model", "model_doc", "model_rows", "pick_model",
           "session_code", "session_doc", "session_spec"]
