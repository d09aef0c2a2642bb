"""What an NBIA server (or whoever answers in its name) may send that must not get through
(issue 27, point 9): a redirect to another host, a zip bomb in md5hashes.csv, a file riding
unverified under the name LICENSE, and a first image too large to read whole."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import tracemalloc
import zipfile

import pydicom
import pytest

from dicom_assets.core.tcia import NbiaClient, TciaDownloadError, verify_zip


def _zip(path, members: dict[str, bytes], md5: dict[str, str] | None = None, md5_text: str | None = None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if md5_text is None:
            rows = ["Filename,MD5Hash"] + [f"{n},{h}" for n, h in (md5 or {}).items()]
            md5_text = "\n".join(rows) + "\n"
        zf.writestr("md5hashes.csv", md5_text)
    return path


def _image(samples) -> bytes:
    return (samples.pydicom_files / "MR_small.dcm").read_bytes()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_a_zip_bomb_in_the_md5_list_is_refused_unread(samples, tmp_path):
    img = _image(samples)
    bomb = "Filename,MD5Hash\n" + "\n" * (256 * 1024 * 1024) + f"00000001.dcm,{_md5(img)}\n"
    path = _zip(tmp_path / "bomb.zip", {"00000001.dcm": img}, md5_text=bomb)
    assert path.stat().st_size < 2 * 1024 * 1024  # a small zip that inflates to 256 MiB
    tracemalloc.start()
    try:
        with pytest.raises(TciaDownloadError, match="refused unread"):
            verify_zip(path, {"ImageCount": 1})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024


def test_a_binary_under_the_license_name_is_refused(samples, tmp_path):
    img = _image(samples)
    smuggled = _zip(tmp_path / "s.zip", {"LICENSE": img, "00000001.dcm": img}, {"00000001.dcm": _md5(img)})
    with pytest.raises(TciaDownloadError, match="LICENSE is not a text"):
        verify_zip(smuggled, {"ImageCount": 1})
    # NBIA's own: a text, unlisted; or listed, and then verified like an image
    text = b"Creative Commons Attribution 4.0 International License\n"
    ok = _zip(tmp_path / "ok.zip", {"LICENSE": text, "00000001.dcm": img}, {"00000001.dcm": _md5(img)})
    assert verify_zip(ok, {"ImageCount": 1})[0] == 1
    listed = _zip(tmp_path / "l.zip", {"LICENSE": text, "00000001.dcm": img},
                  {"LICENSE": _md5(text), "00000001.dcm": _md5(img)})
    assert verify_zip(listed, {"ImageCount": 1})[0] == 1
    wrong = _zip(tmp_path / "w.zip", {"LICENSE": text, "00000001.dcm": img},
                 {"LICENSE": "0" * 32, "00000001.dcm": _md5(img)})
    with pytest.raises(TciaDownloadError, match="LICENSE: md5"):
        verify_zip(wrong, {"ImageCount": 1})


def test_the_first_image_is_read_by_its_header_only(samples, tmp_path):
    ds = pydicom.dcmread(samples.pydicom_files / "MR_small.dcm")
    ds.PatientID = "BIG-001"
    buf = io.BytesIO()
    ds.save_as(buf)
    big = buf.getvalue() + b"\x00" * (96 * 1024 * 1024)  # a multi-frame DBT image's size, past the pixel data
    path = _zip(tmp_path / "big.zip", {"00000001.dcm": big}, {"00000001.dcm": _md5(big)})
    tracemalloc.start()
    try:
        n, header, _ = verify_zip(path, {"ImageCount": 1})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 1 and header["PatientID"] == "BIG-001"
    assert peak < 16 * 1024 * 1024


class _Redirecting(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(302)
        self.send_header("Location", self.target + self.path)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_redirect_to_another_host_is_not_followed(tmp_path):
    hits = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Elsewhere)
    handler = type("H", (_Redirecting,), {"target": f"http://127.0.0.2:{other.server_port}"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for s in (other, server):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        client = NbiaClient(f"http://127.0.0.1:{server.server_port}", retries=0, backoff=0)
        with pytest.raises(TciaDownloadError, match="outside the allowed server") as err:
            client.series_info("1.2.3")
        assert not err.value.transient and hits == []  # never asked, never retried
    finally:
        for s in (server, other):
            s.shutdown()
            s.server_close()


def _result(uid, patient, study="1.2.9"):
    from dicom_assets.core.tcia import SeriesResult

    return SeriesResult(uid, "downloaded", 1, "", patient, study, "20200101", "1000")


def test_patient_ids_that_normalize_alike_are_refused_naming_both():
    from dicom_assets.core.tcia import TciaManifestError, group_visits

    with pytest.raises(TciaManifestError, match="'TCGA-02-0001' and 'TCGA-020-001' both normalize") as err:
        group_visits([_result("1.1", "TCGA-02-0001", "1.2.1"), _result("1.2", "TCGA-020-001", "1.2.2")])
    assert "merged" in str(err.value)
    with pytest.raises(TciaManifestError, match="series 1.3: PatientID '---' has no letter or digit"):
        group_visits([_result("1.3", "---")])
    ok = group_visits([_result("1.1", "TCGA-02-0001", "1.2.1"), _result("1.2", "TCGA-02-0002", "1.2.2")])
    assert sorted(v.visit for v in ok) == ["TCGA020001_ses-01", "TCGA020002_ses-01"]
