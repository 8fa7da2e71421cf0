package kvcache_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/internal/testutil/gputest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// refModel is the naive reference: a map of sequences to their token values and abstract block
// lists, with no pages, no memory and no cleverness. Block ids are its own; the check is that a
// one-to-one correspondence with the manager's ids exists.
//
// The prefix cache: a keyed sequence knows its token ids; when one of its blocks fills, the
// model computes the block's key and caches the block under it unless the key is cached
// already. A cached block no sequence holds is idle and stays, until the manager says (by its
// events) that it was evicted: which block to evict is the manager's policy, what follows from
// it is checked. A token's value is a hash of its namespace and every id up to it, so a block
// shared by a wrong prefix hit reads wrong values.
type refModel struct {
	bt         int
	seqs       map[kvcache.SeqID]*refSeq
	refs       map[int]int         // held blocks: their holders
	host       map[int]int         // host-tier blocks: their holders (swapped sequences)
	hostCached map[prefix.Key]bool // keys the host prefix cache holds (as its events say)
	idle       map[int]bool        // cached blocks nobody holds
	cached     map[prefix.Key]int  // key -> block
	keyOf      map[int]prefix.Key  // block -> key, for cached blocks
	stored     []prefix.Key        // keys cached since the events were last checked
	nextID     int
	hasher     prefix.Hasher
	waitWrites bool // Config.WaitForWrites: blocks are keyed only up to a sequence's mark
	// A sliding window (and sink tokens) or chunks: blocks out of reach are dropped (-1).
	window, sinks, chunk int
	outOfReach           int // blocks dropped so far
}

// reachFrom returns the first position the next token at length t reads, beside the sinks.
func (r *refModel) reachFrom(t int) int {
	switch {
	case r.window > 0:
		return max(0, t+1-r.window)
	case r.chunk > 0:
		return t / r.chunk * r.chunk
	}
	return 0
}

// sinkBlocks are the leading blocks of the sink tokens, never dropped.
func (r *refModel) sinkBlocks() int { return (r.sinks + r.bt - 1) / r.bt }

// dropReach drops the blocks of s that the next token, at length t, no longer reads.
func (r *refModel) dropReach(s *refSeq, t int) {
	if r.window == 0 && r.chunk == 0 {
		return
	}
	end := min(r.reachFrom(t)/r.bt, len(s.blocks))
	for i := max(s.dropped, r.sinkBlocks()); i < end; i++ {
		if s.blocks[i] >= 0 {
			r.drop(s.blocks[i])
			s.blocks[i] = -1
			r.outOfReach++
		}
	}
	s.dropped = max(s.dropped, end)
}

// minLength is the shortest length s may be truncated to: its next token reads nothing dropped.
func (r *refModel) minLength(s *refSeq) int {
	if s.dropped <= r.sinkBlocks() {
		return 0
	}
	first := s.dropped * r.bt
	if r.window > 0 {
		return first + r.window - 1
	}
	return (first + r.chunk - 1) / r.chunk * r.chunk
}

type refSeq struct {
	tokens  []uint64 // the value written for each token
	blocks  []int
	swapped bool
	keyed   bool
	root    prefix.Key
	ids     []prefix.Token // when keyed
	keys    []prefix.Key   // keys of its full blocks (the written ones, under waitWrites), when keyed
	written int            // the tokens MarkWritten reported, and those found cached
	dropped int            // blocks [sinkBlocks, dropped) are out of reach: -1
}

func newRef(bt int) *refModel {
	return &refModel{bt: bt, seqs: map[kvcache.SeqID]*refSeq{}, refs: map[int]int{}, host: map[int]int{}, hostCached: map[prefix.Key]bool{}, idle: map[int]bool{},
		cached: map[prefix.Key]int{}, keyOf: map[int]prefix.Key{}}
}

func (r *refModel) newBlock() int { r.nextID++; r.refs[r.nextID] = 1; return r.nextID }

// value is the K/V a keyed token holds: a hash of its root and of every id up to it, chained
// from the value of the token before it (0 for the first).
func value(root prefix.Key, prev uint64, pos int, id prefix.Token) uint64 {
	x := prev ^ binary.LittleEndian.Uint64(root[:8]) ^ uint64(pos)<<40 ^ uint64(uint32(id))*0x9e3779b97f4a7c15
	x ^= x >> 31
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 29
	return x | 1 // never 0, so an unwritten slot never matches
}

// appendVals adds tokens with the given values (count-only appends: the sequence is no longer
// keyed) or, keyed, ids whose values follow from the chain.
func (r *refModel) append(id kvcache.SeqID, vals []uint64, ids []prefix.Token, root prefix.Key) {
	s, ok := r.seqs[id]
	if !ok {
		s = &refSeq{keyed: ids != nil, root: root}
		r.seqs[id] = s
	}
	if ids != nil && !s.keyed && len(s.tokens) == 0 { // an empty sequence is keyed by its first ids
		s.keyed = true
		if s.root == (prefix.Key{}) { // else the namespace it had before it took tokens without ids
			s.root = root
		}
	}
	n := len(vals) + len(ids)
	if n > 0 && len(s.tokens)%r.bt != 0 && r.refs[s.blocks[len(s.blocks)-1]] > 1 {
		old := s.blocks[len(s.blocks)-1]
		r.refs[old]--
		s.blocks[len(s.blocks)-1] = r.newBlock()
	}
	for len(s.blocks)*r.bt < len(s.tokens)+n {
		s.blocks = append(s.blocks, r.newBlock())
	}
	r.dropReach(s, len(s.tokens))
	if n == 0 {
		return
	}
	if ids == nil { // tokens without ids: the sequence is keyed no more
		s.keyed, s.ids, s.keys = false, nil, nil
		s.tokens = append(s.tokens, vals...)
	} else {
		for _, x := range ids {
			prev := uint64(0)
			if len(s.tokens) > 0 {
				prev = s.tokens[len(s.tokens)-1]
			}
			s.tokens = append(s.tokens, value(s.root, prev, len(s.tokens), x))
			s.ids = append(s.ids, x)
		}
	}
	r.store(s)
}

// store keys the keyed sequence's newly full blocks and caches those whose keys are new.
func (r *refModel) store(s *refSeq) {
	if !s.keyed {
		return
	}
	limit := len(s.tokens)
	if r.waitWrites {
		limit = min(limit, s.written)
	}
	for len(s.keys) < limit/r.bt {
		i := len(s.keys)
		parent := s.root
		if i > 0 {
			parent = s.keys[i-1]
		}
		k := r.hasher.Next(parent, s.ids[i*r.bt:(i+1)*r.bt])
		s.keys = append(s.keys, k)
		b := s.blocks[i]
		if _, has := r.keyOf[b]; has || b < 0 {
			continue
		}
		if _, dup := r.cached[k]; dup {
			continue
		}
		r.cached[k], r.keyOf[b] = b, k
		r.stored = append(r.stored, k)
	}
}

// start is StartSequence: the longest cached prefix of whole blocks, at most len-1 tokens.
func (r *refModel) start(id kvcache.SeqID, root prefix.Key, prompt []prefix.Token) int {
	s := &refSeq{keyed: true, root: root}
	r.seqs[id] = s
	parent := root
	for i := 0; len(prompt) > 0 && i < (len(prompt)-1)/r.bt; i++ {
		k := r.hasher.Next(parent, prompt[i*r.bt:(i+1)*r.bt])
		b, ok := r.cached[k]
		if !ok {
			break
		}
		if r.idle[b] {
			delete(r.idle, b)
			r.refs[b] = 1
		} else {
			r.refs[b]++
		}
		s.blocks = append(s.blocks, b)
		s.keys = append(s.keys, k)
		for j := i * r.bt; j < (i+1)*r.bt; j++ {
			prev := uint64(0)
			if j > 0 {
				prev = s.tokens[j-1]
			}
			s.tokens = append(s.tokens, value(root, prev, j, prompt[j]))
			s.ids = append(s.ids, prompt[j])
		}
		parent = k
	}
	return len(s.tokens)
}

func (r *refModel) free(id kvcache.SeqID) {
	for _, b := range r.seqs[id].blocks {
		if b < 0 {
			continue
		}
		if _, ok := r.host[b]; ok {
			if r.host[b]--; r.host[b] == 0 {
				delete(r.host, b)
			}
			continue
		}
		r.drop(b)
	}
	delete(r.seqs, id)
}

// holders counts the references of each block among the sequences.
func (r *refModel) holders(ids []kvcache.SeqID) map[int]int {
	count := map[int]int{}
	for _, id := range ids {
		for _, b := range r.seqs[id].blocks {
			count[b]++
		}
	}
	return count
}

// hostFree returns the host tier's free blocks.
func (r *refModel) hostFree(capacity int) int { return capacity - len(r.host) }

// swapOut moves the sequences ids to the host: each of their blocks that no sequence on the
// device holds gets a new host block, shared as it was among them and with the sequences out
// already that kept it; a block a sequence on the device holds stays, held by them all.
func (r *refModel) swapOut(ids []kvcache.SeqID) {
	count, moves := r.leaving(ids), map[int]int{}
	for b, c := range count {
		r.nextID++
		moves[b], r.host[r.nextID] = r.nextID, c
	}
	for _, s := range r.seqs {
		for i, b := range s.blocks {
			if h, ok := moves[b]; ok {
				s.blocks[i] = h
				r.drop(b) // a cached block goes idle
			}
		}
	}
	for _, id := range ids {
		r.seqs[id].swapped = true
	}
}

// leaving returns the device blocks of the sequences ids that swapping them out moves to the
// host: those whose every holder is swapped out, with their holders' count.
func (r *refModel) leaving(ids []kvcache.SeqID) map[int]int {
	count := r.holders(ids)
	for id, s := range r.seqs {
		if !s.swapped || slices.Contains(ids, id) {
			continue
		}
		for _, b := range s.blocks {
			if _, ok := count[b]; ok {
				count[b]++
			}
		}
	}
	for b, c := range count {
		if _, on := r.refs[b]; !on || r.refs[b] != c {
			delete(count, b) // a host block, or one a sequence on the device holds
		}
	}
	return count
}

// swapIn brings the sequences' host blocks back: each host block, in the order the sequences
// and their blocks come, is found in the device's cache when its first holder is keyed and its
// key is cached there, else copied into a new device block.
func (r *refModel) swapIn(ids []kvcache.SeqID) {
	to := map[int]int{}
	for _, id := range ids {
		s := r.seqs[id]
		for i, b := range s.blocks {
			if _, out := r.host[b]; !out {
				continue
			}
			d, ok := to[b]
			if !ok {
				if d, ok = r.cached[r.keyAt(s, i)]; !ok {
					r.nextID++
					d = r.nextID
				}
				to[b] = d
			}
			if r.idle[d] {
				delete(r.idle, d)
			}
			r.refs[d]++
			s.blocks[i] = d
			if r.host[b]--; r.host[b] == 0 {
				delete(r.host, b)
			}
		}
		s.swapped = false
	}
}

// keyAt returns the key of keyed s's full block i, or the zero key.
func (r *refModel) keyAt(s *refSeq, i int) prefix.Key {
	if !s.keyed || i >= len(s.keys) {
		return prefix.Key{}
	}
	return s.keys[i]
}

// moving returns how many blocks swapping ids out copies.
func (r *refModel) moving(ids []kvcache.SeqID) int { return len(r.leaving(ids)) }

// drop releases a reference: a cached block goes idle, another is gone.
func (r *refModel) drop(b int) {
	r.refs[b]--
	if r.refs[b] == 0 {
		delete(r.refs, b)
		if _, ok := r.keyOf[b]; ok {
			r.idle[b] = true
		}
	}
}

// hostHits returns how many blocks of prompt after sequence id's device hit the host cache
// holds in a row (none the device holds): what StartSequence fetches when the device has room.
func (r *refModel) hostHits(id kvcache.SeqID, prompt []prefix.Token) int {
	s := r.seqs[id]
	parent := s.root
	if len(s.keys) > 0 {
		parent = s.keys[len(s.keys)-1]
	}
	n := 0
	for i := len(s.keys); len(prompt) > 0 && i < (len(prompt)-1)/r.bt; i++ {
		k := r.hasher.Next(parent, prompt[i*r.bt:(i+1)*r.bt])
		if _, on := r.cached[k]; on || !r.hostCached[k] {
			break
		}
		n++
		parent = k
	}
	return n
}

// fetch appends to started sequence id the n blocks of prompt the host cache gave: new device
// blocks, cached under their keys.
func (r *refModel) fetch(id kvcache.SeqID, prompt []prefix.Token, n int) {
	s := r.seqs[id]
	for range n {
		i := len(s.keys)
		parent := s.root
		if i > 0 {
			parent = s.keys[i-1]
		}
		k := r.hasher.Next(parent, prompt[i*r.bt:(i+1)*r.bt])
		b := r.newBlock()
		s.blocks, s.keys = append(s.blocks, b), append(s.keys, k)
		r.cached[k], r.keyOf[b] = b, k
		r.stored = append(r.stored, k)
		for j := i * r.bt; j < (i+1)*r.bt; j++ {
			prev := uint64(0)
			if j > 0 {
				prev = s.tokens[j-1]
			}
			s.tokens = append(s.tokens, value(s.root, prev, j, prompt[j]))
			s.ids = append(s.ids, prompt[j])
		}
	}
}

// removed applies a BlockRemoved key: an idle block is gone, a held one is no longer cached.
func (r *refModel) removed(t testing.TB, k prefix.Key) {
	b, ok := r.cached[k]
	require.True(t, ok, "BlockRemoved for a key that is not cached")
	delete(r.cached, k)
	delete(r.keyOf, b)
	delete(r.idle, b)
}

func (r *refModel) fork(src, dst kvcache.SeqID) {
	s := r.seqs[src]
	d := &refSeq{tokens: append([]uint64(nil), s.tokens...), blocks: append([]int(nil), s.blocks...), written: s.written, dropped: s.dropped,
		keyed: s.keyed, root: s.root, ids: append([]prefix.Token(nil), s.ids...), keys: append([]prefix.Key(nil), s.keys...)}
	for _, b := range d.blocks {
		if b >= 0 {
			r.refs[b]++
		}
	}
	r.seqs[dst] = d
}

func (r *refModel) truncate(id kvcache.SeqID, n int) {
	s := r.seqs[id]
	s.tokens = s.tokens[:len(s.tokens)-n]
	s.written = min(s.written, len(s.tokens))
	keep := (len(s.tokens) + r.bt - 1) / r.bt
	for _, b := range s.blocks[keep:] {
		r.drop(b)
	}
	s.blocks = s.blocks[:keep]
	if s.keyed {
		s.ids = s.ids[:len(s.tokens)]
		s.keys = s.keys[:min(len(s.keys), len(s.tokens)/r.bt)]
	}
}

// markWritten is MarkWritten: the mark moves forward, and newly written full blocks are keyed.
func (r *refModel) markWritten(id kvcache.SeqID, n int) {
	s := r.seqs[id]
	s.written = max(s.written, n)
	r.store(s)
}

// harness drives a manager and the reference with the same operations and checks them against
// each other after every step.
type harness struct {
	t       testing.TB
	m       *kvcache.Manager
	dev     vmm.Device
	ref     *refModel
	cfg     kvcache.Config
	nextVal uint64
	slots   []int64
	ooms    int
	hits    int
	forks   int    // forks that succeeded
	kept    int    // blocks swap-outs kept on the device
	found   int    // blocks swap-ins found in the device's cache
	static  bool   // the manager is static: every page stays mapped
	free0   uint64 // the devices' free memory before the manager mapped anything
	shards  []kvcache.Shard
	sub     *prefix.Subscription
	events  []prefix.Event
	table   *blocktable.VLLM
	// noMemCheck skips comparing mapped bytes with the devices' free memory (managers that share
	// their devices).
	noMemCheck bool
}

// shape is the part of Stats that is state, not history.
func shape(s kvcache.Stats) kvcache.Stats {
	s.SyncMaps, s.BackgroundMaps, s.Unmaps, s.CopyOnWrites, s.ReserveErr = 0, 0, 0, 0, nil
	s.Compactions, s.BlocksMoved = 0, 0
	s.Prefix.QueryTokens, s.Prefix.HitTokens, s.Prefix.HitRate, s.Prefix.Stored, s.Prefix.Evictions = 0, 0, 0, 0, 0
	return s
}

func newHarness(t testing.TB, dev vmm.Device, cfg kvcache.Config) *harness {
	free0, _, err := dev.MemInfo()
	require.NoError(t, err)
	m := newManager(t, dev, cfg)
	return newHarnessOn(t, dev, m, false, free0)
}

// newMultiHarness drives a manager over several devices.
func newMultiHarness(t testing.TB, devs []vmm.Device, cfg kvcache.Config, split kvcache.Split) *harness {
	free0 := freeOf(t, devs)
	m, err := kvcache.NewMulti(devs, cfg, split)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return newHarnessOn(t, devs[0], m, false, free0)
}

// freeOf returns the free memory of the devices together.
func freeOf(t testing.TB, devs []vmm.Device) uint64 {
	total := uint64(0)
	for _, d := range devs {
		free, _, err := d.MemInfo()
		require.NoError(t, err)
		total += free
	}
	return total
}

// devices returns the manager's devices.
func (h *harness) devices() []vmm.Device {
	var devs []vmm.Device
	for _, s := range h.shards {
		devs = append(devs, s.Device)
	}
	return devs
}

func newHarnessOn(t testing.TB, dev vmm.Device, m *kvcache.Manager, static bool, free0 uint64) *harness {
	sub, err := m.Subscribe(1 << 20)
	require.NoError(t, err)
	ref := newRef(m.Config().BlockTokens)
	c := m.Config()
	ref.waitWrites, ref.window, ref.sinks, ref.chunk = c.WaitForWrites, c.Window, c.Sinks, c.Chunk
	return &harness{t: t, m: m, dev: dev, ref: ref, cfg: m.Config(), free0: free0, static: static, sub: sub,
		shards: m.Shards()}
}

// tokenAddrs are where the test writes a token's value, on every device's share: its first
// layer's K and its last layer's V, at the token's offset in its block.
func (h *harness) tokenAddrs(slot int64, fn func(dev vmm.Device, a vmm.Addr)) {
	bt := int64(h.cfg.BlockTokens)
	b, off := int32(slot/bt), uint64(slot%bt)
	for _, s := range h.shards {
		at := vmm.Addr(off * s.Config.TokenBytes())
		fn(s.Device, s.BlockAddr(s.Layers[0], 0, b)+at)
		fn(s.Device, s.BlockAddr(s.Layers[1]-1, 1, b)+at)
	}
}

// write stores each token's value at its slot, as the runtime's write_kv would.
func (h *harness) write(slots []int64, vals []uint64) {
	require.Len(h.t, slots, len(vals))
	var buf [8]byte
	for i, s := range slots {
		binary.LittleEndian.PutUint64(buf[:], vals[i])
		h.tokenAddrs(s, func(dev vmm.Device, a vmm.Addr) { require.NoError(h.t, dev.CopyIn(a, buf[:])) })
	}
}

// fresh returns n new unique values, for tokens appended without ids.
func (h *harness) fresh(n int) []uint64 {
	vals := make([]uint64, n)
	for i := range vals {
		h.nextVal++
		vals[i] = h.nextVal
	}
	return vals
}

// removals reads the manager's events and applies those that take blocks out of the cache
// (they come, within one call, before any that store blocks); it keeps the BlockStored events
// for stores.
func (h *harness) removals() {
	h.events = h.sub.Read(h.events)
	kept := h.events[:0]
	for _, e := range h.events {
		switch {
		case e.Medium == prefix.MediumCPU: // the host cache
			require.True(h.t, h.cfg.HostPrefixCache, "a host cache event without a host cache")
			switch e.Kind {
			case prefix.BlockStored: // a write-back of a freed sequence's cached blocks (idle, or still shared)
				for _, k := range e.Keys {
					_, ok := h.ref.cached[k]
					require.True(h.t, ok, "a write-back of a block not in the device cache")
					require.False(h.t, h.ref.hostCached[k], "a write-back of a block the host holds")
					h.ref.hostCached[k] = true
				}
			case prefix.BlockRemoved:
				for _, k := range e.Keys {
					require.True(h.t, h.ref.hostCached[k], "a host BlockRemoved for a key the host does not hold")
					delete(h.ref.hostCached, k)
				}
			case prefix.AllBlocksCleared:
				clear(h.ref.hostCached)
			default:
				h.t.Fatalf("host cache event %v", e.Kind)
			}
		case e.Kind == prefix.BlockRemoved:
			require.Equal(h.t, prefix.MediumGPU, e.Medium)
			for _, k := range e.Keys {
				h.ref.removed(h.t, k)
			}
		case e.Kind == prefix.AllBlocksCleared:
			for b := range h.ref.idle {
				delete(h.ref.idle, b)
			}
			clear(h.ref.cached)
			clear(h.ref.keyOf)
		case e.Kind == prefix.EventsLost:
			h.t.Fatalf("events lost: %d", e.Lost)
		default:
			kept = append(kept, e)
		}
	}
	h.events = kept
}

// stores checks that the BlockStored events announce exactly the blocks the reference cached,
// in order, each key the hash of its parent and its tokens.
func (h *harness) stores() {
	var x prefix.Hasher
	for _, e := range h.events {
		require.Equal(h.t, prefix.BlockStored, e.Kind)
		require.Len(h.t, e.Tokens, len(e.Keys)*h.cfg.BlockTokens)
		require.Equal(h.t, h.cfg.BlockTokens, e.BlockSize)
		parent := e.Parent
		for i, k := range e.Keys {
			require.Equal(h.t, x.Next(parent, e.Tokens[i*e.BlockSize:(i+1)*e.BlockSize]), k, "BlockStored key %d is the hash of its parent and tokens", i)
			require.NotEmpty(h.t, h.ref.stored, "BlockStored for a block the reference did not cache")
			require.Equal(h.t, h.ref.stored[0], k)
			h.ref.stored = h.ref.stored[1:]
			parent = k
		}
	}
	require.Empty(h.t, h.ref.stored, "blocks cached without a BlockStored event")
	h.events = h.events[:0]
}

func isExpected(err error) bool {
	return errors.Is(err, kvcache.ErrUnknownSequence) || errors.Is(err, kvcache.ErrSequenceExists) ||
		errors.Is(err, kvcache.ErrInvalidArgument) || errors.Is(err, kvcache.ErrTooLarge) ||
		errors.Is(err, kvcache.ErrSwapped) || errors.Is(err, kvcache.ErrNotSupported)
}

// arg is a step's count: small (a byte, as most steps use) or wide (any int64, drawn from the
// whole range: negative, huge, MinInt, MaxInt).
type arg struct {
	n    byte
	wide int64
	full bool
}

// count returns a count of op's usual range from the byte, or the wide value.
func (x arg) count(mod int) int {
	if x.full {
		return int(x.wide)
	}
	return int(x.n) % mod
}

// tooLarge reports whether appending cnt tokens to seq can never succeed, by the reference:
// more than a call may append, a sequence longer than MaxSequenceTokens, or more blocks than
// the arena has.
func (h *harness) tooLarge(seq kvcache.SeqID, cnt int) bool {
	bt := h.cfg.BlockTokens
	tokens, blocks, cow := 0, 0, 0
	if s, ok := h.ref.seqs[seq]; ok {
		tokens, blocks = len(s.tokens), len(s.blocks)
		if room := blocks*bt - tokens; room > 0 && cnt > 0 && h.ref.refs[s.blocks[blocks-1]] > 1 {
			cow = 1
		}
	}
	room := blocks*bt - tokens
	need := cow
	if cnt > room {
		need += (cnt - room + bt - 1) / bt
	}
	arenaBlocks := int(h.cfg.Capacity/h.cfg.PageSize) * h.m.Stats().BlocksPerPage
	return cnt > blocktable.MaxSlots || cnt > kvcache.MaxSequenceTokens-tokens || need > arenaBlocks
}

// prompt returns a prompt of family fam: a shared head (a system prompt) and a tail that
// depends on seed, so that prompts share prefixes of every length.
func prompt(fam, length int, seed byte) []prefix.Token {
	p := make([]prefix.Token, length)
	for i := range p {
		if i < 6+4*fam {
			p[i] = prefix.Token(100*fam + i)
		} else {
			p[i] = prefix.Token(int(seed)%3 + i%2)
		}
	}
	return p
}

// checkAppend checks an append's error against the reference: a negative count is invalid, a
// swapped-out sequence takes none, a count that can never fit is too large, any other failure
// is out of memory.
func (h *harness) checkAppend(err error, seq kvcache.SeqID, cnt int) {
	t := h.t
	switch s, ok := h.ref.seqs[seq]; {
	case cnt < 0:
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument, "append %d", cnt)
	case ok && s.swapped: // whatever the count: the sequence takes none until swapped in
		require.ErrorIs(t, err, kvcache.ErrSwapped, "append to swapped-out %d", seq)
	case h.tooLarge(seq, cnt):
		require.ErrorIs(t, err, kvcache.ErrTooLarge, "append %d to %d can never fit", cnt, seq)
		require.NotErrorIs(t, err, kvcache.ErrOutOfMemory)
	case err != nil:
		require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "append %d to %d", cnt, seq)
		require.NotErrorIs(t, err, kvcache.ErrTooLarge, "append %d to %d fits the arena", cnt, seq)
	}
}

// start starts seq with prompt p in namespace ns (giving the keys of half its blocks when
// withKeys) and appends the rest of the prompt, checking the hit against the reference and
// writing the values of the tokens appended. A start whose append runs out of memory leaves
// the started sequence, as a runtime would see it.
func (h *harness) start(seq kvcache.SeqID, ns prefix.Namespace, p []prefix.Token, withKeys bool) {
	t := h.t
	var keys []prefix.Key
	if withKeys { // the keys precomputed, for some of the blocks
		keys = prefix.Keys(nil, ns, h.cfg.BlockTokens, p)
		keys = keys[:len(keys)/2]
	}
	failures := h.m.Stats().Prefix.HostFailures
	hit, err := h.m.StartSequence(seq, kvcache.Prompt{Tokens: p, Namespace: ns, Keys: keys})
	require.NoError(t, err)
	root := prefix.Root(ns, h.cfg.BlockTokens)
	onDevice := h.ref.start(seq, root, p)
	onHost := h.ref.hostHits(seq, p)
	if hit != onDevice { // the host cache's blocks follow, unless the device had no room
		require.Equal(t, onDevice+onHost*h.cfg.BlockTokens, hit, "cached prefix of a %d-token prompt, %d blocks of it on the host", len(p), onHost)
		h.ref.fetch(seq, p, onHost)
	}
	h.ref.seqs[seq].written = hit
	h.ref.dropReach(h.ref.seqs[seq], hit)
	require.Equal(t, failures, h.m.Stats().Prefix.HostFailures, "no fetch fails on a working device")
	h.hits += hit
	rest := p[hit:]
	h.slots, err = h.m.AppendTokenIDs(seq, rest, h.slots[:0])
	h.checkAppend(err, seq, len(rest))
	h.removals()
	if err == nil {
		h.ref.append(seq, nil, rest, root)
		h.write(h.slots, h.ref.seqs[seq].tokens[hit:])
	} else {
		h.ooms++
	}
	h.stores()
	h.check()
}

// The operations of a step.
const (
	opAppend = iota
	opDecode
	opFork
	opTruncate
	opFree
	opSettle
	opCompact
	opStart
	opAppendIDs
	opDropCache
	opSwapOut
	opSwapIn
	opMarkWritten
	numOps
)

// step applies one operation. A failed operation must leave the manager as it was, which
// check then confirms against the unchanged reference.
func (h *harness) step(op, a, b byte, x arg) {
	t := h.t
	seq, other := kvcache.SeqID(a%8), kvcache.SeqID(b%8)
	rs, exists := h.ref.seqs[seq]
	before := shape(h.m.Stats())
	n := x.n
	var err error
	kind := int(op) % numOps
	if kind == opDropCache && n%8 != 0 { // dropping the cache is rare; starting prompts is not
		kind = opStart
	}
	switch kind {
	case opAppend, opDecode: // append n tokens (prefill) or 1 (decode), without ids
		cnt := x.count(23)
		if kind == opDecode && !x.full {
			cnt = 1
		}
		if n == 255 && !x.full {
			cnt = -1
		}
		h.slots, err = h.m.AppendTokens(seq, cnt, h.slots[:0])
		h.checkAppend(err, seq, cnt)
		h.removals()
		if err == nil {
			vals := h.fresh(cnt)
			h.write(h.slots, vals)
			h.ref.append(seq, vals, nil, prefix.Key{})
		}
	case opFork:
		err = h.m.Fork(seq, other)
		_, dstExists := h.ref.seqs[other]
		if exists && !dstExists && !rs.swapped {
			require.NoError(t, err)
			h.ref.fork(seq, other)
			h.forks++
		} else {
			require.Error(t, err)
		}
	case opTruncate:
		cnt := x.count(9)
		err = h.m.Truncate(seq, cnt)
		if exists && cnt >= 0 && cnt <= len(rs.tokens) && !rs.swapped && len(rs.tokens)-cnt >= h.ref.minLength(rs) {
			require.NoError(t, err)
			h.ref.truncate(seq, cnt)
		} else {
			require.Error(t, err)
		}
	case opFree:
		err = h.m.FreeSequence(seq)
		if exists {
			require.NoError(t, err)
			h.ref.free(seq)
		} else {
			require.ErrorIs(t, err, kvcache.ErrUnknownSequence)
		}
	case opSettle:
		require.NoError(t, h.m.Settle())
	case opCompact: // compact, with a budget of n blocks (0: none)
		budget := uint64(n%8) * h.cfg.BlockStride()
		if x.full {
			budget = uint64(x.wide)
		}
		res, err := h.m.Compact(kvcache.CompactOptions{MaxBytes: budget})
		require.NoError(t, err)
		st := h.m.Stats()
		switch {
		case budget > 0:
			require.LessOrEqual(t, res.BytesMoved, budget)
		case h.static:
			require.Equal(t, int(h.cfg.Capacity/h.cfg.PageSize), st.MappedPages)
		default:
			used := st.LiveBlocks + st.Prefix.IdleBlocks
			require.Equal(t, (used+st.BlocksPerPage-1)/st.BlocksPerPage, st.MappedPages-st.FreePages,
				"an unbounded compaction packs held and cached blocks densely")
			require.LessOrEqual(t, st.FreePages, h.cfg.ReservePages)
		}
	case opStart: // start a sequence with a prompt that shares a head with others
		ns := prefix.Namespace{}
		if a&0x40 != 0 {
			ns.Salt = "tenant"
		}
		if exists {
			p := prompt(int(b)%3, int(n)%40, n)
			_, err := h.m.StartSequence(seq, kvcache.Prompt{Tokens: p, Namespace: ns})
			require.ErrorIs(t, err, kvcache.ErrSequenceExists)
			break
		}
		h.start(seq, ns, prompt(int(b)%3, int(n)%40, n), n&0x80 != 0)
		return // a failed append after a start keeps the started sequence: not a failed step
	case opAppendIDs: // token ids from a small alphabet, so that blocks repeat across sequences
		ids := make([]prefix.Token, int(n)%9)
		for i := range ids {
			ids[i] = prefix.Token((int(n)>>4 + i) % 3)
		}
		h.slots, err = h.m.AppendTokenIDs(seq, ids, h.slots[:0])
		h.checkAppend(err, seq, len(ids))
		h.removals()
		if err == nil {
			if exists && !rs.keyed && len(rs.tokens) > 0 { // a sequence holding tokens without ids stays unkeyed
				vals := h.fresh(len(ids))
				h.write(h.slots, vals)
				h.ref.append(seq, vals, nil, prefix.Key{})
			} else {
				from := 0
				if exists {
					from = len(rs.tokens)
				}
				h.ref.append(seq, nil, ids, prefix.Root(prefix.Namespace{}, h.cfg.BlockTokens))
				h.write(h.slots, h.ref.seqs[seq].tokens[from:])
			}
		}
	case opDropCache:
		_, err = h.m.DropCache()
		require.NoError(t, err)
	case opMarkWritten: // a mark n tokens short of the sequence's end (or anywhere, wide)
		cnt := x.count(7)
		if !x.full && exists {
			cnt = len(rs.tokens) - cnt
		}
		err = h.m.MarkWritten(seq, cnt)
		switch {
		case !exists:
			require.ErrorIs(t, err, kvcache.ErrUnknownSequence)
		case rs.swapped:
			require.ErrorIs(t, err, kvcache.ErrSwapped)
		case cnt < 0 || cnt > len(rs.tokens):
			var ce *kvcache.CountError
			require.ErrorAs(t, err, &ce)
		default:
			require.NoError(t, err)
			h.ref.markWritten(seq, cnt)
		}
	case opSwapOut: // one sequence, or two (which may share blocks)
		ids := []kvcache.SeqID{seq}
		if other != seq && n%2 == 0 {
			ids = append(ids, other)
		}
		var sw *kvcache.Swap
		sw, err = h.m.SwapOut(ids, 0)
		ok := h.cfg.HostBlocks > 0
		for _, id := range ids {
			s, exists := h.ref.seqs[id]
			ok = ok && exists && !s.swapped
		}
		switch {
		case !ok:
			require.Error(t, err)
		case h.ref.moving(ids) > h.ref.hostFree(h.cfg.HostBlocks):
			require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "the host tier is full")
		default:
			require.NoError(t, err)
			require.NoError(t, sw.Wait())
			require.NoError(t, sw.Close())
			require.Equal(t, h.ref.moving(ids), sw.Blocks, "blocks copied out")
			h.kept += sw.Kept
			h.ref.swapOut(ids)
		}
	case opSwapIn:
		var sw *kvcache.Swap
		sw, err = h.m.SwapIn([]kvcache.SeqID{seq}, 0)
		if !exists || !rs.swapped || h.cfg.HostBlocks == 0 {
			require.Error(t, err)
		} else if err == nil {
			require.NoError(t, sw.Wait())
			require.NoError(t, sw.Close())
			h.found += sw.Kept
			h.ref.swapIn([]kvcache.SeqID{seq})
		} else {
			require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "swap in %d", seq)
		}
	}
	h.removals()
	h.stores()
	if err != nil {
		if errors.Is(err, kvcache.ErrOutOfMemory) {
			h.ooms++
		} else {
			require.True(t, isExpected(err), "unexpected error kind: %v", err)
		}
		require.Equal(t, before, shape(h.m.Stats()), "a failed %d changed the manager", kind)
	}
	h.check()
}

// check compares the manager with the reference: the same sequences with the same token counts
// and block counts, a one-to-one correspondence of block ids (so sharing is the same), the same
// cached and idle blocks, every token's value readable through the block table, and all the
// manager's invariants.
func (h *harness) check() {
	t := h.t
	require.NoError(t, h.m.Verify())
	st := h.m.Stats()
	if !h.static && !h.noMemCheck && !gputest.Sanitized() { // page accounting equals what the device reports
		free := freeOf(t, h.devices())
		require.Equal(t, st.MappedBytes+st.ScratchBytes, h.free0-free, "mapped pages against the devices' free memory")
	}
	require.Equal(t, len(h.ref.seqs), st.Sequences)
	require.Equal(t, len(h.ref.refs), st.LiveBlocks)
	require.Equal(t, len(h.ref.host)+len(h.ref.hostCached), st.HostBlocks-st.HostFreeBlocks, "host blocks held or cached")
	require.Equal(t, len(h.ref.hostCached), st.Prefix.HostCachedBlocks, "host cache")
	require.Equal(t, len(h.ref.host), st.HostSwappedBlocks, "host blocks swapped-out sequences hold")
	require.LessOrEqual(t, st.Prefix.HostCachedBlocks, h.cfg.HostBlocks-h.cfg.HostSwapBlocks, "the host cache stays out of the swap slots")
	require.Equal(t, len(h.ref.idle), st.Prefix.IdleBlocks, "idle cached blocks")
	require.Equal(t, len(h.ref.cached), st.Prefix.CachedBlocks, "cached blocks")
	toRef, toMgr := map[int32]int{}, map[int]int32{}
	ids := make([]kvcache.SeqID, 0, len(h.ref.seqs))
	for id := range h.ref.seqs {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	var blocks []int32
	for _, id := range ids {
		rs := h.ref.seqs[id]
		n, err := h.m.Len(id)
		require.NoError(t, err)
		require.Equal(t, len(rs.tokens), n, "sequence %d tokens", id)
		blocks, err = h.m.Blocks(id, blocks[:0])
		require.NoError(t, err)
		require.Len(t, blocks, len(rs.blocks), "sequence %d blocks", id)
		for i, b := range blocks {
			rb := rs.blocks[i]
			if b == kvcache.NullBlock || rb < 0 {
				require.Equal(t, rb < 0, b == kvcache.NullBlock, "block %d of sequence %d: dropped in one only", i, id)
				continue
			}
			if x, ok := toRef[b]; ok {
				require.Equal(t, rb, x, "block %d of sequence %d maps to two reference blocks", b, id)
			}
			if x, ok := toMgr[rb]; ok {
				require.Equal(t, b, x, "reference block %d of sequence %d maps to two blocks", rb, id)
			}
			toRef[b], toMgr[rb] = rb, b
		}
	}
	// Every token's value, read through the exported vLLM table as a kernel would (a sequence
	// swapped out is read after it comes back).
	rowBlocks := int(h.cfg.Capacity / h.cfg.BlockStride())
	for _, id := range ids { // a window's sequence spans more block places than it holds
		rowBlocks = max(rowBlocks, len(h.ref.seqs[id].blocks))
	}
	if h.table == nil || h.table.MaxSeqs < len(ids) || h.table.MaxBlocks < rowBlocks {
		h.table = devtest.VLLM(t, 8, rowBlocks, -1)
	}
	onDevice := ids[:0:0]
	for _, id := range ids {
		if !h.ref.seqs[id].swapped {
			onDevice = append(onDevice, id)
		}
	}
	ids = onDevice
	require.NoError(t, h.m.ExportVLLM(ids, h.table))
	bt := h.cfg.BlockTokens
	for row, id := range ids {
		rs := h.ref.seqs[id]
		require.EqualValues(t, len(rs.tokens), h.table.Lens()[row])
		line := h.table.Table()[row*h.table.MaxBlocks : (row+1)*h.table.MaxBlocks]
		for i, want := range rs.tokens {
			if line[i/bt] == kvcache.NullBlock {
				continue // out of reach: nothing reads it
			}
			slot := int64(line[i/bt])*int64(bt) + int64(i%bt)
			h.tokenAddrs(slot, func(dev vmm.Device, a vmm.Addr) {
				var buf [8]byte
				require.NoError(t, dev.CopyOut(buf[:], a))
				require.Equal(t, want, binary.LittleEndian.Uint64(buf[:]), "sequence %d token %d (slot %d) on %s at %#x",
					id, i, slot, dev.Info().Name, uint64(a))
			})
		}
	}
}

// FuzzManager drives random AppendTokens/Fork/Truncate/FreeSequence/Settle sequences against the
// manager and the reference, checking both and every invariant after each step. The arena is
// small (64 pages of 4 blocks), so out-of-memory and page crossings happen often.
func FuzzManager(f *testing.F) {
	f.Add([]byte{0, 1, 0, 20, 1, 1, 0, 0, 2, 1, 2, 0, 1, 2, 0, 0, 1, 1, 0, 0, 4, 1, 0, 0})
	f.Add([]byte{0, 0, 0, 7, 2, 0, 1, 0, 1, 0, 0, 0, 1, 1, 0, 0, 3, 0, 0, 5, 4, 0, 0, 0, 1, 1, 0, 0})
	f.Add([]byte{0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22,
		0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22, 0, 3, 0, 22, 4, 3, 0, 0, 5, 0, 0, 0})
	f.Add([]byte{0, 0, 0, 255, 3, 5, 0, 1, 2, 5, 5, 0, 4, 6, 0, 0})
	f.Add([]byte{0, 0, 0, 22, 0, 1, 0, 22, 2, 1, 2, 0, 1, 2, 0, 0, 0, 3, 0, 22, 0, 4, 0, 22, 0, 5, 0, 22, 1})
	// Wide counts: the extremes of the int range after a few ordinary steps.
	for _, w := range []int64{math.MaxInt64, math.MinInt64, -1, 1 << 40, math.MaxInt32, math.MaxInt32 + 1,
		blocktable.MaxSlots + 1, 64 * 4 * 4, 64*4*4 + 1, 6 * 4 * 4, 6*4*4 + 1} {
		for _, op := range []byte{0, 3, 6} {
			seed := []byte{0, 1, 0, 9, 2, 1, 2, 0, op, 1, 0, 0xf8}
			seed = binary.LittleEndian.AppendUint64(seed, uint64(w))
			f.Add(append(seed, 0, 1, 0, 3, 4, 1, 0, 0))
		}
	}
	f.Fuzz(func(t *testing.T, ops []byte) {
		h := fuzzHarness(t, len(ops))
		for i, steps := 0, 0; i+3 < len(ops) && steps < 300; steps++ {
			op, a, b, x := ops[i], ops[i+1], ops[i+2], arg{n: ops[i+3]}
			i += 4
			if x.n >= 0xf8 && i+8 <= len(ops) { // a wide count follows: any int64
				x.wide, x.full = int64(binary.LittleEndian.Uint64(ops[i:])), true
				i += 8
			}
			h.step(op, a, b, x)
		}
		for id := range h.ref.seqs {
			require.NoError(t, h.m.FreeSequence(id))
		}
		require.NoError(t, h.m.Settle())
		st := h.m.Stats()
		require.Zero(t, st.LiveBlocks)
		require.LessOrEqual(t, st.FreePages, h.cfg.HighWatermark, "free pages beyond the high watermark are returned")
		require.LessOrEqual(t, st.Prefix.IdleBlocks, int(h.cfg.PrefixCacheBytes/h.cfg.BlockStride())+h.cfg.HighWatermark*st.BlocksPerPage,
			"the cache keeps its bound, and beyond it at most the watermark's spare pages")
		require.Equal(t, st.MappedPages, st.FreePages+st.Prefix.CacheOnlyPages, "every other page went back")
	})
}

// splits are the device layouts the suite runs on: one device, two (heads or layers divided)
// and four (both).
var splits = []kvcache.Split{{}, {TensorParallel: 2}, {PipelineParallel: 2}, {TensorParallel: 2, PipelineParallel: 2}}

// fuzzHarness returns the harness a fuzz input of n bytes runs on: its length picks the number
// of devices and their split, a tight arena and a cache bound, so the corpus covers them all.
func fuzzHarness(t testing.TB, n int) *harness {
	split := splits[n%len(splits)]
	var cfg kvcache.Config
	var h *harness
	if split == (kvcache.Split{}) {
		cfg = tinyConfig()
	} else {
		// 2 layers and 4 heads, 8 KiB blocks, 4 to a page across the devices (8-16 KiB each).
		cfg = kvcache.Config{Layers: 2, KVHeads: 4, HeadDim: 64, ElemSize: 2, BlockTokens: 4,
			PageSize: 32 << 10, Capacity: 64 * (32 << 10), NoBackground: true}
	}
	if n%2 == 1 {
		cfg.Capacity = 6 * cfg.PageSize // tight: appends run out of memory
	}
	if n%3 == 0 {
		cfg.PrefixCacheBytes = 3 * cfg.PageSize // the cache may keep pages of its own
	}
	cfg.WaitForWrites = n%7 == 3 // blocks become hits only once marked written
	if n%5 != 4 {
		cfg.HostBlocks = 12 // a host tier of three pages' worth
		if n%4 < 2 {        // and, with a host prefix cache, six
			cfg.HostBlocks, cfg.HostPrefixCache = 24, true
			if n%4 == 1 { // two of them kept for swaps
				cfg.HostSwapBlocks = 8
			}
		}
	}
	switch n % 11 { // with a host tier for swaps alone
	case 5: // a sliding window of 6 tokens with 2 sink tokens
		cfg.Window, cfg.Sinks, cfg.HostPrefixCache, cfg.HostSwapBlocks = 6, 2, false, 0
	case 7: // chunks of 8 tokens
		cfg.Chunk, cfg.HostPrefixCache, cfg.HostSwapBlocks = 8, false, 0
	}
	if split == (kvcache.Split{}) {
		h = newHarness(t, hostDevice(t, 32<<10), cfg)
	} else {
		devs := make([]vmm.Device, max(split.TensorParallel, 1)*max(split.PipelineParallel, 1))
		for i := range devs {
			devs[i] = hostDevice(t, 4<<10)
		}
		h = newMultiHarness(t, devs, cfg, split)
	}
	return h
}

// TestRandomTraces runs longer pseudo-random traces than the seed corpus, deterministically, on
// one, two and four devices.
func TestRandomTraces(t *testing.T) {
	ooms, moved, hits, evictions, swapOuts, swapIns, kept, found := 0, uint64(0), 0, uint64(0), uint64(0), uint64(0), 0, 0
	var hostStored, hostHits, hostEvictions uint64
	outOfReach := 0
	for seed := range 16 {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			h := fuzzHarness(t, seed)
			x := uint32(seed*2654435761 + 1)
			next := func() byte { x ^= x << 13; x ^= x >> 17; x ^= x << 5; return byte(x) }
			for range 700 {
				op := next()
				if int(op)%numOps == opAppend && next()%2 == 0 {
					op = opDecode // favour decode steps
				}
				a, b, x := next(), next(), arg{n: next()}
				if x.n >= 0xf8 { // now and then a count from the whole int range
					x.wide, x.full = int64(uint64(next())<<56|uint64(next())<<32|uint64(next())<<8|uint64(next())), true
					if next()%2 == 0 {
						x.wide >>= next() % 64
					}
				}
				h.step(op, a, b, x)
			}
			ooms += h.ooms
			hits += h.hits
			outOfReach += h.ref.outOfReach
			moved += h.m.Stats().BlocksMoved
			evictions += h.m.Stats().Prefix.Evictions
			swapOuts += h.m.Stats().SwapOuts
			swapIns += h.m.Stats().SwapIns
			kept += h.kept
			found += h.found
			hostStored += h.m.Stats().Prefix.HostStored
			hostHits += h.m.Stats().Prefix.HostHitTokens
			hostEvictions += h.m.Stats().Prefix.HostEvictions
			require.Positive(t, h.forks, "forks must be exercised")
		})
	}
	require.Positive(t, ooms, "the tight arenas must run out of memory at times")
	require.Positive(t, outOfReach, "windows and chunks must drop blocks")
	t.Logf("%d blocks dropped out of a window or chunk", outOfReach)
	require.Positive(t, moved, "compactions must move blocks")
	t.Logf("%d out-of-memory steps, %d blocks moved, %d prompt tokens hit, %d cached blocks evicted, %d blocks swapped out, %d in",
		ooms, moved, hits, evictions, swapOuts, swapIns)
	require.Positive(t, hits, "prompts must hit the prefix cache")
	require.Positive(t, evictions, "cached blocks must be evicted")
	require.Positive(t, swapOuts, "sequences must be swapped out")
	require.Positive(t, swapIns, "sequences must be swapped in")
	t.Logf("swaps: %d blocks kept on the device by swap-outs, %d found in its cache by swap-ins", kept, found)
	require.Positive(t, kept, "swap-outs must keep blocks sequences on the device share")
	require.Positive(t, found, "swap-ins must find blocks in the device's cache")
	t.Logf("host cache: %d blocks written back, %d prompt tokens fetched, %d blocks dropped", hostStored, hostHits, hostEvictions)
	require.Positive(t, hostStored, "idle blocks must be written back to the host cache")
	require.Positive(t, hostHits, "prompts must hit the host cache")
	require.Positive(t, hostEvictions, "the host cache must drop blocks")
}
