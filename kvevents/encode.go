package kvevents

import (
	"encoding/binary"
	"math"
	"slices"

	"github.com/pagedkv/pagedkv/prefix"
)

// The batch and its events are MessagePack, appended byte by byte: a batch of block events is
// a few kinds of item (arrays, maps, strings, integers, null), and appending them directly is
// several times faster than an encoder over an io.Writer and allocates nothing (the tests decode
// every batch with vmihailenco/msgpack and Python's msgpack).

// MessagePack type bytes.
const (
	mpNil     = 0xc0
	mpBin8    = 0xc4
	mpFloat64 = 0xcb
	mpUint8   = 0xcc
	mpUint16  = 0xcd
	mpUint32  = 0xce
	mpUint64  = 0xcf
	mpInt8    = 0xd0
	mpInt16   = 0xd1
	mpInt32   = 0xd2
	mpInt64   = 0xd3
	mpStr8    = 0xd9
	mpStr16   = 0xda
	mpStr32   = 0xdb
	mpArray16 = 0xdc
	mpArray32 = 0xdd
	mpMap16   = 0xde
	mpMap32   = 0xdf
)

func appendNil(b []byte) []byte { return append(b, mpNil) }

func appendFloat64(b []byte, f float64) []byte {
	return binary.BigEndian.AppendUint64(append(b, mpFloat64), math.Float64bits(f))
}

// appendUint appends n in its shortest form, as msgspec (vLLM's encoder) writes a non-negative
// integer.
func appendUint(b []byte, n uint64) []byte {
	switch {
	case n < 128:
		return append(b, byte(n))
	case n <= math.MaxUint8:
		return append(b, mpUint8, byte(n))
	case n <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, mpUint16), uint16(n))
	case n <= math.MaxUint32:
		return binary.BigEndian.AppendUint32(append(b, mpUint32), uint32(n))
	}
	return binary.BigEndian.AppendUint64(append(b, mpUint64), n)
}

// appendInt appends n in its shortest form.
func appendInt(b []byte, n int64) []byte {
	switch {
	case n >= 0:
		return appendUint(b, uint64(n))
	case n >= -32:
		return append(b, byte(n))
	case n >= math.MinInt8:
		return append(b, mpInt8, byte(n))
	case n >= math.MinInt16:
		return binary.BigEndian.AppendUint16(append(b, mpInt16), uint16(n))
	case n >= math.MinInt32:
		return binary.BigEndian.AppendUint32(append(b, mpInt32), uint32(n))
	}
	return binary.BigEndian.AppendUint64(append(b, mpInt64), uint64(n))
}

// appendTokens appends ids as an array of integers, each as appendInt writes it. The ids are
// most of a BlockStored event's bytes: b grows once and each id is written in place, which
// took the encoding of a decode step's block from about 160 to 110 ns (BenchmarkEncodeBatch).
func appendTokens(b []byte, ids []prefix.Token) []byte {
	b = slices.Grow(appendArrayLen(b, len(ids)), 5*len(ids))
	n := len(b)
	b = b[:n+5*len(ids)]
	for _, t := range ids {
		switch { // the forms of a vocabulary's ids, inline; putInt32 writes every form
		case uint32(t) < 128:
			b[n] = byte(t)
			n++
		case t > math.MaxUint16:
			b[n] = mpUint32
			binary.BigEndian.PutUint32(b[n+1:n+5], uint32(t))
			n += 5
		case t > math.MaxUint8:
			b[n] = mpUint16
			binary.BigEndian.PutUint16(b[n+1:n+3], uint16(t))
			n += 3
		default:
			n += putInt32(b[n:n+5], t)
		}
	}
	return b[:n]
}

// putInt32 writes n into b (5 bytes long) in its shortest form, as appendInt does, and returns
// the bytes written.
func putInt32(b []byte, n int32) int {
	switch {
	case n >= 0 && n < 128, n < 0 && n >= -32:
		b[0] = byte(n)
		return 1
	case n >= 0 && n <= math.MaxUint8:
		b[0], b[1] = mpUint8, byte(n)
		return 2
	case n >= 0 && n <= math.MaxUint16:
		b[0] = mpUint16
		binary.BigEndian.PutUint16(b[1:3], uint16(n))
		return 3
	case n >= 0:
		b[0] = mpUint32
		binary.BigEndian.PutUint32(b[1:5], uint32(n))
		return 5
	case n >= math.MinInt8:
		b[0], b[1] = mpInt8, byte(n)
		return 2
	case n >= math.MinInt16:
		b[0] = mpInt16
		binary.BigEndian.PutUint16(b[1:3], uint16(n))
		return 3
	}
	b[0] = mpInt32
	binary.BigEndian.PutUint32(b[1:5], uint32(n))
	return 5
}

func appendStr(b []byte, s string) []byte {
	n := len(s)
	switch {
	case n < 32:
		b = append(b, 0xa0|byte(n))
	case n <= math.MaxUint8:
		b = append(b, mpStr8, byte(n))
	case n <= math.MaxUint16:
		b = binary.BigEndian.AppendUint16(append(b, mpStr16), uint16(n))
	default:
		b = binary.BigEndian.AppendUint32(append(b, mpStr32), uint32(n))
	}
	return append(b, s...)
}

func appendArrayLen(b []byte, n int) []byte {
	switch {
	case n < 16:
		return append(b, 0x90|byte(n))
	case n <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, mpArray16), uint16(n))
	}
	return binary.BigEndian.AppendUint32(append(b, mpArray32), uint32(n))
}

func appendMapLen(b []byte, n int) []byte {
	switch {
	case n < 16:
		return append(b, 0x80|byte(n))
	case n <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, mpMap16), uint16(n))
	}
	return binary.BigEndian.AppendUint32(append(b, mpMap32), uint32(n))
}

// Hash64 returns the block hash vLLM sends for key k by default: the low 64 bits of the
// digest, read big-endian (vLLM's maybe_convert_block_hash).
func Hash64(k prefix.Key) uint64 { return binary.BigEndian.Uint64(k[24:]) }

// encoder writes batches as Config says. It is owned by the publisher's goroutine.
type encoder struct {
	maps  bool
	raw   bool
	rank  int
	names map[uint64]string
}

// appendHash appends block hash k.
func (e *encoder) appendHash(b []byte, k prefix.Key) []byte {
	if e.raw {
		return append(append(b, mpBin8, byte(len(k))), k[:]...)
	}
	return appendUint(b, Hash64(k))
}

func (e *encoder) appendHashes(b []byte, keys []prefix.Key) []byte {
	b = appendArrayLen(b, len(keys))
	for _, k := range keys {
		b = e.appendHash(b, k)
	}
	return b
}

// appendBatch appends the EventBatch [ts, events, data_parallel_rank] of events: an EventsLost
// goes out as AllBlocksCleared (the subscriber drops what it knew and relearns it), an event
// of an unknown kind not at all. It returns the events and block hashes written.
func (e *encoder) appendBatch(b []byte, ts float64, events []prefix.Event) (_ []byte, nEvents, nBlocks int) {
	for i := range events {
		if wire(events[i].Kind) {
			nEvents++
		}
	}
	b = appendArrayLen(b, 3)
	b = appendFloat64(b, ts)
	b = appendArrayLen(b, nEvents)
	for i := range events {
		ev := &events[i]
		switch ev.Kind {
		case prefix.BlockStored:
			b = e.appendStored(b, ev)
		case prefix.BlockRemoved:
			b = e.appendRemoved(b, ev)
		case prefix.AllBlocksCleared, prefix.EventsLost:
			b = e.appendHead(b, "AllBlocksCleared", 0)
		default:
			continue
		}
		nBlocks += len(ev.Keys)
	}
	return appendInt(b, int64(e.rank)), nEvents, nBlocks
}

// wire reports whether events of kind k go out.
func wire(k prefix.EventKind) bool {
	return k == prefix.BlockStored || k == prefix.BlockRemoved || k == prefix.AllBlocksCleared || k == prefix.EventsLost
}

// appendHead opens an event of n fields besides its tag: a map {"type": tag, ...} or an array
// [tag, ...].
func (e *encoder) appendHead(b []byte, tag string, n int) []byte {
	if e.maps {
		return appendStr(appendStr(appendMapLen(b, n+1), "type"), tag)
	}
	return appendStr(appendArrayLen(b, n+1), tag)
}

// appendField appends a field's name in the map encoding (the array encoding has positions).
func (e *encoder) appendField(b []byte, name string) []byte {
	if e.maps {
		return appendStr(b, name)
	}
	return b
}

// appendStored appends a BlockStored event. Its fields are vLLM's, in vLLM's order;
// extra_keys, group_idx, kv_cache_spec_kind and kv_cache_spec_sliding_window are sent only when
// set (msgspec's omit_defaults: each one in a map, the trailing ones in an array).
func (e *encoder) appendStored(b []byte, ev *prefix.Event) []byte {
	kind, window := ev.GroupKind != "", ev.SlidingWindow > 0
	n := 7 // block_hashes ... lora_name
	if e.maps {
		n += int(b2i(ev.HasGroup) + b2i(kind) + b2i(window))
	} else {
		switch {
		case window:
			n += 4 // extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window
		case kind:
			n += 3
		case ev.HasGroup:
			n += 2
		}
	}
	b = e.appendHead(b, "BlockStored", n)
	b = e.appendHashes(e.appendField(b, "block_hashes"), ev.Keys)
	b = e.appendField(b, "parent_block_hash")
	if ev.ParentIsRoot {
		b = appendNil(b)
	} else {
		b = e.appendHash(b, ev.Parent)
	}
	b = appendTokens(e.appendField(b, "token_ids"), ev.Tokens)
	b = appendInt(e.appendField(b, "block_size"), int64(ev.BlockSize))
	b = e.appendField(b, "lora_id")
	if ev.Adapter == 0 {
		b = appendNil(b)
	} else {
		b = appendUint(b, ev.Adapter)
	}
	b = e.appendMedium(b, ev.Medium)
	b = e.appendField(b, "lora_name")
	if name, ok := e.names[ev.Adapter]; ok && ev.Adapter != 0 {
		b = appendStr(b, name)
	} else {
		b = appendNil(b)
	}
	if !e.maps && n > 7 {
		b = appendNil(b) // extra_keys
	}
	return e.appendGroup(b, ev, n > 8, n > 9, n > 10)
}

// appendRemoved appends a BlockRemoved event: block_hashes, medium, and group_idx when set.
func (e *encoder) appendRemoved(b []byte, ev *prefix.Event) []byte {
	b = e.appendHead(b, "BlockRemoved", 2+int(b2i(ev.HasGroup)))
	b = e.appendHashes(e.appendField(b, "block_hashes"), ev.Keys)
	b = e.appendMedium(b, ev.Medium)
	return e.appendGroup(b, ev, ev.HasGroup, false, false)
}

func (e *encoder) appendMedium(b []byte, medium string) []byte {
	b = e.appendField(b, "medium")
	if medium == "" {
		return appendNil(b)
	}
	return appendStr(b, medium)
}

// appendGroup appends the group fields: in a map those set, in an array those up to the last
// set (the caller says which positions are written), null where unset.
func (e *encoder) appendGroup(b []byte, ev *prefix.Event, idx, kind, window bool) []byte {
	if e.maps {
		idx, kind, window = ev.HasGroup, ev.GroupKind != "" && ev.Kind == prefix.BlockStored, ev.SlidingWindow > 0 && ev.Kind == prefix.BlockStored
	}
	if idx {
		b = e.appendField(b, "group_idx")
		if ev.HasGroup {
			b = appendInt(b, int64(ev.Group))
		} else {
			b = appendNil(b)
		}
	}
	if kind {
		b = e.appendField(b, "kv_cache_spec_kind")
		if ev.GroupKind != "" {
			b = appendStr(b, ev.GroupKind)
		} else {
			b = appendNil(b)
		}
	}
	if window {
		b = appendInt(e.appendField(b, "kv_cache_spec_sliding_window"), int64(ev.SlidingWindow))
	}
	return b
}

func b2i(v bool) uint8 {
	if v {
		return 1
	}
	return 0
}
