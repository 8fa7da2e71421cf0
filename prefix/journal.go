package prefix

import (
	"encoding/binary"
	"math/bits"
	"slices"
	"unsafe"
)

// Journal is a writer's KV events in compact form: one record per event in one byte array that
// holds no pointers. A manager writes its events here on the append path and hands the journal
// to its feed (Feed.HandJournal); a subscription decodes the records into Events only when its
// reader reads (Subscription.Read, Take), on the reader's goroutine. A block's key and token
// ids are written once, as bytes, and nothing the garbage collector scans is built while the
// cache is locked (docs/performance.md has what it costs the decode step).
//
// A Journal's records are in two parts: the sealed ones (Seal), events of operations that
// succeeded, and those after them, which an operation that fails drops (DropUnsealed). The
// zero Journal is empty and ready to use. Not safe for concurrent use: its writer's lock
// guards it. A Journal must not be copied once written to: two copies share one array.
type Journal struct {
	b      []byte
	at     journalMark // the end: records, bytes, keys, token ids, the last record
	sealed journalMark
}

// journalMark is a position in a journal.
type journalMark struct {
	n, keys, tokens int
	last            int // offset of the last record, when n > 0
	bytes           int
}

// A record: a 24-byte header (kind, flags, medium and group-kind codes, 4 zero bytes, the
// counts of keys and of token ids as uint64s), then the uint64s its flags name (block size,
// adapter, lost, group, window), the strings without a code (uint64 length, bytes), the parent
// key, the keys and the token ids, in native byte order (a journal never leaves its process).
const recHeader = 24

// The flags of a record.
const (
	fParentIsRoot = 1 << iota
	fHasGroup
	fParent
	fBlockSize
	fAdapter
	fLost
	fGroup
	fWindow
)

// codes are the strings a record names by a one-byte code (its index + 1): the media and group
// kinds pagedkv writes. Others follow the header (code inline).
var codes = [...]string{MediumGPU, MediumCPU, "DISK", "CLUSTER", "full_attention", "sliding_window",
	"chunked_local_attention", "mla_attention", "mamba"}

const inline = 255

// code returns s's code: 0 for "", its index in codes + 1, or inline. A switch on constants,
// which the compiler compares inline; a loop over codes called the runtime's memequal for
// each, a good part of Append's time (pprof).
func code(s string) byte {
	switch s {
	case "":
		return 0
	case MediumGPU:
		return 1
	case MediumCPU:
		return 2
	case "DISK":
		return 3
	case "CLUSTER":
		return 4
	case "full_attention":
		return 5
	case "sliding_window":
		return 6
	case "chunked_local_attention":
		return 7
	case "mla_attention":
		return 8
	case "mamba":
		return 9
	}
	return inline
}

// Len returns the number of events in j (0 for a nil j).
func (j *Journal) Len() int {
	if j == nil {
		return 0
	}
	return j.at.n
}

// Unsealed returns the number of events written to j since the last Seal (0 for a nil j).
func (j *Journal) Unsealed() int {
	if j == nil {
		return 0
	}
	return j.at.n - j.sealed.n
}

// Seal marks every event in j as kept: DropUnsealed drops only later ones.
func (j *Journal) Seal() {
	if j != nil {
		j.sealed = j.at
	}
}

// DropUnsealed drops the events written since the last Seal (all of them if none).
func (j *Journal) DropUnsealed() {
	if j == nil {
		return
	}
	j.at = j.sealed
	j.b = j.b[:j.at.bytes]
}

// Reset empties j, keeping its array.
func (j *Journal) Reset() {
	if j == nil {
		return
	}
	j.b = j.b[:0]
	j.at = journalMark{}
	j.sealed = j.at
}

// Append writes ev at the end of j. ev is read, not kept. A nil j or ev does nothing.
func (j *Journal) Append(ev *Event) {
	if j == nil || ev == nil {
		return
	}
	medium, kind := code(ev.Medium), code(ev.GroupKind)
	var flags byte
	size := recHeader + len(ev.Keys)*len(Key{}) + len(ev.Tokens)*int(unsafe.Sizeof(Token(0)))
	if ev.BlockSize != 0 {
		flags |= fBlockSize
	}
	if ev.Adapter != 0 {
		flags |= fAdapter
	}
	if ev.Lost != 0 {
		flags |= fLost
	}
	if ev.Group != 0 {
		flags |= fGroup
	}
	if ev.SlidingWindow != 0 {
		flags |= fWindow
	}
	size += 8 * bits.OnesCount8(flags)
	if !ev.Parent.zero() {
		flags |= fParent
		size += len(Key{})
	}
	if ev.ParentIsRoot {
		flags |= fParentIsRoot
	}
	if ev.HasGroup {
		flags |= fHasGroup
	}
	if medium == inline {
		size += 8 + len(ev.Medium)
	}
	if kind == inline {
		size += 8 + len(ev.GroupKind)
	}
	// One growth, then writes into the record's bytes: appending field by field cost a block's
	// two events about 90 ns (BenchmarkJournal).
	start := len(j.b)
	j.b = slices.Grow(j.b, size)[:start+size]
	r := j.b[start:]
	r[0], r[1], r[2], r[3] = byte(ev.Kind), flags, medium, kind
	binary.NativeEndian.PutUint32(r[4:], 0)
	binary.NativeEndian.PutUint64(r[8:], uint64(len(ev.Keys)))
	binary.NativeEndian.PutUint64(r[16:], uint64(len(ev.Tokens)))
	off := recHeader
	off = putOpt(r, off, flags&fBlockSize != 0, uint64(ev.BlockSize))
	off = putOpt(r, off, flags&fAdapter != 0, ev.Adapter)
	off = putOpt(r, off, flags&fLost != 0, ev.Lost)
	off = putOpt(r, off, flags&fGroup != 0, uint64(ev.Group))
	off = putOpt(r, off, flags&fWindow != 0, uint64(ev.SlidingWindow))
	if medium == inline {
		off += putString(r[off:], ev.Medium)
	}
	if kind == inline {
		off += putString(r[off:], ev.GroupKind)
	}
	if flags&fParent != 0 {
		*(*Key)(r[off:]) = ev.Parent // a move of 32 bytes, not a call to copy's memmove
		off += len(Key{})
	}
	if len(ev.Keys) == 1 { // a block stored or evicted: as the parent
		*(*Key)(r[off:]) = ev.Keys[0]
		off += len(Key{})
	} else {
		off += copy(r[off:], keyBytes(ev.Keys))
	}
	copy(r[off:], tokenBytes(ev.Tokens))
	j.at.n++
	j.at.keys += len(ev.Keys)
	j.at.tokens += len(ev.Tokens)
	j.at.last = start
	j.at.bytes = len(j.b)
}

// ExtendRemoved adds key k to j's last event when that is an unsealed BlockRemoved of medium
// with no token ids, and reports whether it did; else the caller appends a BlockRemoved of its
// own. A run of evictions so makes one event.
func (j *Journal) ExtendRemoved(k Key, medium string) bool {
	if j == nil || j.at.n == j.sealed.n { // no unsealed record: none to extend
		return false
	}
	h := j.b[j.at.last:]
	if EventKind(h[0]) != BlockRemoved || binary.NativeEndian.Uint64(h[16:]) != 0 {
		return false
	}
	c := code(medium)
	if c != h[2] || c == inline && !inlineIs(h, medium) {
		return false
	}
	binary.NativeEndian.PutUint64(h[8:], binary.NativeEndian.Uint64(h[8:])+1)
	j.b = append(j.b, k[:]...)
	j.at.keys++
	j.at.bytes = len(j.b)
	return true
}

// inlineIs reports whether record h, whose medium is inline, names medium: its string follows
// the header and the uint64s its flags name.
func inlineIs(h []byte, medium string) bool {
	off := recHeader + 8*bits.OnesCount8(h[1]&(fBlockSize|fAdapter|fLost|fGroup|fWindow))
	n := binary.NativeEndian.Uint64(h[off:])
	return n == uint64(len(medium)) && string(h[off+8:off+8+len(medium)]) == medium
}

// appendTo appends j's events to dst, their keys and token ids in two new arrays that belong
// to the caller, and returns dst. A record that does not parse (only a Journal copied and then
// written through both copies has one) ends the decoding: the events from it on are reported
// as one EventsLost, so that the reader rebuilds its view, as after a loss.
func (j *Journal) appendTo(dst []Event) []Event {
	var keys []Key
	var tokens []Token
	if j.at.keys > 0 {
		keys = make([]Key, j.at.keys)
	}
	if j.at.tokens > 0 {
		tokens = make([]Token, j.at.tokens)
	}
	b := j.b
	done := 0
	for off := 0; off < len(b); done++ {
		dst = append(dst, Event{})
		ev := &dst[len(dst)-1]
		size, ok := decodeRecord(b[off:], ev, keys, tokens)
		if !ok {
			*ev = Event{Kind: EventsLost, Lost: uint64(max(1, j.at.n-done))}
			return dst
		}
		keys, tokens = keys[len(ev.Keys):], tokens[len(ev.Tokens):]
		off += size
	}
	return dst
}

// decodeRecord decodes the record at the start of b into ev (zero), its keys and token ids
// copied into the start of keys and tokens, and returns the record's size; it reports false,
// ev then half filled, when b does not hold a whole record or keys and tokens are too short.
func decodeRecord(b []byte, ev *Event, keys []Key, tokens []Token) (size int, ok bool) {
	if len(b) < recHeader {
		return 0, false
	}
	nk, nt := binary.NativeEndian.Uint64(b[8:]), binary.NativeEndian.Uint64(b[16:])
	if nk > uint64(len(keys)) || nt > uint64(len(tokens)) {
		return 0, false
	}
	flags := b[1]
	ev.Kind, ev.ParentIsRoot, ev.HasGroup = EventKind(b[0]), flags&fParentIsRoot != 0, flags&fHasGroup != 0
	off := recHeader
	for i := range 5 {
		if flags&(fBlockSize<<i) == 0 {
			continue
		}
		if len(b)-off < 8 {
			return 0, false
		}
		v := binary.NativeEndian.Uint64(b[off:])
		off += 8
		switch i {
		case 0:
			ev.BlockSize = int(v)
		case 1:
			ev.Adapter = v
		case 2:
			ev.Lost = v
		case 3:
			ev.Group = int(v)
		case 4:
			ev.SlidingWindow = int(v)
		}
	}
	if ev.Medium, off, ok = decodeString(b, off, b[2]); !ok {
		return 0, false
	}
	if ev.GroupKind, off, ok = decodeString(b, off, b[3]); !ok {
		return 0, false
	}
	need := int(nk)*len(Key{}) + int(nt)*int(unsafe.Sizeof(Token(0)))
	if flags&fParent != 0 {
		need += len(Key{})
	}
	if need > len(b)-off {
		return 0, false
	}
	if flags&fParent != 0 {
		off += copy(ev.Parent[:], b[off:])
	}
	if nk > 0 {
		ev.Keys = keys[:nk:nk]
		off += copy(keyBytes(ev.Keys), b[off:])
	}
	if nt > 0 {
		ev.Tokens = tokens[:nt:nt]
		off += copy(tokenBytes(ev.Tokens), b[off:])
	}
	return off, true
}

// decodeString decodes the string of code c, reading it from b[off:] when inline, and returns
// it and the offset after it.
func decodeString(b []byte, off int, c byte) (string, int, bool) {
	switch {
	case c == 0:
		return "", off, true
	case c == inline:
		if len(b)-off < 8 {
			return "", 0, false
		}
		n := binary.NativeEndian.Uint64(b[off:])
		if n > uint64(len(b)-off-8) {
			return "", 0, false
		}
		return string(b[off+8 : off+8+int(n)]), off + 8 + int(n), true
	case int(c) <= len(codes):
		return codes[c-1], off, true
	}
	return "", 0, false
}

// appendJournal appends src's records to j (they stay in src).
func (j *Journal) appendJournal(src *Journal) {
	if src.at.n == 0 {
		return
	}
	if j.at.n == 0 {
		j.Reset()
	}
	base := len(j.b)
	j.b = append(j.b, src.b...)
	j.at.n += src.at.n
	j.at.keys += src.at.keys
	j.at.tokens += src.at.tokens
	j.at.last = base + src.at.last
	j.at.bytes = len(j.b)
	j.sealed = j.at
}

// putOpt writes v at b[off:] when on, and returns the offset after it.
func putOpt(b []byte, off int, on bool, v uint64) int {
	if !on {
		return off
	}
	binary.NativeEndian.PutUint64(b[off:], v)
	return off + 8
}

// putString writes s's length and bytes at the start of b and returns how many it wrote.
func putString(b []byte, s string) int {
	binary.NativeEndian.PutUint64(b, uint64(len(s)))
	return 8 + copy(b[8:], s)
}

// zero reports whether k is all zeros. The compiler makes each Uint64 one load (amd64: MOVQ
// and three ORQ; arm64: two LDP), as a cast to *[4]uint64 would, without assuming that a Key,
// an array of bytes, is 8-byte aligned; comparing with Key{} called the runtime's memequal.
func (k *Key) zero() bool {
	le := binary.LittleEndian
	return le.Uint64(k[0:])|le.Uint64(k[8:])|le.Uint64(k[16:])|le.Uint64(k[24:]) == 0
}

// keyBytes views keys as bytes.
func keyBytes(keys []Key) []byte {
	if len(keys) == 0 {
		return nil
	}
	return unsafe.Slice(&keys[0][0], len(keys)*len(Key{}))
}

// tokenBytes views token ids as bytes, in native order.
func tokenBytes(t []Token) []byte {
	if len(t) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&t[0])), len(t)*int(unsafe.Sizeof(t[0])))
}
