"""Errors of the domain core. Every message names the file and the field at fault."""


class DicomAssetsError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(DicomAssetsError):
    """The global config file is missing, malformed or inconsistent."""


class ManifestError(DicomAssetsError):
    """The participant manifest is missing, malformed or inconsistent."""


class VisitKeyError(DicomAssetsError, ValueError):
    """A visit (partition) key is malformed or could escape a folder."""


class UnsafeArchiveError(DicomAssetsError):
    """A download cannot be extracted safely and completely: a member would land outside its
    target, a bomb, or the archive or folder is damaged, incomplete, unreadable or vanished."""


class DownloadError(DicomAssetsError):
    """A download cannot be resolved to one visit or is not usable."""


class SampleFetchError(DicomAssetsError):
    """The real scanner DICOM samples could not be fetched from PyPI."""


class OrganizedFolderError(DicomAssetsError):
    """A visit's organized DICOM folder (or its organize report) is missing a file, holds a
    broken link or something else than files, or disagrees with the report."""


class TarballError(DicomAssetsError, RuntimeError):
    """A member of the visit tarball could not be archived as it was listed (vanished,
    unreadable, changed size while being read)."""


def parse_json_text(raw: bytes, path, error: type[DicomAssetsError], what: str):
    """JSON from a file's bytes, every way it can fail named with ``error`` (the file and the
    reason): not UTF-8/16/32 text, not valid JSON (line and column), nested too deep, a number
    too long to convert. json detects UTF-16/32 and a UTF-8 BOM, as RFC 8259 readers may."""
    import json

    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 (or UTF-16/32) text: byte {exc.start} cannot be read ({exc.reason}); "
                    f"save the {what} as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise error(f"{path}: the {what} is nested too deep to be read") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise error(f"{path}: the {what} holds a value that cannot be read ({exc})"[:400]) from None
