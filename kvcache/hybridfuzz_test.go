package kvcache_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// hybridState is what a caller sees of a Hybrid: each group's counts and each sequence's
// length and blocks. A failed call must leave it as it was, but for idle cached blocks it
// evicted (counted in Evictions).
type hybridState struct {
	groups []string
	seqs   map[kvcache.SeqID]string
}

func hybridStateOf(t *testing.T, h *kvcache.Hybrid, seqs []kvcache.SeqID) hybridState {
	st := hybridState{seqs: map[kvcache.SeqID]string{}}
	for g := range h.Groups() {
		s := h.Group(g).Stats()
		// A failed call may evict idle cached blocks a copy of its overwrote (rollbackAfterCopy),
		// each counted: the cache plus its evictions is what stays.
		st.groups = append(st.groups, fmt.Sprint(s.Sequences, s.LiveBlocks, s.MappedPages, s.Prefix.CachedBlocks+int(s.Prefix.Evictions),
			s.Prefix.IdleBlocks+int(s.Prefix.Evictions)))
	}
	for _, seq := range seqs {
		n, err := h.Len(seq)
		if err != nil {
			continue
		}
		var b []int32
		for g := range h.Groups() {
			b, err = h.Group(g).Blocks(seq, b)
			require.NoError(t, err)
			b = append(b, -7) // a separator between groups
		}
		st.seqs[seq] = fmt.Sprint(n, b)
	}
	return st
}

// FuzzHybrid drives a Hybrid of every group kind (full attention, a window with sinks, chunks,
// an MLA latent in 32-token blocks, a recurrent state with checkpoints every 32 tokens), with or
// without host prefix caches (and tiers below them), a group dropping its caches, under a tight limit through random starts on shared prefixes,
// appends with and without ids, marks,
// forks, truncations, frees and compactions. After every step Verify holds (each group's
// invariants, keys and checkpoints); a call that fails leaves every group and sequence exactly
// as it was; and at the end every token each attention group still holds reads back through
// its table.
func FuzzHybrid(f *testing.F) {
	f.Add([]byte{0, 1, 40, 1, 1, 3, 4, 1, 32, 5, 1, 2, 0, 2, 40, 2, 2, 9, 7, 0, 0})
	f.Add([]byte{2, 1, 200, 4, 1, 64, 0, 2, 100, 6, 1, 0, 3, 2, 17, 8, 0, 0, 0, 3, 250})
	f.Add([]byte{1, 0, 39, 1, 0, 39, 1, 0, 39, 1, 0, 39, 1, 0, 39, 1, 0, 39, 7, 0, 0, 5, 0, 9, 6, 0, 1})
	// 41 bytes: host caches and tiers below them, blocks cached as they fill. A prompt is
	// prefilled, marked (a checkpoint at 224) and freed; the full and window groups drop their
	// caches, and starting the prompt again fetches their blocks from the tiers (14 and 3).
	f.Add([]byte{0, 0, 251, 5, 0, 224, 8, 0, 0, 9, 0, 1, 9, 0, 3, 0, 2, 251, 2, 2, 0, 8, 2, 0, 9, 0, 0, 7, 3, 5, 0, 4, 243, 8, 3, 0, 0, 1, 250, 0, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		dev := hostDevice(t, 64<<10)
		g := smallHybrid(true)
		g.Groups[4].Checkpoints = 32
		limit := uint64(1 << 20) // a page or two for each group: appends run out of memory, in any group
		if len(ops)%2 == 1 {
			limit = 3 << 20
		}
		hostCache := 0
		if len(ops)/2%2 == 0 { // every attention group with a host prefix cache of 256 tokens
			hostCache = 256
		}
		var tiers func(int, kvcache.LayerGroup, tier.Fingerprint, int) ([]kvcache.Tier, error)
		if hostCache > 0 && len(ops)/4%2 == 0 { // and below it a store per group, written behind
			tiers = newGroupStores().tiers
		}
		h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: g, Limit: limit, Capacity: 16 << 20, NoBackground: true,
			PrefixCacheBytes: 256 << 10, WaitForWrites: len(ops)%3 == 0, HostCacheTokens: hostCache, Tiers: tiers,
			TierTimeout: time.Minute})
		require.NoError(t, err)
		defer func() { require.NoError(t, h.Close()) }()
		d := &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}}
		bases := [][]kvcache.TokenID{promptOf(300, 1), promptOf(300, 2)}
		all := []kvcache.SeqID{0, 1, 2, 3, 4, 5, 6, 7}
		dst := make([][]int64, h.Groups())
		for i := 0; i+2 < len(ops) && i < 3*200; i += 3 {
			op, seq, x := ops[i]%10, kvcache.SeqID(ops[i+1]%8), int(ops[i+2])
			for j := range dst {
				dst[j] = dst[j][:0]
			}
			before := hybridStateOf(t, h, all)
			from, _ := h.Len(seq)
			var err error
			prefilled := false
			switch op {
			case 0: // start on a shared prefix
				p := bases[x%2][:1+x]
				var hit int
				hit, err = h.StartSequence(seq, kvcache.Prompt{Tokens: p, Namespace: prefix.Namespace{Adapter: uint64(x % 3 / 2)}})
				if err == nil {
					d.val[seq] = d.val[seq][:0]
					for range hit { // what the hit holds was written by an earlier sequence: take no claim on it
						d.val[seq] = append(d.val[seq], 0)
					}
					// x%4 >= 2: the runtime's prefill, the prompt's own tokens, so that later
					// starts on the prefix hit (the device, the host or a tier). A failure is
					// the append's, checked against the state after the start.
					if x%4 >= 2 && hit < len(p) {
						before, from, prefilled = hybridStateOf(t, h, all), hit, true
						dst, err = h.AppendTokenIDs(seq, p[hit:], dst)
					}
				}
			case 1, 2: // count appends; 2: decode steps
				n := x
				if op == 2 {
					n = 1
				}
				dst, err = h.AppendTokens(seq, n, dst)
			case 3, 4: // appends with ids from a small alphabet, so that blocks repeat
				n := 1 + x%40
				if op == 4 {
					n = 1
				}
				ids := make([]kvcache.TokenID, n)
				for k := range ids {
					ids[k] = kvcache.TokenID((x + k) % 5)
				}
				dst, err = h.AppendTokenIDs(seq, ids, dst)
			case 5:
				err = h.MarkWritten(seq, x)
			case 6:
				err = h.Fork(seq, kvcache.SeqID(x%8))
				if err == nil {
					d.val[kvcache.SeqID(x%8)] = slices.Clone(d.val[seq])
				}
			case 7:
				err = h.Truncate(seq, x%(from+1))
				if err == nil {
					d.val[seq] = d.val[seq][:from-x%(from+1)]
				}
			case 8:
				err = h.FreeSequence(seq)
				if err == nil {
					delete(d.val, seq)
				}
			case 9: // x even: compact; odd: one group drops its device and host caches
				if x%2 == 0 {
					_, err = h.Compact(kvcache.CompactOptions{})
				} else {
					_, err = h.Group(x / 2 % h.Groups()).DropCache()
				}
			}
			if err != nil {
				var ce *kvcache.CountError
				require.True(t, errors.Is(err, kvcache.ErrOutOfMemory) || errors.Is(err, kvcache.ErrUnknownSequence) ||
					errors.Is(err, kvcache.ErrSequenceExists) || errors.As(err, &ce), "step %d (op %d): an untyped error: %v", i/3, op, err)
				require.Equal(t, before, hybridStateOf(t, h, all), "step %d (op %d): the failed call changed something: %v", i/3, op, err)
			} else if (op >= 1 && op <= 4 || prefilled) && len(dst[0]) > 0 {
				if len(d.val[seq]) > from {
					d.val[seq] = d.val[seq][:from]
				}
				d.write(t, seq, from, dst)
			}
			require.NoError(t, h.Verify(), "step %d (op %d)", i/3, op)
			if tiers != nil { // what the tiers hold for the next step does not depend on timing
				require.NoError(t, h.SyncTiers(context.Background()))
			}
		}
		live := slices.Collect(maps.Keys(d.val))
		var checked []kvcache.SeqID
		for _, seq := range live {
			if n, err := h.Len(seq); err == nil && n == len(d.val[seq]) && !slices.Contains(d.val[seq], 0) {
				checked = append(checked, seq)
			}
		}
		slices.Sort(checked)
		d.check(t, checked)
	})
}
