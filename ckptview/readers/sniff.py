"""A name for content no reader recognises, from its first bytes, for the "not a checkpoint" message."""

from __future__ import annotations

from ckptview.readers.registry import EMPTY_ZIP_MAGIC, ZIP_MAGIC, supported

# content that is plainly something else: (magic, what it is, what to do instead)
_NOT_CHECKPOINTS: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image", ""),
    (b"\xff\xd8\xff", "a JPEG image", ""),
    (b"GIF8", "a GIF image", ""),
    (b"%PDF", "a PDF document", ""),
    (b"\x1f\x8b", "a gzip-compressed file", "decompress it (gunzip) and open the result"),
    (b"BZh", "a bzip2-compressed file", "decompress it (bunzip2) and open the result"),
    (b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it (unxz) and open the result"),
    (b"(\xb5/\xfd", "a zstd-compressed file", "decompress it (unzstd) and open the result"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it and open the checkpoint inside"),
    (b"Rar!", "a RAR archive", "extract it and open the checkpoint inside"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself",
     "run `git lfs pull` in its repository (or download the real file) and open that"),
)


def not_a_checkpoint(head: bytes) -> str:
    """
    The "not a checkpoint" message for content no reader recognises: what it is and what to do,
    where its first bytes say (a compressed file, an HTML page a download saved); the formats
    ckptview opens where they do not.
    """
    what, todo = describe(head)
    return f"this is {what}, not a checkpoint: {todo}." if todo else f"this is {what}, not a checkpoint; {supported()}."


def describe(head: bytes) -> tuple[str, str]:
    """What the content is, and what to do instead ("" where the formats ckptview opens are the answer)."""
    for magic, what, todo in _NOT_CHECKPOINTS:
        if head.startswith(magic):
            return what, todo
    if not head.strip(b"\x00"):
        return (f"zero bytes throughout its first {len(head):,} (space a download or copy reserved but never wrote)",
                "download or copy it again")
    if len(head) > 262 and head[257:262] == b"ustar":
        return ("a tar archive (the pre-1.0 torch.save tar format, or a packed directory)",
                "extract it, or load it once with torch.load in a trusted environment and re-save it with torch.save")
    if head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP_MAGIC):
        return "a zip archive", ""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    lowered = text[:64].lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in lowered:
        return ("an HTML page (a download that saved an error or sign-in page instead of the file?)",
                "download the file again")
    if text.startswith((b"{", b"[")):
        return "a JSON document", ""
    try:
        sample = head[:2048].decode("utf-8")
    except UnicodeDecodeError:
        sample = None
    if sample is not None and sample.strip() and all(ch.isprintable() or ch in "\r\n\t" for ch in sample[:200]):
        first_line = sample.strip().splitlines()[0][:60]
        return f"a text file (it starts with {first_line!r})", ""
    return f"unknown binary data (it starts with bytes {head[:8].hex(' ')})", ""
