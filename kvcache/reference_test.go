package kvcache_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sort"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// refModel is the naive reference: a map of sequences to their token values and abstract block
// lists, with no pages, no memory and no cleverness. Block ids are its own; the check is that a
// one-to-one correspondence with the manager's ids exists.
type refModel struct {
	bt     int
	seqs   map[kvcache.SeqID]*refSeq
	refs   map[int]int
	nextID int
}

type refSeq struct {
	tokens []uint64 // the value written for each token
	blocks []int
}

func newRef(bt int) *refModel {
	return &refModel{bt: bt, seqs: map[kvcache.SeqID]*refSeq{}, refs: map[int]int{}}
}

func (r *refModel) newBlock() int { r.nextID++; r.refs[r.nextID] = 1; return r.nextID }

func (r *refModel) append(id kvcache.SeqID, vals []uint64) {
	s, ok := r.seqs[id]
	if !ok {
		s = &refSeq{}
		r.seqs[id] = s
	}
	if len(vals) == 0 {
		return
	}
	if len(s.tokens)%r.bt != 0 && r.refs[s.blocks[len(s.blocks)-1]] > 1 {
		old := s.blocks[len(s.blocks)-1]
		r.refs[old]--
		s.blocks[len(s.blocks)-1] = r.newBlock()
	}
	s.tokens = append(s.tokens, vals...)
	for len(s.blocks)*r.bt < len(s.tokens) {
		s.blocks = append(s.blocks, r.newBlock())
	}
}

func (r *refModel) free(id kvcache.SeqID) {
	for _, b := range r.seqs[id].blocks {
		r.drop(b)
	}
	delete(r.seqs, id)
}

func (r *refModel) drop(b int) {
	r.refs[b]--
	if r.refs[b] == 0 {
		delete(r.refs, b)
	}
}

func (r *refModel) fork(src, dst kvcache.SeqID) {
	s := r.seqs[src]
	d := &refSeq{tokens: append([]uint64(nil), s.tokens...), blocks: append([]int(nil), s.blocks...)}
	for _, b := range d.blocks {
		r.refs[b]++
	}
	r.seqs[dst] = d
}

func (r *refModel) truncate(id kvcache.SeqID, n int) {
	s := r.seqs[id]
	s.tokens = s.tokens[:len(s.tokens)-n]
	keep := (len(s.tokens) + r.bt - 1) / r.bt
	for _, b := range s.blocks[keep:] {
		r.drop(b)
	}
	s.blocks = s.blocks[:keep]
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
	static  bool   // the manager is static: every page stays mapped
	free0   uint64 // the device's free memory before the manager mapped anything
}

// shape is the part of Stats that is state, not history.
func shape(s kvcache.Stats) kvcache.Stats {
	s.SyncMaps, s.BackgroundMaps, s.Unmaps, s.CopyOnWrites, s.ReserveErr = 0, 0, 0, 0, nil
	s.Compactions, s.BlocksMoved = 0, 0
	return s
}

func newHarness(t testing.TB, dev vmm.Device, cfg kvcache.Config) *harness {
	free0, _, err := dev.MemInfo()
	require.NoError(t, err)
	m := newManager(t, dev, cfg)
	return &harness{t: t, m: m, dev: dev, ref: newRef(cfg.BlockTokens), cfg: m.Config(), free0: free0}
}

// tokenAddr is where the test writes token t's value: layer 0 K (and the last layer's V), at
// the token's offset in its block.
func (h *harness) tokenAddr(slot int64, layer, kv int) vmm.Addr {
	bt := int64(h.cfg.BlockTokens)
	return h.m.BlockAddr(layer, kv, int32(slot/bt)) + vmm.Addr(uint64(slot%bt)*h.cfg.TokenBytes())
}

func isExpected(err error) bool {
	return errors.Is(err, kvcache.ErrUnknownSequence) || errors.Is(err, kvcache.ErrSequenceExists) ||
		errors.Is(err, kvcache.ErrInvalidArgument) || errors.Is(err, kvcache.ErrTooLarge)
}

// arg is a step's count: small (a byte, as most steps use) or wide (any int64, drawn from the
// whole range: negative, huge, MinInt, MaxInt).
type arg struct {
	n    byte
	wide int64
	full bool
}

// small returns a count of op's usual range from the byte, or the wide value.
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

// step applies one operation. A failed operation must leave the manager as it was, which
// check then confirms against the unchanged reference.
func (h *harness) step(op, a, b byte, x arg) {
	t := h.t
	seq, other := kvcache.SeqID(a%8), kvcache.SeqID(b%8)
	_, exists := h.ref.seqs[seq]
	before := shape(h.m.Stats())
	n := x.n
	var err error
	switch op % 7 {
	case 0, 1: // append n tokens (prefill) or 1 (decode)
		cnt := x.count(23)
		if op%7 == 1 && !x.full {
			cnt = 1
		}
		if n == 255 && !x.full {
			cnt = -1
		}
		h.slots, err = h.m.AppendTokens(seq, cnt, h.slots[:0])
		switch {
		case cnt < 0:
			require.ErrorIs(t, err, kvcache.ErrInvalidArgument, "append %d", cnt)
		case h.tooLarge(seq, cnt):
			require.ErrorIs(t, err, kvcache.ErrTooLarge, "append %d to %d can never fit", cnt, seq)
			require.NotErrorIs(t, err, kvcache.ErrOutOfMemory)
		case err != nil:
			require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "append %d to %d", cnt, seq)
			require.NotErrorIs(t, err, kvcache.ErrTooLarge, "append %d to %d fits the arena", cnt, seq)
		}
		if err == nil {
			require.Len(t, h.slots, cnt)
			vals := make([]uint64, cnt)
			for i, s := range h.slots {
				h.nextVal++
				vals[i] = h.nextVal
				var buf [8]byte
				binary.LittleEndian.PutUint64(buf[:], h.nextVal)
				require.NoError(t, h.dev.CopyIn(h.tokenAddr(s, 0, 0), buf[:]))
				require.NoError(t, h.dev.CopyIn(h.tokenAddr(s, h.cfg.Layers-1, 1), buf[:]))
			}
			h.ref.append(seq, vals)
		}
	case 2:
		err = h.m.Fork(seq, other)
		_, dstExists := h.ref.seqs[other]
		if exists && !dstExists {
			require.NoError(t, err)
			h.ref.fork(seq, other)
		} else {
			require.Error(t, err)
		}
	case 3:
		cnt := x.count(9)
		err = h.m.Truncate(seq, cnt)
		if exists && cnt >= 0 && cnt <= len(h.ref.seqs[seq].tokens) {
			require.NoError(t, err)
			h.ref.truncate(seq, cnt)
		} else {
			require.Error(t, err)
		}
	case 4:
		err = h.m.FreeSequence(seq)
		if exists {
			require.NoError(t, err)
			h.ref.free(seq)
		} else {
			require.ErrorIs(t, err, kvcache.ErrUnknownSequence)
		}
	case 5:
		require.NoError(t, h.m.Settle())
	case 6: // compact, with a budget of n blocks (0: none)
		budget := uint64(n%8) * h.cfg.BlockStride()
		if x.full {
			budget = uint64(x.wide)
		}
		res, err := h.m.Compact(kvcache.CompactOptions{MaxBytes: budget})
		require.NoError(t, err)
		if budget > 0 {
			require.LessOrEqual(t, res.BytesMoved, budget)
		} else {
			st := h.m.Stats()
			optimum := (st.LiveBlocks+st.BlocksPerPage-1)/st.BlocksPerPage + h.cfg.ReservePages
			optimum = min(optimum, int(h.cfg.Capacity/h.cfg.PageSize))
			if h.static {
				optimum = int(h.cfg.Capacity / h.cfg.PageSize)
			}
			require.Equal(t, optimum, st.MappedPages, "an unbounded compaction reaches the optimum")
		}
	}
	if err != nil {
		if errors.Is(err, kvcache.ErrOutOfMemory) {
			h.ooms++
		} else {
			require.True(t, isExpected(err), "unexpected error kind: %v", err)
		}
		require.Equal(t, before, shape(h.m.Stats()), "a failed %d changed the manager", op%7)
	}
	h.check()
}

// check compares the manager with the reference: the same sequences with the same token counts
// and block counts, a one-to-one correspondence of block ids (so sharing is the same), every
// token's value readable through the block table, and all the manager's invariants.
func (h *harness) check() {
	t := h.t
	require.NoError(t, h.m.Verify())
	st := h.m.Stats()
	if !h.static { // page accounting equals what the device reports
		free, _, err := h.dev.MemInfo()
		require.NoError(t, err)
		require.Equal(t, st.MappedBytes, h.free0-free, "mapped pages against the device's free memory")
	}
	require.Equal(t, len(h.ref.seqs), st.Sequences)
	require.Equal(t, len(h.ref.refs), st.LiveBlocks)
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
			if x, ok := toRef[b]; ok {
				require.Equal(t, rb, x, "block %d of sequence %d maps to two reference blocks", b, id)
			}
			if x, ok := toMgr[rb]; ok {
				require.Equal(t, b, x, "reference block %d of sequence %d maps to two blocks", rb, id)
			}
			toRef[b], toMgr[rb] = rb, b
		}
		h.slots, err = h.m.Slots(id, 0, n, h.slots[:0])
		require.NoError(t, err)
		for i, s := range h.slots {
			for _, lk := range [][2]int{{0, 0}, {h.cfg.Layers - 1, 1}} {
				var buf [8]byte
				require.NoError(t, h.dev.CopyOut(buf[:], h.tokenAddr(s, lk[0], lk[1])))
				require.Equal(t, rs.tokens[i], binary.LittleEndian.Uint64(buf[:]),
					"sequence %d token %d (slot %d) layer %d kv %d", id, i, s, lk[0], lk[1])
			}
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
		dev := hostDevice(t, 32<<10)
		cfg := tinyConfig()
		if len(ops)%2 == 1 {
			cfg.Capacity = 6 * cfg.PageSize // tight: appends run out of memory
		}
		h := newHarness(t, dev, cfg)
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
		require.LessOrEqual(t, st.MappedPages, h.cfg.HighWatermark, "free pages beyond the high watermark are returned")
	})
}

// TestRandomTraces runs longer pseudo-random traces than the seed corpus, deterministically.
func TestRandomTraces(t *testing.T) {
	ooms, moved := 0, uint64(0)
	for seed := range 8 {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			dev := hostDevice(t, 32<<10)
			cfg := tinyConfig()
			if seed%2 == 1 {
				cfg.Capacity = 6 * cfg.PageSize
			}
			h := newHarness(t, dev, cfg)
			x := uint32(seed*2654435761 + 1)
			next := func() byte { x ^= x << 13; x ^= x >> 17; x ^= x << 5; return byte(x) }
			for range 600 {
				op := next()
				if op%7 == 0 && next()%2 == 0 {
					op = 1 // favour decode steps
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
			moved += h.m.Stats().BlocksMoved
			require.Positive(t, h.m.Stats().CopyOnWrites+uint64(h.m.Stats().BlockRefs-h.m.Stats().LiveBlocks), "forks must be exercised")
		})
	}
	require.Positive(t, ooms, "the tight arenas must run out of memory at times")
	require.Positive(t, moved, "compactions must move blocks")
}
