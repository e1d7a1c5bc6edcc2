"""CRC-32 of a concatenation from the CRC-32s of its parts, in O(1).

Records are written by worker processes in any order; each returns its record's CRC-32 and the
builder folds them, in file order, into the whole file's CRC-32 without reading the file again:
crc32(A + B) = Z_n(crc32(A)) ^ crc32(B), n = len(B), where Z_n advances a CRC register over n zero
bytes. Z_n is linear over GF(2), so it is applied with four 256-entry byte tables.
"""

from __future__ import annotations

import zlib

_MASK = 0xFFFFFFFF


class CRCAppender:
    """crc32(A + B) from crc32(A) and crc32(B) for parts B of one fixed length."""

    def __init__(self, part_bytes: int):
        zeros = bytes(part_bytes)
        # zlib inverts the register on the way in and out: Z(r) = ~crc32(zeros, ~r), linear in r.
        basis = [~zlib.crc32(zeros, ~(1 << i) & _MASK) & _MASK for i in range(32)]
        self.part_bytes = part_bytes
        self._tables = []
        for k in range(4):
            table = [0] * 256
            for b in range(256):
                acc = 0
                for bit in range(8):
                    if b >> bit & 1:
                        acc ^= basis[8 * k + bit]
                table[b] = acc
            self._tables.append(table)

    def append(self, crc_a: int, crc_b: int) -> int:
        t0, t1, t2, t3 = self._tables
        shifted = t0[crc_a & 255] ^ t1[crc_a >> 8 & 255] ^ t2[crc_a >> 16 & 255] ^ t3[crc_a >> 24]
        return shifted ^ crc_b
