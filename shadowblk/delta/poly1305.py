"""Poly1305 (RFC 8439) from the system's OpenSSL 3 libcrypto, through ctypes.

The delta stream tags every big frame with a one-time Poly1305 key (see auth.py). OpenSSL's
Poly1305 uses SIMD and runs several times faster than BLAKE2b, the fastest MAC in hashlib;
ctypes releases the GIL for the call, so a worker thread can tag while the event loop runs.
Python's own ssl module links the same libcrypto, so it is always there.
"""

from __future__ import annotations

import ctypes
import ctypes.util

KEY_SIZE = 32
TAG_SIZE = 16


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
    lib.EVP_MAC_fetch.restype = ctypes.c_void_p
    lib.EVP_MAC_fetch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.EVP_MAC_CTX_new.restype = ctypes.c_void_p
    lib.EVP_MAC_CTX_new.argtypes = [ctypes.c_void_p]
    lib.EVP_MAC_CTX_free.argtypes = [ctypes.c_void_p]
    lib.EVP_MAC_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.EVP_MAC_update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.EVP_MAC_final.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_size_t,
    ]
    return lib


_LIB = _load()
_MAC = _LIB.EVP_MAC_fetch(None, b"POLY1305", None)
if not _MAC:
    raise ImportError("libcrypto has no POLY1305 MAC (OpenSSL 3 is required)")


def poly1305(key: bytes, data: bytes) -> bytes:
    """The 16-byte Poly1305 tag of DATA under the one-time KEY (32 bytes: never reuse a key
    for a different message)."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"Poly1305 key must be {KEY_SIZE} bytes, not {len(key)}")
    ctx = _LIB.EVP_MAC_CTX_new(_MAC)
    if not ctx:
        raise MemoryError("EVP_MAC_CTX_new failed")
    try:
        out = ctypes.create_string_buffer(TAG_SIZE)
        size = ctypes.c_size_t()
        if not (
            _LIB.EVP_MAC_init(ctx, key, KEY_SIZE, None) == 1
            and _LIB.EVP_MAC_update(ctx, data, len(data)) == 1
            and _LIB.EVP_MAC_final(ctx, out, ctypes.byref(size), TAG_SIZE) == 1
        ):
            raise RuntimeError("libcrypto Poly1305 failed")
        return out.raw[: size.value]
    finally:
        _LIB.EVP_MAC_CTX_free(ctx)
