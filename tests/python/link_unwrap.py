#!/usr/bin/env python3
"""Open a format-2 item envelope from docs/FORMAT.md §1.4, §4.2-4.4 alone.

A second reader of link keys, written from the document with nothing of
bitsync's code: sqlite3 for the data dir's database, hashlib/hmac for
HKDF-SHA256, the `cryptography` package for RSA and AES-256-GCM, and the
pure-Python FIPS 203 `kyber-py` (imported only when a hybrid BLE3 link
envelope is met) for ML-KEM-768.

    python3 tests/python/link_unwrap.py DATA_DIR CONTENT_ID ENVELOPE_HEX

DATA_DIR is the recipient's (unsealed node.key and node.mlkem). Prints the 32-byte item key
in hex; exits 1 with a reason when any check fails. tests/linkkeys.rs runs it
and compares the key with what the node opened.
"""

import base64
import hashlib
import hmac
import sqlite3
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

LINK_DOMAIN = b"bitsync-link-v2"
HYBRID_DOMAIN = b"bitsync-link-v3"


def hkdf_sha256(salt, ikm, info, length=32):
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def parse_link(b):
    """§4.2 / §4.2b: magic, sender, recipient, generation, wrap, [ML-KEM ct], signature."""
    assert b[:4] in (b"BLE2", b"BLE3"), "link envelope magic"
    hybrid = b[:4] == b"BLE3"
    sender, recipient = b[4:36], b[36:68]
    (gen,) = struct.unpack(">I", b[68:72])
    (wlen,) = struct.unpack(">H", b[72:74])
    wrapped = b[74:74 + wlen]
    at = 74 + wlen
    kem_ct = None
    if hybrid:
        kem_ct = b[at:at + 1088]
        assert len(kem_ct) == 1088, "ML-KEM-768 ciphertext is 1088 bytes"
        at += 1088
    (slen,) = struct.unpack(">H", b[at:at + 2])
    sig = b[at + 2:at + 2 + slen]
    assert at + 2 + slen == len(b), "no trailing bytes"
    return sender, recipient, gen, wrapped, kem_ct, b[:at], sig


def pem_body(text):
    """§1.2: the base64 of the first PEM block."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("-----BEGIN "))
    body = []
    for l in lines[start + 1:]:
        if l.startswith("-----END "):
            break
        body.append(l)
    return base64.b64decode("".join(body).strip())


def mlkem_decaps(data_dir, ct):
    """§1.4: node.mlkem holds the FIPS 203 decapsulation key (2400 bytes)."""
    from kyber_py.ml_kem import ML_KEM_768  # pure-Python FIPS 203
    with open(f"{data_dir}/node.mlkem") as f:
        text = f.read()
    assert "BITSYNC SEALED KEY" not in text, "this reader takes an unsealed node.mlkem"
    dk = pem_body(text)
    assert len(dk) == 2400, "ML-KEM-768 decapsulation key is 2400 bytes"
    return ML_KEM_768.decaps(dk, ct)


def oaep():
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def link_key(private, data_dir, b, verify_with=None):
    sender, recipient, gen, wrapped, kem_ct, signed, sig = parse_link(b)
    domain = HYBRID_DOMAIN if kem_ct is not None else LINK_DOMAIN
    if verify_with is not None:
        verify_with.verify(
            sig, domain + b"\0" + signed,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    secret = private.decrypt(wrapped, oaep())
    assert len(secret) == 32, "link secret is 32 bytes"
    ikm = secret
    if kem_ct is not None:  # §4.2b: IKM = S || ss
        ss = mlkem_decaps(data_dir, kem_ct)
        assert len(ss) == 32, "ML-KEM shared secret is 32 bytes"
        ikm = secret + ss
    return hkdf_sha256(domain, ikm, sender + recipient + struct.pack(">I", gen))


def main(data_dir, content_id, envelope_hex):
    with open(f"{data_dir}/node.key", "rb") as f:
        private = serialization.load_pem_private_key(f.read(), password=None)
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    me = hashlib.sha256(spki).digest()  # §1: node id
    db = sqlite3.connect(f"file:{data_dir}/bitsync.db?mode=ro", uri=True)
    own_env, own_gen = db.execute(
        "SELECT envelope, generation FROM link_keys WHERE sender = ?1 AND recipient = ?1 "
        "ORDER BY generation DESC LIMIT 1", (me.hex(),)).fetchone()
    own = link_key(private, data_dir, own_env, verify_with=private.public_key())

    env = bytes.fromhex(envelope_hex)
    assert len(env) == 100 and env[:4] == b"BIE2", "item envelope (§4.3)"
    sender, (gen,) = env[4:36], struct.unpack(">I", env[36:40])
    if sender == me and gen == own_gen:
        link = own
    else:
        link_env, sealed = db.execute(
            "SELECT envelope, sealed FROM link_keys WHERE sender = ? AND recipient = ? AND generation = ?",
            (sender.hex(), me.hex(), gen)).fetchone()
        # §4.4: the sealed copy, opened with L(self→self) ...
        ids = sender + me + struct.pack(">I", gen)
        link = AESGCM(own).decrypt(sealed[:12], sealed[12:], b"bitsync-link-seal-v2\0" + ids)
        # ... is the key the link envelope itself carries.
        assert link == link_key(private, data_dir, link_env), "sealed link key matches its envelope"
    aad = (b"bitsync-item-envelope-v2\0" + bytes.fromhex(content_id) + sender + me
           + struct.pack(">I", gen))
    key = AESGCM(link).decrypt(env[40:52], env[52:], aad)
    assert len(key) == 32, "item key is 32 bytes"
    print(key.hex())


if __name__ == "__main__":
    try:
        main(*sys.argv[1:4])
    except Exception as e:  # noqa: BLE001 - report any failed check
        print(f"link_unwrap.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
