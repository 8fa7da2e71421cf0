package kvcache_test

import (
	"fmt"
	"math"
	"math/bits"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

func TestConfigLayout(t *testing.T) {
	c := kvcache.Config{Layers: 32, KVHeads: 8, HeadDim: 128, ElemSize: 2, BlockTokens: 16}
	require.NoError(t, c.Validate())
	assert.EqualValues(t, 8*128*2, c.TokenBytes())
	assert.EqualValues(t, 32<<10, c.BlockBytes())
	assert.EqualValues(t, 2<<20, c.BlockStride(), "all 64 K|V layer blocks of one block id are adjacent")
	assert.EqualValues(t, 0, c.LayerOffset(0, 0))
	assert.EqualValues(t, 32<<10, c.LayerOffset(0, 1))
	assert.EqualValues(t, 63*(32<<10), c.LayerOffset(31, 1))
	assert.EqualValues(t, 5*(2<<20)+3*(32<<10), c.Offset(1, 1, 5))
	c.PageSize = 128 << 20
	assert.Equal(t, 64, c.BlocksPerPage())

	bad := []kvcache.Config{
		{KVHeads: 8, HeadDim: 128, ElemSize: 2, BlockTokens: 16},
		{Layers: 1, KVHeads: 8, HeadDim: -1, ElemSize: 2, BlockTokens: 16},
		{Layers: 1, KVHeads: 8, HeadDim: 128, ElemSize: 2, BlockTokens: 0},
		{Layers: 2, KVHeads: 8, HeadDim: 128, ElemSize: 2, BlockTokens: 16, PageSize: 3<<20 + 64<<10},
	}
	for _, c := range bad {
		require.ErrorIs(t, c.Validate(), kvcache.ErrInvalidArgument, "%+v", c)
	}
}

// One page index grows every layer's K and V with one driver mapping, and a block's address for
// every layer lies inside the page the block belongs to.
func TestOneMappingGrowsEveryLayer(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		cfg := kvcache.Config{Layers: 4, KVHeads: 2, HeadDim: 128, ElemSize: 2, BlockTokens: 16, NoBackground: true, ReservePages: -1, Capacity: 64 << 20}
		m := newManager(t, dev, cfg)
		c := m.Config()
		assert.EqualValues(t, 2*4*dev.Info().Granularity, c.PageSize, "default page: one granule per layer and K|V")
		slots, err := m.AppendTokens(1, 1, nil)
		require.NoError(t, err)
		st := m.Stats()
		assert.Equal(t, 1, st.MappedPages)
		assert.EqualValues(t, 1, st.SyncMaps, "one mapping")
		b := int32(slots[0] / int64(c.BlockTokens))
		for l := range c.Layers {
			for kv := range 2 {
				a := m.BlockAddr(l, kv, b)
				assert.Equal(t, m.LayerBase(l, kv)+vmm.Addr(uint64(b)*c.BlockStride()), a)
				require.NoError(t, dev.Memset(a, byte(1+l*2+kv), c.BlockBytes()), "layer %d kv %d is mapped", l, kv)
			}
		}
		for l := range c.Layers {
			for kv := range 2 {
				got := make([]byte, 1)
				require.NoError(t, dev.CopyOut(got, m.BlockAddr(l, kv, b)+vmm.Addr(c.BlockBytes()-1)))
				assert.Equal(t, byte(1+l*2+kv), got[0])
			}
		}
	})
}

func TestSequenceAwarePlacement(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	m := newManager(t, dev, tinyConfig()) // 4 blocks of 4 tokens per page
	var err error
	// A fills page 0 and continues on page 1; B starts on page 1 next to it.
	_, err = m.AppendTokens(1, 4*4+1, nil)
	require.NoError(t, err)
	_, err = m.AppendTokens(2, 1, nil)
	require.NoError(t, err)
	a, _ := m.Blocks(1, nil)
	b, _ := m.Blocks(2, nil)
	assert.Equal(t, []int32{0, 1, 2, 3, 4}, a)
	assert.Equal(t, []int32{5}, b)
	// A's next block goes to its own page (1) while it has room.
	_, err = m.AppendTokens(1, 4, nil)
	require.NoError(t, err)
	a, _ = m.Blocks(1, nil)
	assert.Equal(t, int32(6), a[len(a)-1])
	// Freeing A empties page 0 entirely: whole pages come free.
	require.NoError(t, m.FreeSequence(1))
	st := m.Stats()
	assert.Equal(t, 1, st.FreePages)
	assert.Equal(t, 1, st.PartialPages)
	// The next new sequence takes the lowest page with room: page 1, beside B, not free page 0.
	_, err = m.AppendTokens(3, 1, nil)
	require.NoError(t, err)
	c, _ := m.Blocks(3, nil)
	assert.Equal(t, []int32{4}, c)
	require.NoError(t, m.Verify())
}

func TestBadInputChangesNothing(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	cfg := tinyConfig()
	cfg.Capacity = 2 * cfg.PageSize
	m := newManager(t, dev, cfg)
	_, err := m.AppendTokens(1, 10, nil)
	require.NoError(t, err)
	require.NoError(t, m.Fork(1, 2))
	before := shape(m.Stats())
	blocks, _ := m.Blocks(1, nil)

	var ce *kvcache.CountError
	var se *kvcache.SequenceError
	var capErr *vmm.CapacityError
	cases := []struct {
		name string
		do   func() error
		want error
	}{
		{"negative append", func() error { _, err := m.AppendTokens(1, -1, nil); return err }, kvcache.ErrInvalidArgument},
		{"append past what is free", func() error { _, err := m.AppendTokens(1, 30, nil); return err }, kvcache.ErrOutOfMemory},
		{"append to new sequence past what is free", func() error { _, err := m.AppendTokens(9, 25, nil); return err }, kvcache.ErrOutOfMemory},
		{"append past the arena", func() error { _, err := m.AppendTokens(1, 100, nil); return err }, kvcache.ErrTooLarge},
		{"append to new sequence past the arena", func() error { _, err := m.AppendTokens(9, 33, nil); return err }, kvcache.ErrTooLarge},
		{"append past a sequence's length", func() error { _, err := m.AppendTokens(1, math.MaxInt, nil); return err }, kvcache.ErrTooLarge},
		{"append past a new sequence's length", func() error { _, err := m.AppendTokens(9, math.MaxInt, nil); return err }, kvcache.ErrTooLarge},
		{"append 2^40", func() error { _, err := m.AppendTokens(9, 1<<40, nil); return err }, kvcache.ErrTooLarge},
		{"free unknown", func() error { return m.FreeSequence(7) }, kvcache.ErrUnknownSequence},
		{"fork unknown", func() error { return m.Fork(7, 8) }, kvcache.ErrUnknownSequence},
		{"fork onto existing", func() error { return m.Fork(1, 2) }, kvcache.ErrSequenceExists},
		{"add existing", func() error { return m.AddSequence(2) }, kvcache.ErrSequenceExists},
		{"truncate unknown", func() error { return m.Truncate(7, 1) }, kvcache.ErrUnknownSequence},
		{"truncate negative", func() error { return m.Truncate(1, -1) }, kvcache.ErrInvalidArgument},
		{"truncate too many", func() error { return m.Truncate(1, 11) }, kvcache.ErrInvalidArgument},
		{"len unknown", func() error { _, err := m.Len(7); return err }, kvcache.ErrUnknownSequence},
		{"slots out of range", func() error { _, err := m.Slots(1, 0, 11, nil); return err }, kvcache.ErrInvalidArgument},
	}
	for _, c := range cases {
		err := c.do()
		require.ErrorIs(t, err, c.want, c.name)
		require.ErrorAs(t, err, &se, c.name)
		if c.want == kvcache.ErrInvalidArgument && c.name != "slots out of range" {
			require.ErrorAs(t, err, &ce, c.name)
		}
		if c.want == kvcache.ErrOutOfMemory || c.want == kvcache.ErrTooLarge {
			var be *kvcache.BlocksError
			require.ErrorAs(t, err, &be, c.name)
			assert.Equal(t, 8, be.Max, "%s: the arena's blocks", c.name)
			assert.Positive(t, be.Blocks, c.name)
			if hi, lo := bits.Mul64(uint64(be.Blocks), cfg.BlockStride()); hi == 0 {
				assert.Equal(t, lo, be.Bytes, c.name)
			} else {
				assert.Equal(t, uint64(math.MaxUint64), be.Bytes, "%s: bytes saturate, never wrap", c.name)
			}
		}
		if c.want == kvcache.ErrOutOfMemory {
			require.ErrorAs(t, err, &capErr, c.name)
			assert.Equal(t, cfg.PageSize, capErr.Need)
			require.NotErrorIs(t, err, kvcache.ErrTooLarge, c.name)
		}
		if c.want == kvcache.ErrTooLarge {
			require.NotErrorIs(t, err, kvcache.ErrOutOfMemory, c.name)
		}
		require.Equal(t, before, shape(m.Stats()), c.name)
		got, _ := m.Blocks(1, nil)
		require.Equal(t, blocks, got, c.name)
		_, err = m.Len(9)
		require.ErrorIs(t, err, kvcache.ErrUnknownSequence, "a failed append must not leave a new sequence behind")
		require.NoError(t, m.Verify())
	}
	assert.Contains(t, fmt.Sprint(func() error { return m.FreeSequence(7) }()), "sequence 7")
}

func TestClosedManager(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	m, err := kvcache.New(dev, tinyConfig())
	require.NoError(t, err)
	_, err = m.AppendTokens(1, 5, nil)
	require.NoError(t, err)
	require.NoError(t, m.Close())
	_, err = m.AppendTokens(1, 1, nil)
	require.ErrorIs(t, err, kvcache.ErrClosed)
	require.ErrorIs(t, m.FreeSequence(1), kvcache.ErrClosed)
	require.ErrorIs(t, m.Close(), kvcache.ErrClosed)
	require.ErrorIs(t, m.Settle(), kvcache.ErrClosed)
}

// A driver failure while growing (or while copying a shared tail) leaves the manager exactly
// as before, and it works afterwards.
func TestFaultDuringGrowth(t *testing.T) {
	backends(t, func(t *testing.T, base vmm.Device) {
		dev := vmm.InjectFaults(base)
		m := newManager(t, dev, smallConfig())
		bpp := m.Stats().BlocksPerPage
		bt := m.Config().BlockTokens
		// Fill page 0 exactly, so the next block needs a new page.
		_, err := m.AppendTokens(1, bpp*bt-3, nil)
		require.NoError(t, err)
		require.NoError(t, m.Fork(1, 2))
		check := func(name string, op vmm.Op, do func() error) {
			before := shape(m.Stats())
			b1, _ := m.Blocks(1, nil)
			b2, _ := m.Blocks(2, nil)
			dev.FailNth(op, 1, nil)
			err := do()
			dev.Clear()
			require.ErrorIs(t, err, vmm.ErrInjected, name)
			require.Equal(t, before, shape(m.Stats()), name)
			a1, _ := m.Blocks(1, nil)
			a2, _ := m.Blocks(2, nil)
			require.Equal(t, b1, a1, name)
			require.Equal(t, b2, a2, name)
			require.NoError(t, m.Verify(), name)
		}
		grow := func() error { _, err := m.AppendTokens(3, 1, nil); return err }
		check("create fails", vmm.OpCreate, grow)
		check("map fails", vmm.OpMap, grow)
		check("set access fails", vmm.OpSetAccess, grow)
		check("tail copy fails", vmm.OpCopy, func() error { _, err := m.AppendTokens(2, 1, nil); return err })
		// A multi-page append whose second page fails unmaps the first again.
		check("second page of a prefill fails", vmm.OpMap, func() error {
			dev.FailNth(vmm.OpMap, 2, nil)
			_, err := m.AppendTokens(3, 2*bpp*bt, nil)
			return err
		})
		_, err = m.AppendTokens(3, 1, nil)
		require.NoError(t, err)
		_, err = m.AppendTokens(2, 1, nil)
		require.NoError(t, err)
		assert.EqualValues(t, 1, m.Stats().CopyOnWrites)
		require.NoError(t, m.Verify())
	})
}

// Traces on both backends with the driver's granularity, swaps to pinned host memory among
// them: the reference check reads every token back through the block tables from device memory.
func TestTracesOnBackends(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		h := newHarness(t, dev, swapConfig())
		x := uint32(12345)
		next := func() byte { x ^= x << 13; x ^= x >> 17; x ^= x << 5; return byte(x) }
		for range 300 {
			h.step(next(), next(), next(), arg{n: next() | 0x80})
		}
		require.Positive(t, h.m.Stats().CopyOnWrites)
		require.Positive(t, h.m.Stats().SwapIns)
	})
}

// With the reserve goroutine on, appends, forks, truncates and frees from many goroutines keep
// every invariant. The goroutine fills the reserve on its own, however it is scheduled.
func TestConcurrentUseWithReserve(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	cfg := tinyConfig()
	cfg.NoBackground = false
	cfg.ReservePages = 4
	cfg.Capacity = 4096 * cfg.PageSize
	m := newManager(t, dev, cfg)
	require.Eventually(t, func() bool { return m.Stats().FreePages >= cfg.ReservePages }, time.Minute, time.Millisecond,
		"the reserve goroutine fills the reserve") // a minute: a hang guard, not a deadline
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var slots []int64
			for i := range 300 {
				id := kvcache.SeqID(w*1000 + i%5)
				var err error
				switch i % 7 {
				case 5:
					err = m.Truncate(id, 1)
				case 6:
					err = m.FreeSequence(id)
				default:
					slots, err = m.AppendTokens(id, 1+i%9, slots[:0])
				}
				if err != nil && !errorsIsAny(err, kvcache.ErrUnknownSequence, kvcache.ErrInvalidArgument) {
					t.Error(err)
					return
				}
				if i%50 == 0 {
					if err := m.Verify(); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	require.NoError(t, m.Verify())
	st := m.Stats()
	assert.GreaterOrEqual(t, st.BackgroundMaps, uint64(cfg.ReservePages))
	assert.Nil(t, st.ReserveErr)
}

func TestExports(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	m := newManager(t, dev, tinyConfig())
	_, err := m.AppendTokens(10, 9, nil) // 3 blocks, last holds 1 token
	require.NoError(t, err)
	_, err = m.AppendTokens(20, 4, nil) // 1 full block
	require.NoError(t, err)
	b10, _ := m.Blocks(10, nil)
	b20, _ := m.Blocks(20, nil)

	v := devtest.VLLM(t, 4, 4, -1)
	require.NoError(t, m.ExportVLLM([]kvcache.SeqID{20, 10}, v))
	assert.Equal(t, 2, v.Rows)
	assert.Equal(t, []int32{b20[0], -1, -1, -1, b10[0], b10[1], b10[2], -1}, v.Table())
	assert.Equal(t, []int32{4, 9}, v.Lens())

	f := devtest.FlashInfer(t, 4, 16, 4)
	require.NoError(t, m.ExportFlashInfer([]kvcache.SeqID{10, 20}, f))
	assert.Equal(t, []int32{0, 3, 4}, f.Indptr[:3])
	assert.Equal(t, []int32{b10[0], b10[1], b10[2], b20[0]}, f.Indices[:f.NNZ()])
	assert.Equal(t, []int32{1, 4}, f.LastPageLen[:2])

	slots, err := m.Slots(10, 7, 9, nil)
	require.NoError(t, err)
	assert.Equal(t, []int64{int64(b10[1])*4 + 3, int64(b10[2]) * 4}, slots)
	want, err := blocktable.AppendSlots(nil, b10, 4, 7, 9)
	require.NoError(t, err)
	assert.Equal(t, slots, want)

	require.ErrorIs(t, m.ExportVLLM([]kvcache.SeqID{10, 99}, v), kvcache.ErrUnknownSequence)
	assert.Zero(t, v.Rows, "a failed export leaves the table empty")
	small := devtest.VLLM(t, 4, 2, 0)
	require.ErrorIs(t, m.ExportVLLM([]kvcache.SeqID{10}, small), kvcache.ErrTooLarge)
	require.ErrorIs(t, m.ExportFlashInfer([]kvcache.SeqID{10}, devtest.FlashInfer(t, 4, 16, 16)), kvcache.ErrInvalidArgument)

	allocs := testing.AllocsPerRun(50, func() {
		_ = m.ExportVLLM([]kvcache.SeqID{20, 10}, v)
		_ = m.ExportFlashInfer([]kvcache.SeqID{20, 10}, f)
	})
	assert.Zero(t, allocs, "exports allocate nothing")
}

func errorsIsAny(err error, targets ...error) bool {
	for _, t := range targets {
		if errorIs(err, t) {
			return true
		}
	}
	return false
}

// The ways a new user broke the manager from outside (issue 9): each is now a typed error with
// the numbers, changes nothing, and leaves the manager usable.
func TestNoInputBreaksTheManager(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	m := newManager(t, dev, tinyConfig())
	_, err := m.AppendTokens(1, 10, nil)
	require.NoError(t, err)
	before := shape(m.Stats())
	usable := func(name string) {
		t.Helper()
		require.Equal(t, before, shape(m.Stats()), name)
		n, err := m.Len(1)
		require.NoError(t, err, "%s: the lock was released", name)
		require.Equal(t, 10, n, name)
		require.NoError(t, m.Verify(), name)
	}

	// MaxInt tokens on an existing sequence: no wrap-around of its length.
	_, err = m.AppendTokens(1, math.MaxInt, nil)
	var be *kvcache.BlocksError
	require.ErrorIs(t, err, kvcache.ErrTooLarge)
	require.ErrorAs(t, err, &be)
	assert.Equal(t, math.MaxInt, be.Tokens)
	assert.Equal(t, 10, be.SeqTokens)
	usable("MaxInt on an existing sequence")
	slots, err := m.AppendTokens(1, 1, nil) // the next append works (it panicked before)
	require.NoError(t, err)
	require.Len(t, slots, 1)
	require.NoError(t, m.Truncate(1, 1))

	// MaxInt on a sequence that does not exist: no panic, no held lock, no sequence left behind.
	_, err = m.AppendTokens(2, math.MaxInt, nil)
	require.ErrorIs(t, err, kvcache.ErrTooLarge)
	_, err = m.Len(2)
	require.ErrorIs(t, err, kvcache.ErrUnknownSequence)
	usable("MaxInt on a new sequence")

	// 2^40 tokens: too large, not "out of memory now", with what was asked and what the arena holds.
	_, err = m.AppendTokens(3, 1<<40, nil)
	require.ErrorIs(t, err, kvcache.ErrTooLarge)
	require.NotErrorIs(t, err, kvcache.ErrOutOfMemory)
	require.ErrorAs(t, err, &be)
	assert.Equal(t, 1<<40, be.Tokens)
	assert.Equal(t, 1<<40/4, be.Blocks)
	assert.Equal(t, uint64(1<<40/4)*tinyConfig().BlockStride(), be.Bytes)
	assert.Equal(t, 64*4, be.Max, "64 pages of 4 blocks")
	usable("2^40 tokens")

	// A nil table.
	require.ErrorIs(t, m.ExportVLLM([]kvcache.SeqID{1}, nil), kvcache.ErrInvalidArgument)
	require.ErrorIs(t, m.ExportFlashInfer([]kvcache.SeqID{1}, nil), kvcache.ErrInvalidArgument)
	usable("nil tables")

	// An absurd geometry: a *ConfigError, not a divide by zero.
	for _, c := range []kvcache.Config{
		{Layers: 1 << 30, KVHeads: 1, HeadDim: 1 << 30, ElemSize: 2, BlockTokens: 16},
		{Layers: math.MaxInt, KVHeads: math.MaxInt, HeadDim: math.MaxInt, ElemSize: math.MaxInt, BlockTokens: math.MaxInt},
		{Layers: 2, KVHeads: 2, HeadDim: 64, ElemSize: 2, BlockTokens: 16, Capacity: math.MaxUint64},
	} {
		_, err := kvcache.New(dev, c)
		var ce *kvcache.ConfigError
		require.ErrorAs(t, err, &ce, "%+v", c)
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	}
	_, err = kvcache.New(nil, tinyConfig())
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
}
