package kvcache_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// conversation returns turn t's prompt of conversation c: a system prompt of family c%2 (100
// tokens), then per earlier turn a user message and an answer, then this turn's message.
func conversation(c, turn int) []prefix.Token {
	var p []prefix.Token
	for i := range 100 {
		p = append(p, prefix.Token(1000*(c%2)+i))
	}
	for t := 0; t <= turn; t++ {
		for i := range 30 {
			p = append(p, prefix.Token(100000+10000*c+100*t+i))
		}
		if t < turn {
			p = append(p, answer(c, t)...)
		}
	}
	return p
}

func answer(c, turn int) []prefix.Token {
	a := make([]prefix.Token, 20)
	for i := range a {
		a[i] = prefix.Token(900000 + 10000*c + 100*turn + i)
	}
	return a
}

// Multi-turn conversations re-send their whole history each turn; every turn after the first
// finds it cached (in whole blocks, at most all but the last token), and a sequence started from
// cached blocks reads exactly the K/V written for those tokens, read through the exported table:
// on the host and on the GPU, across compactions.
func TestPrefixCacheOnBackends(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		// 16 tokens per block, 8 blocks per 2 MiB page, 32 pages: conversations span pages.
		cfg := kvcache.Config{Layers: 2, KVHeads: 8, HeadDim: 256, ElemSize: 2, BlockTokens: 16,
			PageSize: 2 << 20, Capacity: 32 * (2 << 20), NoBackground: true, PrefixCacheBytes: 16 * (2 << 20)}
		conversations(t, newHarness(t, dev, cfg))
	})
}

// conversations plays three turns of four conversations (two sharing each system prompt) with
// traffic between them and a compaction after each turn, checking every hit exactly and every
// token's data (on every device's share) through the exported table.
func conversations(t *testing.T, h *harness) {
	bt := h.cfg.BlockTokens
	for turn := range 3 {
		for c := range 4 {
			seq := kvcache.SeqID(c)
			p := conversation(c, turn)
			before := h.hits
			h.start(seq, prefix.Namespace{}, p, c%2 == 1)
			hit := h.hits - before
			switch {
			case turn > 0: // the whole of the previous turn's sequence is cached
				prev := len(conversation(c, turn-1)) + len(answer(c, turn-1))
				assert.Equal(t, min(prev, len(p)-1)/bt*bt, hit, "conversation %d turn %d", c, turn)
			case c >= 2: // the first turn shares the system prompt with conversation c-2
				assert.Equal(t, 100/bt*bt, hit, "conversation %d's system prompt", c)
			default:
				assert.Zero(t, hit)
			}
			for _, id := range answer(c, turn) { // decode, one token at a time
				h.slots, _ = h.m.AppendTokenIDs(seq, []prefix.Token{id}, h.slots[:0])
				h.removals()
				s := h.ref.seqs[seq]
				h.ref.append(seq, nil, []prefix.Token{id}, s.root)
				h.write(h.slots, s.tokens[len(s.tokens)-1:])
				h.stores()
			}
			h.step(opAppend, byte(4+c%4), 0, arg{n: 22}) // traffic between the conversations' blocks
			h.step(opAppend, byte(4+c%4), 0, arg{n: 22})
		}
		for c := range 8 { // the traffic ends too, leaving holes that compaction closes
			h.step(opFree, byte(c), 0, arg{})
		}
		h.step(opCompact, 0, 0, arg{})
	}
	st := h.m.Stats()
	assert.Positive(t, st.Prefix.HitRate)
	assert.Zero(t, st.Prefix.Evictions, "the cache had room for everything")
	assert.Positive(t, st.BlocksMoved, "compactions moved cached blocks")
}

// An append that evicts cached blocks and then fails to map a page leaves the manager exactly
// as it was: the evicted blocks are cached again, in their order, and no event is published.
// (With no bound, cache-only pages are evicted before a page is mapped.)
func TestPrefixEvictThenMapFault(t *testing.T) {
	for _, op := range []vmm.Op{vmm.OpCreate, vmm.OpMap, vmm.OpSetAccess} {
		t.Run(string(op), func(t *testing.T) {
			base := hostDevice(t, 32<<10)
			dev := vmm.InjectFaults(base)
			cfg := tinyConfig() // 4 blocks of 4 tokens per page; no bound: evict before mapping
			m := newManager(t, dev, cfg)
			ids := make([]prefix.Token, 16)
			for s := range 3 { // three pages of cached blocks, then idle
				for i := range ids {
					ids[i] = prefix.Token(100*s + i)
				}
				_, err := m.AppendTokenIDs(kvcache.SeqID(s), ids, nil)
				require.NoError(t, err)
			}
			for s := range 3 { // no Settle: beyond the bound (0), they wait for an append to need room
				require.NoError(t, m.FreeSequence(kvcache.SeqID(s)))
			}
			sub, err := m.Subscribe(16)
			require.NoError(t, err)
			before := shape(m.Stats())
			keys := m.CachedKeys(nil)
			require.Equal(t, 12, before.Prefix.IdleBlocks)
			require.Zero(t, before.FreePages)

			// 4 pages' worth: three cache-only pages are evicted, then a page must be mapped.
			require.NoError(t, dev.FailNth(op, 1, nil))
			_, err = m.AppendTokens(9, 4*16, nil)
			require.ErrorIs(t, err, vmm.ErrInjected)
			require.Equal(t, before, shape(m.Stats()))
			assert.ElementsMatch(t, keys, m.CachedKeys(nil))
			assert.Empty(t, sub.Read(nil), "a failed append publishes nothing")
			require.NoError(t, m.Verify())
			for s := range 3 { // still hits, on the same data
				for i := range ids {
					ids[i] = prefix.Token(100*s + i)
				}
				hit, err := m.StartSequence(kvcache.SeqID(10+s), kvcache.Prompt{Tokens: append(ids[:16:16], 7)})
				require.NoError(t, err)
				assert.Equal(t, 16, hit)
			}
			require.NoError(t, m.Verify())
		})
	}
}

// Namespaces separate tenants and adapters: the same tokens under another salt or adapter are
// a miss, as is an unknown combination.
func TestPrefixNamespaces(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	m := newManager(t, dev, tinyConfig())
	p := make([]prefix.Token, 13)
	for i := range p {
		p[i] = prefix.Token(i)
	}
	ns := prefix.Namespace{Adapter: 3, Salt: "acme"}
	hit, err := m.StartSequence(1, kvcache.Prompt{Tokens: p, Namespace: ns})
	require.NoError(t, err)
	require.Zero(t, hit)
	_, err = m.AppendTokenIDs(1, p, nil)
	require.NoError(t, err)
	for i, other := range []prefix.Namespace{{}, {Adapter: 3}, {Salt: "acme"}, {Adapter: 4, Salt: "acme"}, {Adapter: 3, Salt: "acme2"}} {
		hit, err := m.StartSequence(kvcache.SeqID(10+i), kvcache.Prompt{Tokens: p, Namespace: other})
		require.NoError(t, err)
		assert.Zero(t, hit, "%+v", other)
	}
	hit, err = m.StartSequence(2, kvcache.Prompt{Tokens: p, Namespace: ns})
	require.NoError(t, err)
	assert.Equal(t, 12, hit, "three whole blocks of 13 tokens, the last token never")
	require.NoError(t, m.Verify())
}

// Bad input gets typed errors and changes nothing; a subscriber that is gone changes nothing.
func TestPrefixBadInput(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	m, err := kvcache.New(dev, tinyConfig()) // closed by the test itself
	require.NoError(t, err)
	p := []prefix.Token{1, 2, 3, 4, 5, 6, 7, 8, 9}
	_, err = m.AppendTokenIDs(1, p, nil)
	require.NoError(t, err)
	sub, err := m.Subscribe(4)
	require.NoError(t, err)
	before := shape(m.Stats())

	_, err = m.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.ErrorIs(t, err, kvcache.ErrSequenceExists)
	_, err = m.StartSequence(2, kvcache.Prompt{Tokens: p, Keys: make([]prefix.Key, 3)})
	var ce *kvcache.CountError
	require.ErrorAs(t, err, &ce, "keys for 3 blocks of a 9-token prompt (2 full blocks)")
	_, err = m.Admit(kvcache.Prompt{Tokens: p, Keys: make([]prefix.Key, 3)})
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	_, err = m.Subscribe(0)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	_, err = m.Subscribe(prefix.MaxQueue + 1)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	require.Equal(t, before, shape(m.Stats()))
	_, err = m.Len(2)
	require.ErrorIs(t, err, kvcache.ErrUnknownSequence, "a refused start leaves no sequence")

	// Keys that do not belong to the tokens are just misses (the manager cannot tell).
	hit, err := m.StartSequence(3, kvcache.Prompt{Tokens: p, Keys: make([]prefix.Key, 2)})
	require.NoError(t, err)
	assert.Zero(t, hit)

	// The subscriber is gone: its queue overflows and the manager goes on.
	for i := range 20 {
		_, err := m.AppendTokenIDs(kvcache.SeqID(100+i), p, nil)
		require.NoError(t, err)
	}
	require.NoError(t, sub.Close())
	for i := range 20 {
		require.NoError(t, m.FreeSequence(kvcache.SeqID(100+i)))
	}
	_, err = m.DropCache()
	require.NoError(t, err)
	require.NoError(t, m.Verify())

	var nilM *kvcache.Manager
	_, err = nilM.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	require.NoError(t, m.Close())
	_, err = m.StartSequence(5, kvcache.Prompt{Tokens: p})
	require.ErrorIs(t, err, kvcache.ErrClosed)
	_, err = m.Subscribe(4)
	require.ErrorIs(t, err, kvcache.ErrClosed)
}

// Cached blocks never pin memory: with every request ended, the pages the cache keeps are whole
// pages of cached blocks, at most the watermark plus the bound, and DropCache and Sleep return
// them.
func TestPrefixIdleFootprint(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	cfg := tinyConfig()
	cfg.PrefixCacheBytes = 5 * cfg.PageSize
	cfg.ReservePages, cfg.HighWatermark = 1, 2
	m := newManager(t, dev, cfg)
	ids := make([]prefix.Token, 10)
	for s := range 30 { // 30 sequences of 3 blocks (two full), interleaved
		for i := range ids {
			ids[i] = prefix.Token(1000*s + i)
		}
		_, err := m.AppendTokenIDs(kvcache.SeqID(s), ids, nil)
		require.NoError(t, err)
	}
	for s := range 30 {
		require.NoError(t, m.FreeSequence(kvcache.SeqID(s)))
	}
	require.NoError(t, m.Settle())
	st := m.Stats()
	require.NoError(t, m.Verify())
	assert.LessOrEqual(t, st.FreePages, cfg.HighWatermark)
	assert.LessOrEqual(t, st.Prefix.IdleBlocks, (5+cfg.HighWatermark)*st.BlocksPerPage, "the bound and the watermark's spare pages")
	assert.Equal(t, st.MappedPages, st.Prefix.CacheOnlyPages+st.FreePages, "pages hold cache or are the watermark's")
	assert.Positive(t, st.Prefix.IdleBlocks)
	assert.Positive(t, st.Prefix.Evictions)

	res, err := m.Compact(kvcache.CompactOptions{})
	require.NoError(t, err)
	st = m.Stats()
	bpp := st.BlocksPerPage
	assert.Equal(t, (st.Prefix.IdleBlocks+bpp-1)/bpp, st.MappedPages-st.FreePages, "compaction packs the cache: %+v", res)

	n, err := m.DropCache()
	require.NoError(t, err)
	assert.Equal(t, st.Prefix.IdleBlocks, n)
	require.NoError(t, m.Settle())
	assert.LessOrEqual(t, m.Stats().MappedPages, cfg.HighWatermark)
	_, err = m.Sleep()
	require.NoError(t, err)
	assert.Zero(t, m.Stats().MappedPages)
}

// Admit says what a start would find and whether the rest fits, changing nothing.
func TestPrefixAdmit(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	cfg := tinyConfig()
	cfg.Capacity = 4 * cfg.PageSize // 16 blocks
	m := newManager(t, dev, cfg)
	p := make([]prefix.Token, 33)
	for i := range p {
		p[i] = prefix.Token(i)
	}
	_, err := m.AppendTokenIDs(1, p[:32], nil) // 8 blocks, cached
	require.NoError(t, err)
	require.NoError(t, m.FreeSequence(1))
	before := shape(m.Stats())
	ad, err := m.Admit(kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	assert.Equal(t, 32, ad.CachedTokens)
	assert.Equal(t, 1, ad.NeedBlocks)
	assert.Equal(t, 16-8, ad.Available.Blocks, "the prompt's own idle blocks are not counted as room")
	assert.True(t, ad.Fits)
	assert.Equal(t, before, shape(m.Stats()))
	av := m.Available()
	assert.Equal(t, 16, av.Blocks, "free, idle and mappable blocks")
	assert.Equal(t, 8, av.IdleBlocks)
	hit, err := m.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	assert.Equal(t, ad.CachedTokens, hit)
}

// A sleeping manager refuses a start whatever its memory, and Admit says so (ErrAsleep) rather
// than that a short prompt fits the free blocks Sleep left beside a live sequence.
func TestPrefixAdmitAsleep(t *testing.T) {
	m := newManager(t, hostDevice(t, 32<<10), tinyConfig())
	_, err := m.AppendTokenIDs(1, promptOf(6, 1), nil)
	require.NoError(t, err)
	_, err = m.Sleep()
	require.NoError(t, err)
	p := kvcache.Prompt{Tokens: promptOf(4, 2)}
	_, err = m.Admit(p)
	require.ErrorIs(t, err, kvcache.ErrAsleep)
	_, err = m.StartSequence(2, p)
	require.ErrorIs(t, err, kvcache.ErrAsleep)
	require.NoError(t, m.Wake())
	ad, err := m.Admit(p)
	require.NoError(t, err)
	require.True(t, ad.Fits)
}
