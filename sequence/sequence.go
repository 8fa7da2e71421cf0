// Package sequence holds per-sequence token and block state: how many tokens a sequence has
// and which KV blocks hold them, in order. It knows nothing of memory or devices; kvcache owns
// the Sequences and decides which blocks they get.
//
// No function or method panics on any argument, nil receivers included: a nil *Registry is an
// empty one that refuses additions, and arithmetic on counts never wraps.
//
// Concurrency: none of these types are safe for concurrent use; kvcache guards them with its
// lock.
package sequence

import (
	"fmt"
	"math"
	"math/bits"
	"unsafe"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/prefix"
)

// ID names a sequence. The runtime chooses it (a request id, say).
type ID uint64

// Sequence is one sequence's state. Blocks[i] holds tokens [i*BlockTokens, (i+1)*BlockTokens);
// len(Blocks) == BlocksFor(Tokens, BlockTokens) at all times.
//
// The prefix fields are kept for sequences whose token ids the manager knows (Keyed): IDs holds
// the id of every token, Keys the key of every full block that may be cached (every full block,
// or those written, when kvcache waits for MarkWritten), each chained from the previous one and
// the first from Root.
//
// A Sequence is 256 bytes, which the allocator places on a 64-byte boundary: the fields from ID
// to Tail share its first cache line, and the fast append path reads no other memory of it.
type Sequence struct {
	ID     ID
	Tokens int
	Blocks []Block

	// FastRoom is how many more tokens an append may add with no new block: they go into the
	// last block, which the sequence alone holds and which is not cached (a block that falls out
	// of reach meanwhile is dropped on the way, see NextDrop). kvcache sets it when an append
	// commits and zeroes it in every other operation that changes the sequence's blocks (a fork
	// shares its tail, a truncate or a swap moves it); 0 sends the next append down the path
	// that looks.
	FastRoom int
	// NextDrop is the length at which its next block falls out of reach (0: not computed yet),
	// so that the append path tests a length, not a division.
	NextDrop int

	// Swapped is set while the sequence's blocks are in the host tier. Host[i] is then where
	// block i waits there, and Blocks[i] is NullBlock; Host[i] is NoHost where Blocks[i] is a
	// device block the sequence kept (one it shares with sequences that stayed on the device),
	// or a block dropped before. Host is empty while the sequence is not swapped out: host
	// slots and device block ids never share a slice, nor a type.
	Swapped bool
	Keyed   bool // see below, with the prefix fields
	// Tail is the last of Blocks while FastRoom is positive, so that the fast path finds the
	// next token's slot in this cache line without reading Blocks. kvcache keeps it when it
	// moves the block (a compaction); with FastRoom 0 it means nothing.
	Tail    Block
	Host    []HostSlot
	IDs     []prefix.Token
	Keys    []prefix.Key
	Root    prefix.Key
	Adapter uint64
	Salt    string // the namespace's salt: a vLLM-keyed cache folds it into the first block's key

	// Written is how many of the first tokens have their K/V written, as the runtime reported
	// (kvcache's MarkWritten); a block becomes a prefix hit for others only once written, when
	// the manager is told to wait for it. Hit is what StartSequence found in the cache, until the
	// first append after it (which should not append those tokens again).
	Written int
	Hit     int

	// Dropped is one past the last block freed because the layers can no longer read it (a
	// sliding window's or an old chunk's); those blocks, after the sink tokens' blocks, are
	// NullBlock in Blocks.
	Dropped int

	_ [40]byte // to 256 bytes, a multiple of 64: the allocator keeps the first cache line whole
}

// Block is a device block's id in the arena of the group (the Manager) that holds the sequence:
// the id its attention kernels read in block tables. Each group numbers its own blocks, so an id
// means nothing outside its group's Manager. Host slots are another type (HostSlot); a page is
// another again (kvcache's arena.Page). Block is int32 underneath, as vLLM's and FlashInfer's
// tables are, so a row of Blocks is a table row as it is (Int32s).
type Block int32

// Int32s returns blocks as the int32 ids a block table holds: the same memory, not a copy. It
// is how a sequence's Blocks reach blocktable and kernels without a copy per step.
func Int32s(blocks []Block) []int32 {
	return unsafe.Slice((*int32)(unsafe.SliceData(blocks)), len(blocks))
}

// NullBlock stands in Blocks for a block that was freed because no layer reads it any more
// (out of a sliding window, or of an earlier chunk), or that waits on the host tier while the
// sequence is swapped out (Host): it keeps the block's position.
const NullBlock Block = -1

// HostSlot is a block of a manager's host tier (pinned host memory), where a swapped-out
// sequence's block waits: a type of its own, so that it is never taken for a device block id.
// kvcache numbers host slots after the arena's blocks, as the copy kernels address both.
type HostSlot int32

// NoHost stands in Host for a block that is not on the host tier.
const NoHost HostSlot = -1

// ResetPrefix forgets the sequence's ids and keys (keeping their storage): it is no longer
// keyed.
func (s *Sequence) ResetPrefix() {
	if s == nil {
		return
	}
	s.Keyed, s.IDs, s.Keys, s.Root, s.Adapter, s.Salt = false, s.IDs[:0], s.Keys[:0], prefix.Key{}, 0, ""
}

// BlocksFor returns how many blocks of blockTokens tokens hold n tokens: ceil(n/blockTokens),
// computed without overflow for any n. It is 0 when n or blockTokens is not positive.
func BlocksFor(n, blockTokens int) int {
	if n <= 0 || blockTokens <= 0 {
		return 0
	}
	if n <= blockTokens { // a decode step's block: no division
		return 1
	}
	q := n / blockTokens
	if n%blockTokens != 0 {
		q++
	}
	return q
}

// TailRoom returns how many more tokens fit in the sequence's last block (0 for a nil
// sequence). For a sequence kvcache keeps, len(Blocks) == BlocksFor(Tokens, blockTokens), so
// the result lies in [0, blockTokens). For any other arguments it is 0 when the blocks hold
// no more than Tokens (blockTokens not positive, say), and at most MaxInt: it never wraps.
func (s *Sequence) TailRoom(blockTokens int) int {
	if s == nil || blockTokens <= 0 {
		return 0
	}
	hi, held := bits.Mul64(uint64(len(s.Blocks)), uint64(blockTokens))
	room := held - uint64(s.Tokens) // exact unless it wrapped, which the cases below catch
	switch {
	case hi == 0 && s.Tokens >= 0 && held <= uint64(s.Tokens):
		return 0
	case hi != 0 || s.Tokens < 0 && room < held || room > math.MaxInt:
		return math.MaxInt
	}
	return int(room)
}

// Registry maps IDs to Sequences and recycles Sequence values and their block slices, so that
// adding and removing sequences in steady state allocates nothing.
//
// In front of the map sits a small direct-mapped cache of recently used sequences: a runtime
// works on a batch of a few hundred sequences at a time, and with 100,000 live ones a map lookup
// is a cache miss or two (half the time of a table export), while the cache answers with one
// load. Every hit is checked against the sequence's ID, and a removed sequence is never left in
// the cache, so a miss only costs the map lookup it would have cost anyway.
type Registry struct {
	m     map[ID]*Sequence
	free  []*Sequence
	cache [1 << cacheBits]*Sequence
}

const cacheBits = 12

func cacheSlot(id ID) uint { return uint((uint64(id) * 0x9e3779b97f4a7c15) >> (64 - cacheBits)) }

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{m: make(map[ID]*Sequence)} }

// Get returns the sequence with the given id.
func (r *Registry) Get(id ID) (*Sequence, bool) {
	if r == nil {
		return nil, false
	}
	slot := cacheSlot(id)
	if s := r.cache[slot]; s != nil && s.ID == id {
		return s, true
	}
	s, ok := r.m[id]
	if ok {
		r.cache[slot] = s
	}
	return s, ok
}

// Add creates an empty sequence. An id that is present already gets an error matching
// ErrSequenceExists (errdefs), and nothing changes.
func (r *Registry) Add(id ID) (*Sequence, error) {
	if r == nil || r.m == nil {
		return nil, fmt.Errorf("sequence: add %d: %w: nil registry (use NewRegistry)", id, errdefs.ErrInvalidArgument)
	}
	if _, ok := r.Get(id); ok {
		return nil, fmt.Errorf("sequence: add %d: %w", id, errdefs.ErrSequenceExists)
	}
	var s *Sequence
	if n := len(r.free); n > 0 {
		s = r.free[n-1]
		r.free = r.free[:n-1]
	} else {
		s = &Sequence{}
	}
	s.ID, s.Tokens, s.Blocks, s.Swapped, s.Host, s.Written, s.Hit, s.Dropped, s.NextDrop, s.FastRoom = id, 0, s.Blocks[:0], false, s.Host[:0], 0, 0, 0, 0, 0
	s.ResetPrefix()
	r.m[id] = s
	r.cache[cacheSlot(id)] = s
	return s, nil
}

// Remove forgets the sequence and keeps its storage for reuse; the caller must not use s after.
// It reports false, changing nothing, when s is not a sequence of this registry.
func (r *Registry) Remove(s *Sequence) bool {
	if r == nil || s == nil || r.m[s.ID] != s {
		return false
	}
	if slot := cacheSlot(s.ID); r.cache[slot] == s {
		r.cache[slot] = nil
	}
	delete(r.m, s.ID)
	s.Tokens, s.Blocks, s.Host, s.FastRoom = 0, s.Blocks[:0], s.Host[:0], 0
	s.ResetPrefix()
	r.free = append(r.free, s)
	return true
}

// Len returns the number of sequences.
func (r *Registry) Len() int {
	if r == nil {
		return 0
	}
	return len(r.m)
}

// All calls fn for every sequence, in no particular order, until fn returns false. A nil fn
// is a no-op.
func (r *Registry) All(fn func(*Sequence) bool) {
	if r == nil || fn == nil {
		return
	}
	for _, s := range r.m {
		if !fn(s) {
			return
		}
	}
}
