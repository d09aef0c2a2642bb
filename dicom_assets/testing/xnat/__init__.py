"""An XNAT-compatible HTTP server for tests and demos (no real XNAT can be installed here).

It implements the REST calls the real ``xnat`` (xnatpy) client makes, following XNAT 1.8/1.9
(it reports version 1.8.10), and it **really unzips and parses** uploaded DICOMs with pydicom.
It is strict on purpose: where XNAT refuses a request, so does this server. Each behaviour
below names the XNAT class (``NrgXnat/xnat-web``) it was read from; no XNAT code is copied.

* ``POST /data/services/import`` (``DICOM-zip``): the body must be ``application/zip``
  (``RequestUtil.deriveFileName`` + ``DicomZipImporter.importCompressedFile``); files are
  staged in the prearchive (``GradualDicomImporter``: a RECEIVING row per project +
  StudyInstanceUID + session label, joined when such a row is RECEIVING/READY/ERROR/CONFLICT),
  filtered by the site-wide and the project's series import filters (``set_series_import_filter``;
  ``series_import_filter`` is a shortcut for a site-wide blacklist) and run through the site-wide
  anonymization script when one is enabled (``set_anon_script``; ``site_anonymization`` is XNAT's
  default script; a ``reject`` drops the file silently); a project's script runs when the session
  is archived (its rejected files are deleted from the session, an error fails the archive; the
  scripts are DicomEdit 6, the subset in ``dicomedit.py``, served at ``/data/config/anon/script``
  and ``/data/projects/<id>/config/anon/projects/<id>``); with
  ``dest=/archive`` the row goes ARCHIVING and is archived within the request, whatever the
  project's prearchive code (``DicomZipImporter.determiningDestination``; ``PrearcSessionArchiver``,
  ``MergePrearcToArchiveSession``, ``MergeSessionsA``): labels cleaned, subject matched
  case-insensitively, experiment labels unique per project. An existing session is merged into
  when the import sends ``overwrite`` (any value; ``Importer.parseOverrideValue``, which also
  overwrites any ``allowSessionMerge`` of the query) or the row's prearchive code is 4/5
  (``DicomZipImporter.archiveSession``); otherwise, or for files the session already holds
  (unless ``overwrite_files=true``, ``overwrite=delete`` or code 5), the row goes CONFLICT and
  the import answers 400 "Failed to archive 1 of 1 session(s)" (``xmlBuild``).
  ``Direct-Archive=true`` with ``dest`` fails as XNAT fails.
* Projects carry XNAT's prearchive code (``PrearchiveCode``: 0 Manual, 4 AutoArchive, 5
  AutoArchiveOverwrite; 4 for a new project, ``BaseXnatProjectdata.initArcProjectImpl``), read and
  set at ``/data/projects/<id>/prearchive_code[/<code>]`` (``ProjectResource``); each prearchive row
  keeps the code of its creation (``autoarchive``). The session rebuilder
  (``rebuild_idle_sessions``, ``start_session_rebuilder``: ``SessionXMLRebuilder``) builds idle
  RECEIVING rows and archives them only when their code is 4/5; a Manual row stays READY.
* Series import filters (``SeriesImportFilter``: ``DicomFilterService``,
  ``RegExBasedSeriesImportFilter``; blacklist and whitelist modes, ``[tag]`` sections, EXISTS)
  applied on receipt (``GradualDicomImporter``: an object must pass the site-wide and the
  project's filter) and read as XNAT's configuration service gives them:
  ``GET /data[/projects/<id>]/config/seriesImportFilter/config`` (``ConfigResource``).
* Prearchive: ``/data/prearchive/projects[/<p>[/<ts>/<name>]]``, ``POST /data/services/archive``
  (``Archiver``: always merges; ``overwrite=append|delete`` replaces files the session holds),
  ``POST /data/services/prearchive/delete`` (``PrearchiveBatchDelete``: locked rows stay) and
  ``DELETE`` of a row (refused with 409 while ARCHIVING).
* Projects with XNAT's accessibility (``private``/``protected``/``public``, ``protected`` by
  default as ``BaseXnatProjectdata.createProject`` sets it) and owner / member roles: who sees a
  project, its data, and what a GET, PUT or DELETE of it answers follow ``ProjectResource``,
  ``DefaultUserProjectCache.get`` and ``Permissions.canReadProject`` (see ``_project``).
* Uploaded files: a file without SOPClassUID or SOPInstanceUID is refused as
  ``GradualDicomImporter.call`` refuses it; StudyInstanceUID is not required (see
  ``parse_upload_zip``).
* Subject PUT as ``SubjectResource.handlePut`` does it: the label is kept as the URI gives it
  (not cleaned, not refused for its characters), only XFT's 255-character limit applies.
* Subjects, experiments (also at project level), scans with
  several resources (``DICOM`` plus e.g. ``SNAPSHOTS``), experiment and project resources
  (project resources need the owner role), ``/data/services/auth``, ``/data/JSESSION``,
  ``/xapi/siteConfig/buildInfo``, ``/xapi/schemas`` (XNAT's real ``xnat.xml``/``xdat.xml`` from
  the xnat 0.8.1 sdist), ``/data/search/elements``. Authentication is enforced (JSESSION
  cookie or basic auth).

Fault injection: ``server.inject(path_prefix, kind, times=1)`` with kind ``500``, ``503``,
``drop`` (close the connection without an answer, after reading the request body), ``slow``
(answer after ``slow_seconds``) or ``archive_error`` (the import is received, then archiving
fails: the prearchive row is left in ERROR, as XNAT leaves it; answered 500, whereas XNAT's
DICOM-zip importer would answer 400) or ``receiving_interrupt`` (more data for the row arrived
while XNAT built it: ``PrearchiveRebuildHandler.rebuild`` gives way, the row stays RECEIVING, the
import answers 200 with an empty body) or ``drop_mid_stream`` (the connection breaks after
``drop_fraction`` of the body arrived: the entries read so far stay in a RECEIVING row, which the
session rebuilder later archives as a partial session in a project set to auto-archive; no
answer) or ``storage_error`` (``GradualDicomImporter`` cannot write the files after
``storage_error_after`` of them: under Ignore-Unparsable they are dropped and the import answers
200, the session archived without them; without it the import stops mid-zip, 400).
``server.on_archive(row)`` runs just before an import
archives its row (a concurrent sender archiving the same label). ``server.proxy_timeout``
puts a reverse proxy in front: a request still running after that many seconds gets a 504
while the server carries on (``import_seconds`` makes archiving take that long).
``server.max_concurrent_imports`` records the peak number of simultaneous uploads.

The package: ``state`` (the data model and the test-only switches), ``importer``
(receiving, session building, anonymization, archiving), ``routes`` (the routing table and its
handlers), ``server`` (``XnatTestServer``: start, stop, the HTTP glue). It never imports the
client (``dicom_assets.core.xnat``): it follows XNAT's code, not ours.

Start by hand: ``dicom-assets-testing xnat-server --port 8080 --user admin`` (password from
``$XNAT_PASSWORD``).
"""


from .dicomedit import hash_uid, run_script
from .importer import SeriesSeen, parse_upload_zip, zip_stream_entries
from .server import XnatTestServer, serve_forever
from .state import SeriesImportFilter

__all__ = ["SeriesImportFilter", "SeriesSeen", "XnatTestServer", "hash_uid", "parse_upload_zip", "run_script", "serve_forever",
           "zip_stream_entries"]
