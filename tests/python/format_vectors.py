#!/usr/bin/env python3
"""Check docs/FORMAT.md §9 (known-answer test vectors) from the document alone.

A second reader of the formats, written from FORMAT.md with nothing of
bitsync's code: Python's hashlib for SHA-256 and scrypt, and the
`cryptography` package for AES-256-GCM and RSA. The hashing checks run
without `cryptography`; the rest are skipped (and say so) when it is missing.

    python3 tests/python/format_vectors.py [docs/FORMAT.md]

Exit status 0 when every check passes, 1 otherwise. tests/format_vectors.rs
runs it when python3 has `cryptography`.
"""

import hashlib
import pathlib
import struct
import sys

SECTION = "## 9. Known-answer test vectors"


def vectors(text):
    """The `name = value` lines of the ```text blocks of §9."""
    body = text[text.index(SECTION) + len(SECTION):]
    end = body.find("\n## ")
    body = body if end < 0 else body[:end]
    out, in_block, last = {}, False, None
    for line in body.splitlines():
        if line.startswith("```"):
            in_block = not in_block and line.strip() == "```text"
            last = None
            continue
        if not in_block or not line.strip() or line.startswith("#"):
            continue
        if line.startswith("    "):
            out[last] += line.strip()
            continue
        name, value = line.split("=", 1)
        out[name.strip()] = value.strip()
        last = name.strip()
    return out


class V:
    def __init__(self, raw):
        self.raw = raw

    def hex(self, name):
        return bytes.fromhex(self.raw[name])

    def text(self, name):
        v = self.raw[name]
        assert v.startswith('"') and v.endswith('"'), name
        return v[1:-1]

    def num(self, name):
        return int(self.raw[name])


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def field(number, value):
    """One proto3 field as FORMAT.md §3.2 says: ints as varints, bytes/strings length-delimited."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def nonce(domain, index, last):
    """FORMAT.md §2.2: domain, 00 00, index u64 BE, last flag."""
    return bytes([domain, 0, 0]) + index.to_bytes(8, "big") + bytes([1 if last else 0])


failures = []


def check(what, ok):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def main():
    path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parents[2] / "docs" / "FORMAT.md")
    v = V(vectors(path.read_text(encoding="utf-8")))
    sha = lambda b: hashlib.sha256(b).digest()

    plain = bytes(i % 251 for i in range(v.num("plaintext_len")))
    check("plaintext_sha256", sha(plain) == v.hex("plaintext_sha256"))
    check("node_id = SHA-256(SPKI)", sha(v.hex("publisher_spki")) == v.hex("node_id"))
    check("chunk1_id = SHA-256(chunk1_ciphertext)", sha(v.hex("chunk1_ciphertext")) == v.hex("chunk1_id"))
    check("empty_id = SHA-256(empty_ciphertext)", sha(v.hex("empty_ciphertext")) == v.hex("empty_id"))
    check("nonces", (v.hex("chunk0_nonce"), v.hex("chunk1_nonce"), v.hex("empty_nonce"), v.hex("meta_nonce"))
          == (nonce(0, 0, False), nonce(0, 1, True), nonce(0, 0, True), nonce(1, 0, True)))

    cs = v.num("chunk_size")
    body = b"".join([
        field(1, 1),
        field(2, v.hex("publisher_spki")),
        field(3, v.text("kind").encode()),
        field(4, len(plain)),
        field(5, cs),
        field(6, v.hex("chunk0_id")),
        field(6, v.hex("chunk1_id")),
        field(7, v.num("created_at_ms")),
        field(8, v.hex("encrypted_meta")),
        field(9, 1),
    ])
    check("manifest_body re-encoded from its fields", body == v.hex("manifest_body"))
    check("content_id = SHA-256(body)", sha(v.hex("manifest_body")) == v.hex("content_id"))
    check("meta_plain = ItemMeta{name}", field(1, v.text("name").encode()) == v.hex("meta_plain"))

    # scrypt: the writer's N = 2^15, r = 8 needs 128 * r * (N + p + 2) bytes,
    # just over hashlib's default limit of 32 MiB (FORMAT.md §1.3).
    sealed = v.hex("sealed")
    header = sealed[:41]
    log_n, r, p = header[4], *struct.unpack(">II", header[5:13])
    check("sealed header", header[:4] == b"BSS1" and header[13:29] == v.hex("seal_salt")
          and header[29:41] == v.hex("seal_nonce") and (log_n, r, p) == (15, 8, 1))
    key = hashlib.scrypt(v.text("seal_passphrase").encode(), salt=header[13:29], n=2**log_n, r=r, p=p,
                         dklen=32, maxmem=128 * r * (2**log_n + p + 2))
    check("seal_key = scrypt(...)", key == v.hex("seal_key"))

    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        print("skipped: AES-GCM and RSA checks (the cryptography package is not installed)")
        return 1 if failures else 0

    g = AESGCM(v.hex("item_key"))
    c0 = g.encrypt(nonce(0, 0, False), plain[:cs], b"bitsync-chunk-v1")
    check("chunk 0 head, tag and id", c0[:16] == v.hex("chunk0_head") and c0[-16:] == v.hex("chunk0_tag")
          and sha(c0) == v.hex("chunk0_id"))
    check("chunk 1 ciphertext", g.encrypt(nonce(0, 1, True), plain[cs:], b"bitsync-chunk-v1")
          == v.hex("chunk1_ciphertext"))
    check("zero-byte item's chunk", g.encrypt(nonce(0, 0, True), b"", b"bitsync-chunk-v1") == v.hex("empty_ciphertext"))
    check("encrypted_meta", g.encrypt(nonce(1, 0, True), v.hex("meta_plain"), b"bitsync-meta-v1")
          == v.hex("encrypted_meta"))
    check("encrypted_meta_empty", g.encrypt(nonce(1, 0, True), b"", b"bitsync-meta-v1") == v.hex("encrypted_meta_empty"))
    check("sealed data opens", AESGCM(key).decrypt(header[29:41], sealed[41:], header)
          == v.text("seal_plaintext").encode())

    private = serialization.load_der_private_key(v.hex("private_key_pkcs8"), password=None)
    public = serialization.load_der_public_key(v.hex("publisher_spki"))
    check("private key matches publisher_spki", private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == v.hex("publisher_spki"))
    try:
        public.verify(v.hex("signature"), b"bitsync-manifest-v1\0" + v.hex("manifest_body"),
                      padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
        check("signature verifies (RSA-PSS-SHA256, salt 32)", True)
    except Exception as e:  # noqa: BLE001 - any failure is a failed check
        check(f"signature verifies (RSA-PSS-SHA256, salt 32): {e!r}", False)
    item_key = private.decrypt(v.hex("envelope"), padding.OAEP(
        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    check("envelope unwraps to item_key", item_key == v.hex("item_key"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
