"""Upload a visit to XNAT through xnatpy. No Dagster here. The package is a plan and an executor:

* ``plan.py``: what to do with the visit's session, a pure function of what XNAT holds;
* ``upload.py``: the executor (send, verify, send again what did not arrive, report);
* ``files.py`` (what is sent, the pending record), ``labels.py`` (XNAT's labels and IDs),
  ``filters.py`` (its series import filters), ``prearchive.py`` (its prearchive and the import
  request), ``remote.py`` (projects, sessions, scans, resources), ``errors.py`` (what fails).

What a real XNAT (1.8/1.9, ``NrgXnat/xnat-web``) does with an upload, and how this client
copes (docs/decisions.md, "Uploads to a real XNAT"):

* the zip goes to the import service (``DICOM-zip``) with ``dest=/archive`` (no
  ``Direct-Archive``: with a ``dest`` XNAT cannot archive a direct-archive session); XNAT stages
  it in the prearchive and archives it within the request, whatever the project's prearchive
  setting (``DicomZipImporter.determiningDestination``: the dest overrides "all to prearchive");
  the request is xnatpy's (``upload_file``) but the answer is read here (``post_import``);
* merging into an existing session: XNAT's import service merges when asked with ``overwrite``
  (``Importer.parseOverrideValue``; ``allowSessionMerge`` cannot be sent, it is overwritten),
  and unasked only in projects set to auto-archive (``DicomZipImporter.archiveSession``); so
  ``append`` sends ``overwrite=append``. A refused merge leaves the prearchive row in CONFLICT
  and answers 400: the client says so (``refused_import``) and removes its row;
* an answer without an archive URI (XNAT kept the upload in its prearchive: its build gave way
  to more data for the row) is waited for while XNAT works on the row; a row left READY (a
  project set to "all to prearchive" is not archived by XNAT's rebuilder) fails the step,
  naming the row and what the site admin can do (``unarchived_answer``);
* subject and session labels are cleaned the way XNAT cleans them (``cleanValue``) before
  they are sent, so the session is found where XNAT files it; the mapping is reported; a label
  longer than XFT's 255 characters fails before anything is sent;
* a project the user cannot see is created (a new project ID must match
  ``XftStringUtils.isValidId``); XNAT answers 403 when it exists as a private project of others
  or the user may not create projects; a project the user sees but may not add data to (a
  protected or public one of others) fails before anything is sent;
* every file must carry SOPClassUID and SOPInstanceUID (``GradualDicomImporter`` refuses a
  file without, and drops it silently under ``Ignore-Unparsable``): checked before sending;
* a session is looked up at project level (labels are unique per project) and compared by the
  ``<SOPInstanceUID>.dcm`` names of its scans' ``DICOM`` resource only (XNAT keeps the uploaded
  names; pipelines add other resources); ``append`` sends only the instances it lacks (XNAT
  refuses a file the session already holds);
* a file the session lacks is "filtered by XNAT" only when XNAT's series import filter drops
  it: the client reads the site-wide and the project's filter from XNAT's configuration
  (``DicomFilterService``, ``ConfigResource``) and applies them to the file's header as
  ``RegExBasedSeriesImportFilter`` does (``series_import_filters``). Such files are reported and
  are no reason to call the session different; a name an earlier upload recorded as filtered is
  checked again, never trusted;
* XNAT does not archive an upload whole or not at all: what it read before a connection broke,
  or before it stopped an import mid-zip, stays in a RECEIVING row that its session rebuilder
  archives as a partial session in a project set to auto-archive (``SessionXMLRebuilder``,
  ``PrearchiveRebuildHandler``). Every missing file the filter does not explain is sent again
  (only those, ``overwrite=append``) and the session checked again; if they still do not
  arrive the step fails, naming how many files of which series are missing;
* before sending, the client records the visit's files (``write_pending``; no secrets) and
  removes the record once the session is verified complete: a retry that finds a session
  holding only recorded files completes its own unfinished upload whatever the duplicate
  policy; a session holding any other file follows the policy;
* after a timeout, a dropped connection or a 5xx (a proxy's 504 while XNAT carries on
  archiving), the client polls the prearchive and the session before anything is sent again;
  only prearchive rows of this upload are cleaned up (same StudyInstanceUID and label, appeared
  or changed during the upload, in ERROR/READY/CONFLICT, and RECEIVING after XNAT refused the
  import);
* project resources (e.g. the TCIA manifests) are attached after the session; a refusal
  there (they need the project owner role) is a warning, not a failed upload;
* credentials come from the caller (environment variables); they never enter a message.
"""

from .errors import XnatAuthError, XnatBusyError, XnatError, XnatTransientError, classify_error, http_status
from .files import (
    UploadFile,
    classic_tree_sessions,
    compare_series,
    expected_names,
    files_from_records,
    importer_refusals,
    load_dicoms_json,
    read_exclusions,
    read_pending,
    select_files,
    series_summary,
    write_pending,
    write_zip,
)
from .filters import SeriesFilter, SeriesFilters, parse_series_filter, series_import_filters
from .labels import MAX_LABEL, PROJECT_ID, XNAT_CLEANED_CHARS, clean_label
from .plan import POLICIES, Action, Existing, Visit, plan
from .remote import dicom_names, ensure_project, find_session, foreign_names, scan_counts
from .upload import UploadResult, upload_visit

__all__ = [
    "Action", "Existing", "MAX_LABEL", "POLICIES", "PROJECT_ID", "SeriesFilter", "SeriesFilters", "UploadFile",
    "UploadResult", "Visit", "XNAT_CLEANED_CHARS", "XnatAuthError", "XnatBusyError", "XnatError", "XnatTransientError",
    "classic_tree_sessions", "classify_error", "clean_label", "dicom_names", "ensure_project", "expected_names",
    "compare_series", "files_from_records", "find_session", "foreign_names", "http_status", "importer_refusals", "load_dicoms_json",
    "parse_series_filter", "plan", "read_exclusions", "read_pending", "scan_counts", "select_files",
    "series_import_filters", "series_summary", "upload_visit", "write_pending", "write_zip",
]
