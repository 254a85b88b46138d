"""The one text decoder: captions in shards, caption sidecars and listings, prompt files.

Text is read as UTF-8 (a UTF-8 BOM is dropped; a UTF-16 BOM switches to UTF-16). Bytes that are not
UTF-8 are read as cp1252 (Windows Latin-1: every Latin-1 letter, plus curly quotes and the euro sign)
with a warning naming the file or sample, logged once per `warn_once` key (a shard, a file), so a
Latin-1 caption set neither crashes training nor floods the log. Re-saving the text as UTF-8 silences it.
"""

from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FALLBACK_ENCODING = "cp1252"
_warned: set[str] = set()


def decode_text(data: bytes, name: str, warn_once: str | None = None) -> str:
    """UTF-8 bytes (BOM dropped) -> str; other bytes as cp1252 (Latin-1 for its 5 unused bytes), warned."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        try:
            text = data.decode(FALLBACK_ENCODING)
        except UnicodeDecodeError:  # 0x81 0x8d 0x8f 0x90 0x9d: undefined in cp1252, defined in Latin-1
            text = data.decode("latin-1")
        key = warn_once or name
        if key not in _warned:
            _warned.add(key)
            log.warning(
                "%s is not UTF-8 (byte 0x%02x at position %d): read as %s (Windows Latin-1); "
                "re-save it as UTF-8 if that is wrong%s",
                name,
                data[e.start],
                e.start,
                FALLBACK_ENCODING,
                "" if key == name else f" (warned once for {key})",
            )
        return text


def read_text_file(path: str | os.PathLike) -> str:
    """A text file's contents through `decode_text` (the warning names the file)."""
    return decode_text(Path(path).read_bytes(), str(path))
