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
