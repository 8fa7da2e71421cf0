package tier

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"

	"github.com/pagedkv/pagedkv/prefix"
)

// Fingerprint identifies a model's block layout: two caches may exchange blocks only when their
// fingerprints are equal. kvcache derives it from the geometry (layers, heads, head dims, dtype,
// block tokens, layout); a store holds one model's blocks and checks it on every read.
type Fingerprint [32]byte

// The header every stored block starts with, little-endian, then the salt padded to 8 bytes,
// then the block's bytes:
//
//	offset  size  field
//	     0     8  magic "PKVBLK01" (format version 1)
//	     8    32  Fingerprint
//	    40    32  key
//	    72    32  parent key
//	   104     8  namespace adapter
//	   112     8  data length in bytes
//	   120     4  salt length in bytes
//	   124     4  CRC-32C (Castagnoli) of the header with this field zero, the salt and the data
//	   128     -  salt, zero-padded to a multiple of 8
//
// A flipped bit anywhere, a torn write (data shorter than its length), another model's
// fingerprint or another namespace fails Check.
const (
	magic     = "PKVBLK01"
	fixedSize = 128
	crcAt     = 124
	// MaxSalt is the longest namespace salt a stored block can carry.
	MaxSalt = 1 << 16
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Header is what a stored block says about itself.
type Header struct {
	Fingerprint Fingerprint
	NS          prefix.Namespace
	Key, Parent prefix.Key
	DataLen     uint64
	Size        int // the header's own bytes, salt and padding included: the data starts here
	sum         uint32
}

// HeaderSize returns the bytes of the header of a block in namespace ns.
func HeaderSize(ns prefix.Namespace) int { return fixedSize + (len(ns.Salt)+7)&^7 }

// Encode appends block b's header and data, as stored, to dst and returns the extended slice.
// It fails only for a salt longer than MaxSalt.
func Encode(dst []byte, fp Fingerprint, b Block) ([]byte, error) {
	if len(b.NS.Salt) > MaxSalt {
		return dst, fmt.Errorf("tier: encode: %w: salt of %d bytes exceeds %d", ErrInvalidArgument, len(b.NS.Salt), MaxSalt)
	}
	start := len(dst)
	hs := HeaderSize(b.NS)
	dst = append(dst, make([]byte, hs)...)
	h := dst[start:]
	copy(h[0:8], magic)
	copy(h[8:40], fp[:])
	copy(h[40:72], b.Key[:])
	copy(h[72:104], b.Parent[:])
	binary.LittleEndian.PutUint64(h[104:], b.NS.Adapter)
	binary.LittleEndian.PutUint64(h[112:], uint64(len(b.Data)))
	binary.LittleEndian.PutUint32(h[120:], uint32(len(b.NS.Salt)))
	copy(h[fixedSize:], b.NS.Salt)
	sum := crc32.Update(crc32.Checksum(h[:hs], castagnoli), castagnoli, b.Data)
	binary.LittleEndian.PutUint32(h[crcAt:], sum)
	return append(dst, b.Data...), nil
}

// ParseHeader reads the header at the start of buf without checking the data: enough to
// index a stored block (a disk tier's scan at open). buf may hold only the header.
func ParseHeader(buf []byte) (Header, error) {
	var h Header
	if len(buf) < fixedSize {
		return h, &CorruptError{Reason: fmt.Sprintf("%d bytes, shorter than a header (%d)", len(buf), fixedSize)}
	}
	if string(buf[0:8]) != magic {
		return h, &CorruptError{Reason: fmt.Sprintf("magic %q, want %q", buf[0:8], magic)}
	}
	copy(h.Fingerprint[:], buf[8:40])
	copy(h.Key[:], buf[40:72])
	copy(h.Parent[:], buf[72:104])
	h.NS.Adapter = binary.LittleEndian.Uint64(buf[104:])
	h.DataLen = binary.LittleEndian.Uint64(buf[112:])
	salt := binary.LittleEndian.Uint32(buf[120:])
	h.sum = binary.LittleEndian.Uint32(buf[crcAt:])
	if salt > MaxSalt {
		return h, &CorruptError{Key: h.Key, Reason: fmt.Sprintf("salt of %d bytes exceeds %d", salt, MaxSalt)}
	}
	h.Size = fixedSize + (int(salt)+7)&^7
	if len(buf) < h.Size {
		// the padding counts: Size is where the data starts, and Check slices buf there
		return h, &CorruptError{Key: h.Key, Reason: fmt.Sprintf("%d bytes, shorter than its header (%d)", len(buf), h.Size)}
	}
	h.NS.Salt = string(buf[fixedSize : fixedSize+int(salt)])
	return h, nil
}

// Check verifies a whole stored block (header and data, as Encode wrote it) against what the
// reader expects: fingerprint fp, namespace ns, key k and dataLen bytes of data. It returns the
// data (a subslice of buf) or a *CorruptError (ErrCorrupt) or a *MismatchError (ErrMismatch).
func Check(buf []byte, fp Fingerprint, ns prefix.Namespace, k prefix.Key, dataLen int) ([]byte, error) {
	h, err := ParseHeader(buf)
	if err != nil {
		return nil, err
	}
	if h.DataLen != uint64(dataLen) || uint64(len(buf)-h.Size) != h.DataLen {
		return nil, &CorruptError{Key: k, Reason: fmt.Sprintf("%d data bytes stored, header says %d, want %d", len(buf)-h.Size, h.DataLen, dataLen)}
	}
	var zero [4]byte
	sum := crc32.Update(crc32.Checksum(buf[:crcAt], castagnoli), castagnoli, zero[:])
	sum = crc32.Update(sum, castagnoli, buf[crcAt+4:])
	if sum != h.sum {
		return nil, &CorruptError{Key: k, Reason: fmt.Sprintf("checksum %08x, stored %08x", sum, h.sum)}
	}
	switch {
	case h.Fingerprint != fp:
		return nil, &MismatchError{Key: k, What: "fingerprint"}
	case h.NS != ns:
		return nil, &MismatchError{Key: k, What: "namespace"}
	case h.Key != k:
		return nil, &MismatchError{Key: k, What: "key"}
	}
	return buf[h.Size:], nil
}

// CorruptError reports a stored block that failed a check; it matches ErrCorrupt.
type CorruptError struct {
	Key    prefix.Key // zero where the header could not be read
	Reason string
}

// Error describes the failure.
func (e *CorruptError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("corrupt block %.16s: %s", e.Key, e.Reason)
}

// Is reports whether target is ErrCorrupt.
func (e *CorruptError) Is(target error) bool { return e != nil && target == ErrCorrupt }

// MismatchError reports an intact stored block that belongs to another model, namespace or key
// than asked; it matches ErrMismatch.
type MismatchError struct {
	Key  prefix.Key
	What string // "fingerprint", "namespace" or "key"
}

// Error describes the mismatch.
func (e *MismatchError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("block %.16s: %s differs", e.Key, e.What)
}

// Is reports whether target is ErrMismatch.
func (e *MismatchError) Is(target error) bool { return e != nil && target == ErrMismatch }
