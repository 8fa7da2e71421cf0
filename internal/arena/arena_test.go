package arena_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/arena"
	"github.com/pagedkv/pagedkv/prefix"
)

// model is what the owner of an arena knows: the holders of each block and the key of each
// cached one. Check compares the arena with it.
type model struct {
	t      *testing.T
	a      *arena.Arena
	refs   map[arena.Block]int32
	cached map[arena.Block]prefix.Key
	next   uint64
}

func newModel(t *testing.T, pages, bpp int) *model {
	return &model{t: t, a: arena.New(pages, bpp), refs: map[arena.Block]int32{}, cached: map[arena.Block]prefix.Key{}}
}

func (m *model) key() prefix.Key {
	m.next++
	var k prefix.Key
	for i := range 8 {
		k[i] = byte(m.next >> (8 * i))
	}
	k[31] = 0xa5
	return k
}

// check fails the test where the arena disagrees with itself or the model.
func (m *model) check(step string) {
	m.t.Helper()
	var bad []string
	m.a.Check(m.refs, func(format string, args ...any) { bad = append(bad, fmt.Sprintf(format, args...)) })
	require.Empty(m.t, bad, step)
	live, idle := 0, 0
	for b, r := range m.refs {
		if r > 0 {
			live++
		} else if _, ok := m.cached[b]; ok {
			idle++
		}
	}
	require.Equal(m.t, live, m.a.Live(), step)
	require.Equal(m.t, idle, m.a.Idle(), step)
	require.Equal(m.t, len(m.cached), m.a.Index().Len(), step)
	for b, k := range m.cached {
		e := m.a.Index().Get(k)
		require.NotNil(m.t, e, step)
		require.Equal(m.t, b, e.Block, step)
	}
}

func (m *model) mapPage() bool {
	p, ok := m.a.TakeUnmapped()
	if ok {
		m.a.MarkMapped(p)
	}
	return ok
}

func (m *model) alloc() (arena.Block, bool) {
	p, ok := m.a.Pick(-1, 1)
	if !ok {
		return 0, false
	}
	b := m.a.Alloc(p)
	m.refs[b] = 1
	return b, true
}

func (m *model) unref(b arena.Block) {
	m.a.Unref(b)
	if m.refs[b]--; m.refs[b] == 0 {
		if _, ok := m.cached[b]; !ok {
			delete(m.refs, b)
		}
	}
}

func (m *model) evict() bool {
	b, p, ok := m.a.Victim()
	if !ok {
		return false
	}
	blocks := []arena.Block{b}
	if p >= 0 {
		blocks = blocks[:0]
		for b := m.a.First(p); b < m.a.First(p+1); b++ {
			if m.a.IsIdle(b) {
				blocks = append(blocks, b)
			}
		}
		require.NotEmpty(m.t, blocks, "a cache-only page victim has idle blocks")
	}
	for _, b := range blocks {
		require.True(m.t, m.a.IsIdle(b), "victim %d is idle", b)
		r := m.a.Evict(b)
		require.Equal(m.t, m.cached[b], r.Key)
		m.a.Index().Recycle(r)
		delete(m.cached, b)
		delete(m.refs, b)
	}
	return true
}

func pick[K comparable, V any](r *rand.Rand, mp map[K]V, ok func(K, V) bool) (K, bool) {
	var zero K
	var c []K
	for k, v := range mp {
		if ok(k, v) {
			c = append(c, k)
		}
	}
	if len(c) == 0 {
		return zero, false
	}
	// map order is random, but not seeded: sort-free choice by the test's own generator
	return c[r.IntN(len(c))], true
}

// TestRandomOperations runs random sequences of every operation an owner performs (map, alloc,
// hold, release, cache, evict the victim or a block of its choice, hit an idle block, unmap,
// compact) and checks the
// arena against the model after each: reference counts, free bits, page states and indexes,
// the cache entries and their index, held and idle counts.
func TestRandomOperations(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 7))
			m := newModel(t, 12, 8)
			for step := range 1500 {
				op := r.IntN(11)
				switch op {
				case 0:
					m.mapPage()
				case 1, 2:
					if _, ok := m.alloc(); !ok {
						m.evict()
					}
				case 3: // share a held block
					if b, ok := pick(r, m.refs, func(_ arena.Block, n int32) bool { return n > 0 }); ok {
						m.a.Ref(b)
						m.refs[b]++
					}
				case 4, 5: // release a holder
					if b, ok := pick(r, m.refs, func(_ arena.Block, n int32) bool { return n > 0 }); ok {
						m.unref(b)
					}
				case 6: // cache a held block
					if b, ok := pick(r, m.refs, func(b arena.Block, n int32) bool { _, c := m.cached[b]; return n > 0 && !c }); ok {
						k := m.key()
						require.True(t, m.a.Cache(b, k))
						m.cached[b] = k
					}
				case 7: // a prefix hit holds an idle block again
					if b, ok := pick(r, m.cached, func(b arena.Block, _ prefix.Key) bool { return m.refs[b] == 0 }); ok {
						m.a.HoldAll([]arena.Block{b})
						m.refs[b] = 1
					}
				case 8: // the owner unmaps the highest free page
					if p, ok := m.a.HighestFree(); ok {
						m.a.SetState(p, arena.InFlight)
						m.a.SetState(p, arena.Unmapped)
					} else {
						m.evict()
					}
				case 9:
					compact(t, m)
				case 10: // the owner drops an idle block of its choice (DropCache, a tier's demotion)
					if b, ok := pick(r, m.cached, func(b arena.Block, _ prefix.Key) bool { return m.refs[b] == 0 }); ok {
						m.a.Index().Recycle(m.a.Evict(b))
						delete(m.cached, b)
						delete(m.refs, b)
					}
				}
				m.check(fmt.Sprintf("seed %d step %d op %d", seed, step, op))
			}
		})
	}
}

// compact plans a compaction, checks that the plan packs the blocks in use into the fewest
// pages, and moves them as the owner would after copying their data.
func compact(t *testing.T, m *model) {
	bpp := m.a.BlocksPerPage()
	pairs := m.a.PlanCompaction(-1)
	for i := 0; i < len(pairs); i += 2 {
		src, dst := arena.Block(pairs[i]), arena.Block(pairs[i+1])
		require.False(t, m.a.IsFree(src), "source %d holds data", src)
		require.True(t, m.a.IsFree(dst), "destination %d is free", dst)
		m.a.Move(src, dst)
		if n, ok := m.refs[src]; ok {
			m.refs[dst] = n
			delete(m.refs, src)
		}
		if k, ok := m.cached[src]; ok {
			m.cached[dst] = k
			delete(m.cached, src)
		}
	}
	used := 0
	for p := range arena.Page(m.a.Pages()) {
		if s := m.a.State(p); s == arena.Partial || s == arena.Full {
			used++
		}
	}
	require.Equal(t, (m.a.Live()+m.a.Idle()+bpp-1)/bpp, used, "pages in use after an unbounded compaction")
}

// The victim is the least recently released idle block, unless a cache-only page's newest
// block is within 1/NearTie of the idle blocks' age span of it: then that whole page.
func TestVictim(t *testing.T) {
	m := newModel(t, 4, 4)
	require.True(t, m.mapPage())
	require.True(t, m.mapPage())
	_, _, ok := m.a.Victim()
	require.False(t, ok, "nothing idle, no victim")
	// Page 0 holds blocks 0-3; block 1 stays held, so page 0 is not cache-only.
	var blocks []arena.Block
	for range 4 {
		b, ok := m.alloc()
		require.True(t, ok)
		blocks = append(blocks, b)
		k := m.key()
		require.True(t, m.a.Cache(b, k))
		m.cached[b] = k
	}
	require.Equal(t, []arena.Block{0, 1, 2, 3}, blocks)
	m.unref(2) // oldest idle
	m.unref(0)
	m.unref(3)
	b, p, ok := m.a.Victim()
	require.True(t, ok)
	require.Equal(t, arena.Block(2), b, "the least recently released idle block")
	require.Equal(t, arena.Page(-1), p)
	m.unref(1) // page 0 is now cache-only, its newest release the newest of all
	b, p, ok = m.a.Victim()
	require.True(t, ok)
	require.Equal(t, []int32{2, -1}, []int32{int32(b), int32(p)}, "a cache-only page far newer than the oldest block stays")
	m.check("before the near tie")
	// Releases of other blocks (each cached on page 1, released, then dropped by its owner)
	// widen the idle blocks' age span, until page 0 is a near tie of block 2.
	for i := range 40 {
		b, ok := m.alloc()
		require.True(t, ok)
		require.Equal(t, arena.Page(1), m.a.PageOf(b))
		k := m.key()
		require.True(t, m.a.Cache(b, k))
		m.cached[b] = k
		m.unref(b)
		if i == 10 {
			_, p, _ := m.a.Victim()
			require.Equal(t, arena.Page(-1), p, "not yet a near tie")
		}
		m.a.Index().Recycle(m.a.Evict(b))
		delete(m.cached, b)
		delete(m.refs, b)
	}
	_, p, ok = m.a.Victim()
	require.True(t, ok)
	require.Equal(t, arena.Page(0), p, "page 0 is nearly as old as its oldest block: it goes whole")
	m.check("after the near tie")
}

// Pick takes the hint page while it has room, else the lowest partial page with room for the
// whole run, else the lowest partial page, else the lowest free page.
func TestPick(t *testing.T) {
	m := newModel(t, 4, 4)
	for range 3 {
		require.True(t, m.mapPage())
	}
	// page 0: 3 of 4 used; page 1: 1 of 4 used; page 2 free
	for range 4 {
		_, ok := m.alloc()
		require.True(t, ok)
	}
	m.unref(3)
	b := m.a.Alloc(1)
	m.refs[b] = 1
	m.check("set-up")
	require.Equal(t, 3, m.a.FreeIn(1))
	p, _ := m.a.Pick(-1, 1)
	require.Equal(t, arena.Page(0), p, "one block: the lowest partial page")
	p, _ = m.a.Pick(-1, 3)
	require.Equal(t, arena.Page(1), p, "three blocks: the lowest partial page with room for all")
	p, _ = m.a.Pick(2, 3)
	require.Equal(t, arena.Page(2), p, "the hint while it has room")
	p, _ = m.a.Pick(-1, 8)
	require.Equal(t, arena.Page(0), p, "more than a page: the lowest partial page")
}

// BenchmarkAllocRelease times taking a block (Pick, Alloc) and releasing it (Unref) in an
// arena of 64 mapped pages, half full: the bookkeeping of an append that needs a block and of a
// free, without a cache. It allocates nothing.
func BenchmarkAllocRelease(b *testing.B) {
	a := arena.New(64, 64)
	for range 64 {
		p, _ := a.TakeUnmapped()
		a.MarkMapped(p)
	}
	for range 64 * 32 {
		p, _ := a.Pick(-1, 1)
		a.Alloc(p)
	}
	b.ReportAllocs()
	for b.Loop() {
		p, _ := a.Pick(-1, 1)
		a.Unref(a.Alloc(p))
	}
}

// BenchmarkCacheEvict times the prefix cache's turnover at a 0% hit rate, in an arena whose 64
// pages are full of idle cached blocks: the victim is evicted (here, blocks released in page
// order make it a whole page: a near tie) and as many blocks are taken, cached and released.
// It reports ns per block turned over, and allocates nothing.
func BenchmarkCacheEvict(b *testing.B) {
	const pages, bpp = 64, 64
	a := arena.New(pages, bpp)
	for range pages {
		p, _ := a.TakeUnmapped()
		a.MarkMapped(p)
	}
	var k prefix.Key
	next := uint64(0)
	cacheOne := func(blk arena.Block) {
		next++
		for i := range 8 {
			k[i] = byte(next >> (8 * i))
		}
		a.Cache(blk, k)
		a.Unref(blk)
	}
	for range pages * bpp {
		p, _ := a.Pick(-1, 1)
		cacheOne(a.Alloc(p))
	}
	b.ReportAllocs()
	blocks := 0
	for b.Loop() {
		blk, p, ok := a.Victim()
		if !ok {
			b.Fatal("no victim in a full cache")
		}
		if p >= 0 {
			for x := arena.Block(p) * bpp; x < arena.Block(p+1)*bpp; x++ {
				if a.IsIdle(x) {
					a.Index().Recycle(a.Evict(x))
				}
			}
		} else {
			a.Index().Recycle(a.Evict(blk))
		}
		for a.FreePages() > 0 || a.PartialPages() > 0 {
			q, _ := a.Pick(-1, 1)
			cacheOne(a.Alloc(q))
			blocks++
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(blocks), "ns/block")
}

// TestPageOf checks PageOf, which multiplies by a reciprocal instead of dividing, against the
// division over the whole range of block ids, for page sizes from one block up (powers of two,
// odd ones, ones a little off a power of two, the largest).
func TestPageOf(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, bpp := range []int{1, 2, 3, 5, 7, 9, 31, 32, 33, 63, 64, 65, 100, 127, 641, 1000, 4097, 1 << 20, 1<<31 - 1} {
		a := arena.New(1, bpp)
		ids := []int32{0, 1, int32(min(bpp-1, math.MaxInt32)), int32(min(bpp, math.MaxInt32)), math.MaxInt32, math.MaxInt32 - 1}
		for range 100_000 {
			ids = append(ids, r.Int32())
		}
		for m := int64(bpp); m <= math.MaxInt32; m += int64(bpp) * (1 + int64(r.IntN(1<<16))) { // around page boundaries
			ids = append(ids, int32(m-1), int32(m))
		}
		for _, b := range ids {
			require.Equal(t, arena.Page(b/int32(bpp)), a.PageOf(arena.Block(b)), "block %d, %d blocks a page", b, bpp)
		}
	}
}
