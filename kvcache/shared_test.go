package kvcache_test

import (
	"encoding/binary"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/internal/workload/burst"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

// modelData writes a pattern naming the model, sequence and token into every token of the given
// sequences (layer 0 K and the last layer's V) and checks it back through the block tables.
type modelData struct {
	tag byte
	m   *kvcache.Manager
	dev vmm.Device
}

func (d modelData) addr(seq kvcache.SeqID, tok int, blocks []int32, layer, kv int) vmm.Addr {
	c := d.m.Config()
	return d.m.BlockAddr(layer, kv, blocks[tok/c.BlockTokens]) + vmm.Addr(uint64(tok%c.BlockTokens)*c.TokenBytes())
}

func (d modelData) value(seq kvcache.SeqID, tok int) []byte {
	b := make([]byte, 16)
	b[0] = d.tag
	binary.LittleEndian.PutUint64(b[4:], uint64(seq))
	binary.LittleEndian.PutUint32(b[12:], uint32(tok))
	return b
}

func (d modelData) write(t *testing.T, seqs ...kvcache.SeqID) {
	c := d.m.Config()
	for _, s := range seqs {
		blocks, err := d.m.Blocks(s, nil)
		require.NoError(t, err)
		n, _ := d.m.Len(s)
		for tok := range n {
			require.NoError(t, d.dev.CopyIn(d.addr(s, tok, blocks, 0, 0), d.value(s, tok)))
			require.NoError(t, d.dev.CopyIn(d.addr(s, tok, blocks, c.Layers-1, 1), d.value(s, tok)))
		}
	}
}

func (d modelData) check(t *testing.T, seqs ...kvcache.SeqID) {
	c := d.m.Config()
	got := make([]byte, 16)
	for _, s := range seqs {
		blocks, err := d.m.Blocks(s, nil)
		require.NoError(t, err)
		n, _ := d.m.Len(s)
		for tok := range n {
			for _, lk := range [][2]int{{0, 0}, {c.Layers - 1, 1}} {
				require.NoError(t, d.dev.CopyOut(got, d.addr(s, tok, blocks, lk[0], lk[1])))
				require.Equal(t, d.value(s, tok), got, "model %c sequence %d token %d", d.tag, s, tok)
			}
		}
	}
}

func sharedConfig() kvcache.Config { // 2 layers, 64 blocks of 16 tokens per 2 MiB page
	return kvcache.Config{Layers: 2, KVHeads: 2, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		PageSize: 2 << 20, Capacity: 64 * (2 << 20), ReservePages: 1, HighWatermark: 4, NoBackground: true}
}

func ids(from, n int) []kvcache.SeqID {
	out := make([]kvcache.SeqID, n)
	for i := range out {
		out[i] = kvcache.SeqID(from + i)
	}
	return out
}

// Two models under one limit: a model short of memory takes the other's free reserve first,
// then (with CompactOnPressure) compacts it; their blocks never alias; the limit, sleep, wake and
// unregister give memory back that the device reports free.
func TestSharedPool(t *testing.T) {
	for _, viaLedger := range []bool{false, true} {
		name := "one process"
		if viaLedger {
			name = "ledger"
		}
		t.Run(name, func(t *testing.T) { testSharedPool(t, viaLedger) })
	}
}

// testSharedPool runs the shared-pool suite with an in-process budget or through a ledger.
func testSharedPool(t *testing.T, viaLedger bool) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		const page = 2 << 20
		free0, _, err := dev.MemInfo()
		require.NoError(t, err)
		cfg := kvcache.SharedConfig{Limit: 8 * page, CompactOnPressure: true}
		if viaLedger {
			l, err := ledger.Open(filepath.Join(t.TempDir(), "ledger"), ledger.Options{Limit: 8 * page})
			require.NoError(t, err)
			defer l.Close()
			cfg = kvcache.SharedConfig{Ledger: l, CompactOnPressure: true}
		}
		sp, err := kvcache.NewShared(dev, cfg)
		require.NoError(t, err)
		defer func() { require.NoError(t, sp.Close()) }()
		a, err := sp.Register("llama", sharedConfig())
		require.NoError(t, err)
		b, err := sp.Register("qwen", sharedConfig())
		require.NoError(t, err)
		da, db := modelData{'A', a, dev}, modelData{'B', b, dev}

		// A takes 6 pages with 24 sequences of 16 blocks (4 to a page), then every other
		// sequence finishes: 3 pages' worth of holes, no free page.
		for _, s := range ids(0, 24) {
			_, err := a.AppendTokens(s, 16*16, nil)
			require.NoError(t, err)
		}
		for _, s := range ids(0, 24) {
			if s%2 == 1 {
				require.NoError(t, a.FreeSequence(s))
			}
		}
		liveA := []kvcache.SeqID{}
		for _, s := range ids(0, 24) {
			if s%2 == 0 {
				liveA = append(liveA, s)
			}
		}
		da.write(t, liveA...)
		require.Equal(t, 6, a.Stats().MappedPages)

		// B needs 4 pages: 2 are free under the limit, the other 2 come from compacting A.
		_, err = b.AppendTokens(100, 4*64*16, nil)
		require.NoError(t, err)
		db.write(t, 100)
		st := sp.Stats()
		assert.LessOrEqual(t, st.Used, uint64(8*page))
		assert.Equal(t, 4, st.Models[1].MappedPages, "qwen")
		assert.Positive(t, st.Models[0].BlocksMoved, "llama was compacted to make room")
		da.check(t, liveA...)
		db.check(t, 100)
		require.NoError(t, a.Verify())
		require.NoError(t, b.Verify())

		// The regions of the two models never overlap.
		for _, ra := range a.Regions(nil) {
			for _, rb := range b.Regions(nil) {
				assert.True(t, ra.Addr+vmm.Addr(ra.Len) <= rb.Addr || rb.Addr+vmm.Addr(rb.Len) <= ra.Addr, "%v overlaps %v", ra, rb)
			}
		}

		// Nothing left to reclaim: the error names what was asked and what is free.
		before := shape(b.Stats())
		_, err = b.AppendTokens(101, 8*64*16, nil)
		var ce *vmm.CapacityError
		require.ErrorAs(t, err, &ce)
		require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
		assert.EqualValues(t, page, ce.Need)
		require.Equal(t, before, shape(b.Stats()))
		da.check(t, liveA...)
		db.check(t, 100)

		// Half of A's requests finish, leaving holes; lowering the limit then shrinks the models
		// (by compacting A) as far as their live data allows, and the device gets the memory back.
		kept := liveA[:0]
		for i, s := range liveA {
			if i%2 == 1 {
				require.NoError(t, a.FreeSequence(s))
				continue
			}
			kept = append(kept, s)
		}
		liveA = kept
		usedBefore := sp.Stats().Used
		freeBefore, _, err := dev.MemInfo()
		require.NoError(t, err)
		rep, err := sp.SetLimit(4 * page)
		require.NoError(t, err)
		freeAfter, _, err := dev.MemInfo()
		require.NoError(t, err)
		assert.Less(t, rep.Used, usedBefore, "something was returned")
		assert.InDelta(t, float64(usedBefore-rep.Used), float64(freeAfter-freeBefore), float64(dev.Info().Granularity))
		assert.EqualValues(t, 4*page, rep.Limit)
		st = sp.Stats()
		assert.Equal(t, rep.Used, st.Used)
		assert.Equal(t, rep.Used-rep.Limit, rep.Shortfall, "the live data needs more than 4 pages")
		da.check(t, liveA...)
		db.check(t, 100)
		_, err = sp.SetLimit(16 * page)
		require.NoError(t, err)

		// Sleep returns what live data does not need, and everything when nothing is live.
		require.NoError(t, b.FreeSequence(100))
		bMapped := b.Stats().MappedBytes
		freeBefore, _, err = dev.MemInfo()
		require.NoError(t, err)
		sr, err := b.Sleep()
		require.NoError(t, err)
		assert.Zero(t, sr.PagesMapped)
		freeAfter, _, err = dev.MemInfo()
		require.NoError(t, err)
		assert.InDelta(t, float64(bMapped), float64(freeAfter-freeBefore), float64(dev.Info().Granularity), "sleep returns an idle model's pages to the device")
		_, err = b.AppendTokens(102, 1, nil)
		require.ErrorIs(t, err, kvcache.ErrAsleep)
		require.NoError(t, b.Wake())
		_, err = b.AppendTokens(102, 1, nil)
		require.NoError(t, err)
		require.NoError(t, b.FreeSequence(102))
		_, err = a.Sleep()
		require.NoError(t, err)
		assert.Equal(t, 2, a.Stats().MappedPages, "6 live sequences of 16 blocks need 2 pages")
		da.check(t, liveA...)
		require.NoError(t, a.Wake())

		// Unregistering returns every page; the device reports all memory free again.
		require.NoError(t, sp.Unregister("llama"))
		require.NoError(t, sp.Unregister("qwen"))
		assert.Zero(t, sp.Stats().Used)
		free1, _, err := dev.MemInfo()
		require.NoError(t, err)
		assert.InDelta(t, float64(free0), float64(free1), float64(dev.Info().Granularity))
	})
}

func TestSharedPoolBadInput(t *testing.T) {
	dev := hostDevice(t, 2<<20)
	_, err := kvcache.NewShared(dev, kvcache.SharedConfig{})
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 4 << 20})
	require.NoError(t, err)
	defer sp.Close()
	_, err = sp.Register("a", sharedConfig())
	require.NoError(t, err)
	before := sp.Stats()
	_, err = sp.Register("a", sharedConfig())
	require.ErrorIs(t, err, kvcache.ErrExists)
	_, err = sp.Model("b")
	require.ErrorIs(t, err, kvcache.ErrNotFound)
	require.ErrorIs(t, sp.Unregister("b"), kvcache.ErrNotFound)
	_, err = sp.SetLimit(-1)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	bad := sharedConfig()
	bad.Layers = 0
	_, err = sp.Register("c", bad)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	require.Equal(t, before, sp.Stats())
	require.NoError(t, sp.Close())
	_, err = sp.Register("d", sharedConfig())
	require.ErrorIs(t, err, kvcache.ErrClosed)
	_, err = sp.Model("a")
	require.ErrorIs(t, err, kvcache.ErrClosed)
	require.ErrorIs(t, sp.Unregister("a"), kvcache.ErrClosed)
	_, err = sp.SetLimit(4 << 20)
	require.ErrorIs(t, err, kvcache.ErrClosed)
}

// A model name breaking the naming rule (empty, 64 bytes, 5,000 NULs, invalid UTF-8, a control
// character) is refused with a *NameError that names the layer once, by a pool of its own and by
// one on a ledger, and neither gets a model or member; a name of 63 bytes registers.
func TestRegisterNames(t *testing.T) {
	dev := hostDevice(t, 2<<20)
	for _, viaLedger := range []bool{false, true} {
		cfg := kvcache.SharedConfig{Limit: 4 << 20}
		var l *ledger.Ledger
		if viaLedger {
			var err error
			l, err = ledger.Open(filepath.Join(t.TempDir(), "ledger"), ledger.Options{Limit: 4 << 20})
			require.NoError(t, err)
			defer l.Close()
			cfg = kvcache.SharedConfig{Ledger: l}
		}
		sp, err := kvcache.NewShared(dev, cfg)
		require.NoError(t, err)
		defer sp.Close()
		for _, name := range []string{"", strings.Repeat("x", 64), strings.Repeat("\x00", 5000), "bad\xffutf8", "new\nline"} {
			_, err := sp.Register(name, sharedConfig())
			var ne *kvcache.NameError
			require.ErrorAs(t, err, &ne, "%q", name)
			require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
			require.Equal(t, name, ne.Name)
			require.True(t, strings.HasPrefix(err.Error(), "kvcache: register: model name "), err.Error())
			require.NotContains(t, err.Error(), "ledger:")
			require.NotContains(t, err.Error(), "pagedkv:")
			require.Empty(t, sp.Stats().Models, "a refused name adds no model")
			if viaLedger {
				s, err := l.Snapshot()
				require.NoError(t, err)
				require.Empty(t, s.Members, "nor a ledger member")
			}
		}
		good := strings.Repeat("x", 63)
		_, err = sp.Register(good, sharedConfig())
		require.NoError(t, err)
		_, err = sp.Model(good)
		require.NoError(t, err)
		require.NoError(t, sp.Close())
	}
}

// externalMemory maps size bytes the way a runtime would have (not through pagedkv's arena) and
// returns them as External memory.
func externalMemory(t *testing.T, dev vmm.Device, size uint64) vmm.External {
	a := devtest.Mapped(t, dev, size)
	return vmm.External{Addr: a, Size: size, Device: dev.Info().Ordinal, Kind: dev.Info().Kind}
}

// A static manager over memory handed in by the runtime has the same API (the reference traces
// pass on it), never maps or unmaps, and leaves the memory alone on Close.
func TestStaticManager(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		cfg := smallConfig()
		mem := externalMemory(t, dev, 6*(2<<20)+12345)
		m, err := kvcache.NewStatic(dev, cfg, mem)
		require.NoError(t, err)
		h := newHarnessOn(t, dev, m, true, 0)
		x := uint32(99)
		next := func() byte { x ^= x << 13; x ^= x >> 17; x ^= x << 5; return byte(x) }
		for range 300 {
			h.step(next(), next(), next(), arg{n: next() | 0x80})
		}
		st := m.Stats()
		assert.Equal(t, 6, st.MappedPages)
		assert.Zero(t, st.SyncMaps+st.BackgroundMaps+st.Unmaps, "static memory is never mapped or unmapped")
		regions := m.Regions(nil)
		require.Len(t, regions, 1)
		assert.Equal(t, mem.Addr, regions[0].Addr)
		require.NoError(t, m.Close())
		// The memory is still the runtime's, intact and accessible.
		require.NoError(t, dev.Memset(mem.Addr, 7, mem.Size))

		_, err = kvcache.NewStatic(dev, cfg, vmm.External{Addr: mem.Addr, Size: 1 << 20})
		var tse *kvcache.TooSmallError
		require.ErrorAs(t, err, &tse)
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
		_, err = kvcache.NewStatic(dev, cfg, vmm.External{Addr: mem.Addr + 8, Size: 4 << 20})
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	})
}

func TestDescriptors(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	m := newManager(t, dev, tinyConfig())
	gen0 := m.MapGeneration()
	for i := range 3 {
		_, err := m.AppendTokens(kvcache.SeqID(i), 16, nil) // one page each
		require.NoError(t, err)
	}
	require.Greater(t, m.MapGeneration(), gen0)
	regions := m.Regions(nil)
	require.Len(t, regions, 1, "three adjacent pages are one region")
	assert.Equal(t, m.Base(), regions[0].Addr)
	assert.Equal(t, 3*m.Config().PageSize, regions[0].Len)
	addr, length, devID, kind := regions[0].NIXL()
	assert.Equal(t, uint64(m.Base()), addr)
	assert.Equal(t, 3*m.Config().PageSize, length)
	assert.Zero(t, devID)
	assert.Equal(t, "DRAM", kind)
	require.NoError(t, m.FreeSequence(1))
	require.NoError(t, m.Settle())
	l := m.Layout()
	blocks, _ := m.Blocks(2, nil)
	assert.Equal(t, m.BlockAddr(0, 1, blocks[3]), l.Addr(0, 1, blocks[3]))
}

// The bursty two-model trace, CI-sized: with one shared elastic budget each model keeps at
// least 1.5x more sequences live at its peak than with the same memory split in halves.
func TestBurstySharedVsStatic(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	cfg := churnConfig() // 64 blocks of 16 tokens per 256 KiB page
	cfg.Capacity = 256 * cfg.PageSize
	const limit = 64 * (256 << 10)
	opts := burst.Options{Phases: 4, PhaseSteps: 40, AdmitPerStep: 8, PromptTokens: 200}

	mem := externalMemory(t, dev, limit)
	half := vmm.External{Addr: mem.Addr, Size: limit / 2, Kind: mem.Kind}
	other := vmm.External{Addr: mem.Addr + limit/2, Size: limit / 2, Kind: mem.Kind}
	s1, err := kvcache.NewStatic(dev, cfg, half)
	require.NoError(t, err)
	s2, err := kvcache.NewStatic(dev, cfg, other)
	require.NoError(t, err)
	static, err := burst.Run([2]*kvcache.Manager{s1, s2}, opts)
	require.NoError(t, err)
	require.NoError(t, s1.Close())
	require.NoError(t, s2.Close())

	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: limit})
	require.NoError(t, err)
	defer sp.Close()
	e1, err := sp.Register("a", cfg)
	require.NoError(t, err)
	e2, err := sp.Register("b", cfg)
	require.NoError(t, err)
	elastic, err := burst.Run([2]*kvcache.Manager{e1, e2}, opts)
	require.NoError(t, err)
	t.Logf("peak live sequences: static halves %v, shared elastic %v", static.PeakLive, elastic.PeakLive)
	for i := range 2 {
		assert.GreaterOrEqual(t, float64(elastic.PeakLive[i]), 1.5*float64(static.PeakLive[i]), "model %d", i)
	}
}

// Models appending and freeing concurrently under a tight shared limit, with their reserve
// goroutines on, reclaim from each other without deadlock and keep every invariant; the budget
// accounts exactly each model's mapped pages.
func TestSharedPoolConcurrent(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	cfg := tinyConfig()
	cfg.NoBackground = false
	cfg.ReservePages = 2
	cfg.Capacity = 256 * cfg.PageSize
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 40 * cfg.PageSize, CompactOnPressure: true})
	require.NoError(t, err)
	defer sp.Close()
	models := make([]*kvcache.Manager, 2)
	for i := range models {
		models[i], err = sp.Register(string(rune('a'+i)), cfg)
		require.NoError(t, err)
	}
	done := make(chan error, 8)
	for w := range 8 {
		go func() {
			m := models[w%2]
			var slots []int64
			for i := range 400 {
				id := kvcache.SeqID(w*100 + i%7)
				var err error
				if i%5 == 4 {
					err = m.FreeSequence(id)
				} else {
					slots, err = m.AppendTokens(id, 1+i%11, slots[:0])
				}
				if err != nil && !errorsIsAny(err, kvcache.ErrUnknownSequence, kvcache.ErrOutOfMemory) {
					done <- err
					return
				}
			}
			done <- nil
		}()
	}
	for range 8 {
		require.NoError(t, <-done)
	}
	for _, m := range models {
		require.NoError(t, m.Verify()) // includes: the budget holds exactly this model's mapped pages
	}
	assert.LessOrEqual(t, sp.Stats().Used, uint64(40*cfg.PageSize))
	require.NoError(t, sp.Close())
	assert.Zero(t, sp.Stats().Used, "closing returns everything to the budget")
}

// A refusal's numbers agree with Available: when the shared budget, not the model's own arena,
// is what runs out, the *BlocksError of the append it refused says that fewer blocks than it
// needs can be had now (its Free is Available().Blocks), not the pages its Capacity still
// leaves unmapped.
func TestSharedRefusalCountsTheBudget(t *testing.T) {
	dev := hostDevice(t, 2<<20)
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 4 * (2 << 20)})
	require.NoError(t, err)
	defer func() { require.NoError(t, sp.Close()) }()
	a, err := sp.Register("a", sharedConfig())
	require.NoError(t, err)
	b, err := sp.Register("b", sharedConfig())
	require.NoError(t, err)
	const pageTokens = 64 * 16
	refuse := func(m *kvcache.Manager, first kvcache.SeqID) *kvcache.BlocksError {
		for s := first; s < first+64; s++ {
			_, err := m.AppendTokens(s, pageTokens, nil)
			if err == nil {
				continue
			}
			require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
			var be *kvcache.BlocksError
			require.ErrorAs(t, err, &be)
			return be
		}
		t.Fatal("the budget of 4 pages took 64")
		return nil
	}
	refuse(a, 0) // a holds what the budget has
	be := refuse(b, 100)
	av := b.Available()
	require.Zero(t, av.MappableBlocks, "the budget has no room for another page")
	require.Equal(t, av.Blocks, be.Free)
	require.Less(t, be.Free, be.Blocks, "%v", be)
}

// A limit the pool's ledger refuses to set (here, a ledger closed under the pool) is an error
// that names the cause, not a report of a limit that was never set.
func TestSharedSetLimitLedgerFails(t *testing.T) {
	dev := hostDevice(t, 2<<20)
	l, err := ledger.Open(filepath.Join(t.TempDir(), "ledger"), ledger.Options{Limit: 8 << 20})
	require.NoError(t, err)
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l})
	require.NoError(t, err)
	defer func() { require.NoError(t, sp.Close()) }()
	a, err := sp.Register("a", sharedConfig())
	require.NoError(t, err)
	_, err = a.AppendTokens(1, 16, nil)
	require.NoError(t, err)
	require.NoError(t, l.Close())
	rep, err := sp.SetLimit(4 << 20)
	require.ErrorIs(t, err, kvcache.ErrClosed)
	require.Zero(t, rep)
	require.True(t, strings.HasPrefix(err.Error(), "kvcache: set limit: "), err.Error())
}

// A model whose Close fails to unmap a page keeps counting that page against the limit (the
// memory is still mapped), so another model cannot pass the limit; the model stays registered,
// and a later Unregister (or Close) tries again and returns everything.
func TestCloseUnmapFails(t *testing.T) {
	const page = 2 << 20
	fd := vmm.InjectFaults(hostDevice(t, page))
	sp, err := kvcache.NewShared(fd, kvcache.SharedConfig{Limit: 4 * page})
	require.NoError(t, err)
	defer func() { require.NoError(t, sp.Close()) }()
	a, err := sp.Register("a", sharedConfig())
	require.NoError(t, err)
	b, err := sp.Register("b", sharedConfig())
	require.NoError(t, err)
	_, err = a.AppendTokens(1, 2*64*16, nil) // two pages
	require.NoError(t, err)

	require.NoError(t, fd.FailNth(vmm.OpUnmap, 2, nil))
	err = sp.Unregister("a")
	require.ErrorIs(t, err, vmm.ErrInjected)
	fd.Clear()
	assert.EqualValues(t, page, sp.Stats().Used, "the page still mapped still counts")
	_, err = sp.Model("a")
	require.NoError(t, err, "a model that could not give its memory back stays registered")
	_, err = b.AppendTokens(1, 4*64*16, nil)
	require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "four more pages would pass the limit")
	_, err = b.AppendTokens(1, 3*64*16, nil)
	require.NoError(t, err)
	require.NoError(t, b.Verify())

	require.NoError(t, sp.Unregister("a"), "the second try returns the rest")
	assert.EqualValues(t, 3*page, sp.Stats().Used)
	require.ErrorIs(t, a.Close(), kvcache.ErrClosed)
	_, err = sp.Model("a")
	require.ErrorIs(t, err, kvcache.ErrNotFound)
}

// A model closed directly, not unregistered, stays listed until Unregister, and its figures say
// what the budget says: it maps nothing any more.
func TestSharedStatsOfClosedModel(t *testing.T) {
	dev := hostDevice(t, 2<<20)
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 8 << 20})
	require.NoError(t, err)
	defer func() { require.NoError(t, sp.Close()) }()
	a, err := sp.Register("a", sharedConfig())
	require.NoError(t, err)
	_, err = a.AppendTokens(1, 64*16, nil)
	require.NoError(t, err)
	require.NoError(t, a.Close())
	st := sp.Stats()
	require.Len(t, st.Models, 1)
	assert.Zero(t, st.Used)
	assert.Zero(t, st.Models[0].MappedBytes, "the closed model's pages went back to the budget")
	assert.Zero(t, st.Models[0].MappedPages)
	assert.Zero(t, st.Models[0].FullPages)
	assert.Zero(t, st.Models[0].PageOverhead)
}
