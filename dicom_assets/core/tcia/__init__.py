"""TCIA manifests as a source of visits: parse, download through the NBIA REST API, group.

What is modelled here was read from NBIA's own source (``CBIIT/NBIA-TCIA``) and the official
client (``tcia_utils``); docs/decisions.md names the classes.

A ``.tcia`` manifest is read as the NBIA Data Retriever reads it (``StandaloneDMDispatcher``):
the header is a Java properties block (``key=value``, ``key: value`` or ``key value``; ``#`` and
``!`` comments; keys case-sensitive), the series list starts at the line that is exactly
``ListOfSeriesToDownload=`` in any case, and each later line gives one SeriesInstanceUID (a
line without any digit, such as a ``Series ID`` heading, is skipped; a UID listed twice is
downloaded once). The header must name ``downloadServerUrl`` (an NBIA download servlet URL: the
NBIA server the series live on, e.g. ``nbia`` or ``nlst.cancerimagingarchive.net``) and a 3.x
``manifestVersion``. The CSV form is TCIA's cart export (``SeriesInstanceUID``,
``StudyInstanceUID``, ... as the portal's "Download CSV" writes them; the older ``Series ID``,
``Study UID`` headings and ``series_instance_uid``/``study_instance_uid`` too); it names no
server, so its series are asked at the first configured server. Either becomes a
:class:`TciaManifest`.

The API is the manifest's server at ``/nbia-api/services/v4`` (``v1`` as an option, the
Retriever's API, and the fallback where v4 is not deployed; see :mod:`.nbia`). A manifest naming
one of TCIA's retired hosts is asked at today's public servers, a CSV export at every configured
server in turn. Each series: ``getSeries`` for its metadata (an empty answer: unknown to that
server or not public), then the zip with NBIA's MD5 list (``getImageWithMD5Hash``; with
``includeAnnotation=true`` the Retriever's ``getDCMImage``, which adds the annotation files),
streamed to a hidden temporary file, verified (every image's md5 against ``md5hashes.csv``, the
image count against ``ImageCount``) and only then renamed to
``<work>/series/<SeriesInstanceUID>.zip`` and recorded in ``<uid>.json``: a verified series is
never downloaded again (resume). Any failure of one series is retried (an outage for minutes,
honouring ``Retry-After``) and, in the end, reported for that series only: its visit waits,
the others go on.

Visits are one per (PatientID, StudyInstanceUID), read from the downloaded DICOM headers,
labelled once across every manifest by the dataset's study register (:mod:`.visits`).

The package: :mod:`.manifest` (manifest files, names, the servers a manifest may be sent to),
:mod:`.nbia` (the REST client: versions, retries, outages), :mod:`.download` (series zips,
verified), :mod:`.visits` (grouping, the study register, the resolved CSV).
"""

from .download import (
    LICENSE_ENTRY,
    MD5_HEADER,
    MD5_LIST,
    SeriesResult,
    annotation_files,
    download_series,
    verify_zip,
)
from .manifest import (
    MANIFEST_SUFFIXES,
    PUBLIC_SERVERS,
    RETIRED_HOSTS,
    SERVLET_PATH,
    TciaManifest,
    TciaManifestError,
    manifest_files,
    manifest_name,
    manifest_servers,
    manifests,
    normalize_server,
    parse_manifest,
    server_of,
)
from .nbia import API_PATH, API_VERSIONS, DEFAULT_API_VERSION, NbiaClient, TciaDownloadError, retry_after_seconds
from .visits import (
    RESOLVED_COLUMNS,
    Assignment,
    TciaVisit,
    TciaVisitSource,
    assign_visits,
    group_visits,
    read_resolved,
    read_studies,
    register_visits,
    write_resolved,
    write_series_table,
)

__all__ = [
    "API_PATH", "API_VERSIONS", "DEFAULT_API_VERSION", "LICENSE_ENTRY", "MANIFEST_SUFFIXES", "MD5_HEADER", "MD5_LIST",
    "PUBLIC_SERVERS", "RESOLVED_COLUMNS", "RETIRED_HOSTS", "SERVLET_PATH", "Assignment", "NbiaClient", "SeriesResult",
    "TciaDownloadError", "TciaManifest", "TciaManifestError", "TciaVisit", "TciaVisitSource", "annotation_files",
    "assign_visits",
    "download_series", "group_visits", "manifest_files", "manifest_name", "manifest_servers", "manifests",
    "normalize_server", "parse_manifest", "read_resolved", "read_studies", "register_visits", "retry_after_seconds",
    "server_of", "verify_zip", "write_resolved", "write_series_table",
]
