"""Reading the JSON files lftk writes (lftk_model.json, pairs.json, manifests, reports): a damaged
one is a one-line error naming the file, never a traceback or a silently wrong value."""

from __future__ import annotations

import json
from pathlib import Path

from lftk.errors import LftkError


def read_object(path: Path | str, missing: dict | None = None) -> dict:
    """The JSON object in `path`; `missing` (when given) if the file does not exist; LftkError when it is
    unreadable, not UTF-8, not JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        if missing is not None:
            return missing
        raise LftkError(f"{path}: missing")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LftkError(f"{path}: damaged (byte {exc.start} is not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise LftkError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise LftkError(f"{path}: unreadable ({exc.strerror})") from None
    if not isinstance(value, dict):
        raise LftkError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
