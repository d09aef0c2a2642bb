"""core.fsutil.printable: the one function that makes a name printable, for the organize report
(control characters escaped too) and the messages of the downloads, extraction and tarball steps
(only bytes that are no UTF-8). Compared with the functions it replaced, output for output."""

import os
import random
import re
import time
from pathlib import Path

from dicom_assets.core import downloads, organize, tarball
from dicom_assets.core.fsutil import printable

# the replaced functions, as they were (organize.printable, tarball._shown, downloads.shown)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def old_printable(text: str) -> str:
    if not _UNPRINTABLE.search(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


def old_tarball_shown(path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def old_downloads_shown(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def names():
    fixed = ["IM0001.dcm", "", "tab\there", "cr\rlf\n", "nul\x00", "del\x7f", "c1\x85\x9f", "ls\u2028ps\u2029",
             "é.dcm", "日本.dcm", "emoji🙂", "a\\xff", os.fsdecode(b"latin1-\xe9.dcm"), os.fsdecode(b"\xff\xfe"),
             os.fsdecode(b"mixed\xc3(\t\n.dcm"), "\x80\xa0\xff"]
    rng = random.Random(7)
    alphabet = [chr(c) for c in (*range(0, 0x30), *range(0x7b, 0x100), 0x2028, 0x2029, 0x3042, 0x1F600)]
    alphabet += [chr(c) for c in range(0xDC80, 0xDD00)]  # the bytes that are no UTF-8, as the OS gives them
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12))) for _ in range(3000)]
    return fixed + randoms


def test_printable_is_organize_printable_output_for_output():
    for n in names():
        assert printable(n) == old_printable(n) == organize.printable(n), repr(n)
    odd = "\ud800lone"  # a surrogate that is no escaped byte: both fall back to surrogatepass
    assert printable(odd) == old_printable(odd)


def test_printable_without_controls_is_the_old_message_form_of_names():
    for n in names():
        want = old_tarball_shown(n)
        assert want == old_downloads_shown(n)
        assert printable(n, controls=False) == want == downloads.shown(n), repr(n)
        assert printable(Path("/d") / n if n else Path("/d"), controls=False) == \
            old_tarball_shown(Path("/d") / n if n else Path("/d"))
        raw = os.fsencode(n)
        assert printable(raw, controls=False) == old_tarball_shown(raw)
        # the tarball's check "a name that is not UTF-8": the same names as before
        assert (printable(n, controls=False) != n) == (old_tarball_shown(n) != n)
    assert not hasattr(tarball, "_shown")


def test_background_digests_are_hashlib_digests_of_the_stream():
    """The one background hashing design of the tarball writer (buffers handed over with a
    release) and the metadata reader (batches of about 1 MiB)."""
    import hashlib

    from dicom_assets.core.fsutil import BackgroundDigests

    rng = random.Random(3)
    parts = [rng.randbytes(rng.choice((0, 1, 512, 4096, 300_000, 1 << 20))) for _ in range(60)]
    whole = b"".join(parts)
    by_size = BackgroundDigests("md5", "sha256", batch=1 << 20, depth=2)
    for p in parts:
        by_size.add(memoryview(p))
    assert by_size.close() == [hashlib.md5(whole).hexdigest(), hashlib.sha256(whole).hexdigest()]
    assert by_size.size == len(whole)
    assert by_size.close() == [hashlib.md5(whole).hexdigest(), hashlib.sha256(whole).hexdigest()]  # again: same

    buf = bytearray(1 << 16)  # one reused buffer: each batch hashed before the buffer is written again
    released = []
    by_buffer = BackgroundDigests("sha256")
    for i, p in enumerate(parts):
        n = min(len(p), len(buf))
        buf[:n] = p[:n]
        by_buffer.extend((b"header", memoryview(buf)[:n], b""))
        done = []
        by_buffer.hand_over(release=lambda i=i: done.append(i) or released.append(i))
        while not done:  # the caller waits for the buffer to come back, as the writer's pool makes it
            time.sleep(0.0005)
    want = hashlib.sha256(b"".join(b"header" + p[:len(buf)] for p in parts)).hexdigest()
    assert by_buffer.close() == [want] and released == list(range(len(parts)))
