package kvcache_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/internal/testutil/gputest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// multiConfig is 2 layers of 4 KV heads, 8 KiB blocks, 4 to a 32 KiB page index (split among
// the devices), 16 page indexes.
func multiConfig() kvcache.Config {
	return kvcache.Config{Layers: 2, KVHeads: 4, HeadDim: 64, ElemSize: 2, BlockTokens: 4,
		PageSize: 32 << 10, Capacity: 16 * (32 << 10), NoBackground: true}
}

// Each device holds its share: the split decides its layers and heads, its stride is the
// model's divided among the devices, and one page index is one mapping on each.
func TestMultiShards(t *testing.T) {
	devs := []vmm.Device{hostDevice(t, 4<<10), hostDevice(t, 4<<10), hostDevice(t, 4<<10), hostDevice(t, 4<<10)}
	m, err := kvcache.NewMulti(devs, multiConfig(), kvcache.Split{TensorParallel: 2, PipelineParallel: 2})
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	sh := m.Shards()
	require.Len(t, sh, 4)
	for d, s := range sh {
		assert.Same(t, devs[d], s.Device)
		assert.Equal(t, [2]int{d / 2, d/2 + 1}, s.Layers, "device %d: pipeline stage %d", d, d/2)
		assert.Equal(t, [2]int{2 * (d % 2), 2*(d%2) + 2}, s.KVHeads, "device %d: tensor rank %d", d, d%2)
		assert.Equal(t, 1, s.Config.Layers)
		assert.Equal(t, 2, s.Config.KVHeads)
		assert.EqualValues(t, 2<<10, s.Config.BlockStride(), "a quarter of the model's 8 KiB")
		assert.EqualValues(t, 8<<10, s.Config.PageSize)
		assert.Equal(t, m.Config().BlocksPerPage(), s.Config.BlocksPerPage())
		assert.Equal(t, s.Base+vmm.Addr(3*s.Config.BlockStride()+s.Config.BlockBytes()), s.BlockAddr(s.Layers[0], 1, 3))
	}
	_, err = m.AppendTokens(1, 5, nil) // two blocks: one page index, one mapping per device
	require.NoError(t, err)
	for d, dev := range devs {
		free, total, _ := dev.MemInfo()
		assert.EqualValues(t, sh[d].Config.PageSize, total-free, "device %d maps its share of the page", d)
	}
	regions := m.Regions(nil)
	require.Len(t, regions, 4, "one region per device")
	assert.EqualValues(t, sh[0].Config.PageSize, regions[0].Len)

	_, err = kvcache.NewMulti(devs[:3], multiConfig(), kvcache.Split{TensorParallel: 2, PipelineParallel: 2})
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	_, err = kvcache.NewMulti([]vmm.Device{devs[0], devs[0]}, multiConfig(), kvcache.Split{TensorParallel: 2})
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument, "a device twice")
	_, err = kvcache.NewMulti(devs[:3], multiConfig(), kvcache.Split{TensorParallel: 3})
	var ce *kvcache.ConfigError
	require.ErrorAs(t, err, &ce, "4 heads do not divide among 3")
}

// faultyHostDevices returns n host devices (4 KiB granularity) behind fault injectors, as
// devices and as injectors.
func faultyHostDevices(t *testing.T, n int) ([]vmm.Device, []*vmm.FaultDevice) {
	devs := make([]vmm.Device, n)
	faults := make([]*vmm.FaultDevice, n)
	for i := range devs {
		faults[i] = vmm.InjectFaults(hostDevice(t, 4<<10))
		devs[i] = faults[i]
	}
	return devs, faults
}

// cudaDevices opens the CUDA devices of ordinals ords, closed when the test ends.
func cudaDevices(t *testing.T, ords []int) []vmm.Device {
	devs := make([]vmm.Device, len(ords))
	for i, o := range ords {
		d, err := vmm.NewCUDADevice(o)
		require.NoError(t, err)
		t.Cleanup(func() { require.NoError(t, d.Close()) })
		devs[i] = d
	}
	return devs
}

// A fault on device k of N, during growth, compaction or the reserve's refill after Wake,
// leaves every device and the manager exactly as before, and it works afterwards.
func TestMultiFaults(t *testing.T) {
	for _, split := range splits[1:] {
		n := max(split.TensorParallel, 1) * max(split.PipelineParallel, 1)
		for k := range n {
			t.Run(fmt.Sprintf("%dx%d/device%d", max(split.TensorParallel, 1), max(split.PipelineParallel, 1), k), func(t *testing.T) {
				devs, faults := faultyHostDevices(t, n)
				h := newMultiHarness(t, devs, multiConfig(), split)
				m := h.m
				for s := range 8 { // two pages of one-block sequences, every other one freed:
					h.step(opAppend, byte(s), 0, arg{n: 4}) // compaction has blocks to move
				}
				for s := 1; s < 8; s += 2 {
					h.step(opFree, byte(s), 0, arg{})
				}
				check := func(name string, op vmm.Op, do func() error) {
					before := shape(m.Stats())
					free0 := freeOf(t, devs)
					require.NoError(t, faults[k].FailNth(op, 1, nil))
					err := do()
					faults[k].Clear()
					require.ErrorIs(t, err, vmm.ErrInjected, name)
					require.Equal(t, before, shape(m.Stats()), name)
					require.Equal(t, free0, freeOf(t, devs), "%s: every device as before", name)
					h.check() // data on every device, through the table
				}
				for _, op := range []vmm.Op{vmm.OpCreate, vmm.OpMap, vmm.OpSetAccess} {
					check("growth: "+string(op), op, func() error {
						_, err := m.AppendTokens(1, 4*4*3, nil) // three new page indexes
						return err
					})
				}
				check("compaction", vmm.OpCopy, func() error { _, err := m.Compact(kvcache.CompactOptions{}); return err })
				_, err := m.Sleep()
				require.NoError(t, err)
				require.NoError(t, m.Wake())
				check("wake", vmm.OpMap, m.Settle)
				// And it works: grows, compacts, and every device reads the right data.
				h.step(opAppend, 1, 0, arg{n: 22})
				h.step(opCompact, 0, 0, arg{})
				require.NoError(t, m.Settle())
				h.check()
			})
		}
	}
}

// The steady-state append path makes no device call: appends inside blocks, on every device.
func TestMultiAppendMakesNoDeviceCall(t *testing.T) {
	appendMakesNoDeviceCall(t, vmm.InjectFaults(hostDevice(t, 4<<10)), vmm.InjectFaults(hostDevice(t, 4<<10)), multiConfig())
}

// appendMakesNoDeviceCall counts every device's calls (through fault devices that fail
// nothing) across three decode steps of 8 sequences inside their blocks.
func appendMakesNoDeviceCall(t *testing.T, d0, d1 *vmm.FaultDevice, cfg kvcache.Config) {
	devs := []vmm.Device{d0, d1}
	m, err := kvcache.NewMulti(devs, cfg, kvcache.Split{TensorParallel: 2})
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	for s := range 8 {
		_, err := m.AppendTokens(kvcache.SeqID(s), 1, nil)
		require.NoError(t, err)
	}
	ops := []vmm.Op{vmm.OpReserve, vmm.OpCreate, vmm.OpMap, vmm.OpSetAccess, vmm.OpUnmap, vmm.OpRelease, vmm.OpCopy, vmm.OpMemInfo}
	count := func() (n int) {
		for _, d := range devs {
			for _, op := range ops {
				n += d.(*vmm.FaultDevice).Calls(op)
			}
		}
		return n
	}
	before := count()
	var slots []int64
	for range 3 { // three decode steps of 8 sequences, inside their blocks
		for s := range 8 {
			slots, err = m.AppendTokens(kvcache.SeqID(s), 1, slots[:0])
			require.NoError(t, err)
		}
	}
	assert.Equal(t, before, count(), "no driver call on the append path")
}

// conversationsOn plays the multi-turn scenario on devs, divided by split: hits exact, and
// every token's value written to and read back from every device's share through the one
// exported table, across compactions (one copy_blocks launch per device).
func conversationsOn(t *testing.T, devs []vmm.Device, split kvcache.Split) {
	// 2 layers, 8 heads of 256 dims: 256 KiB blocks, 16 to a page index (2 MiB on each device).
	// A host tier of two page indexes, which is also a host prefix cache.
	cfg := kvcache.Config{Layers: 2, KVHeads: 8, HeadDim: 256, ElemSize: 2, BlockTokens: 16,
		PageSize: 4 << 20, Capacity: 24 * (4 << 20), NoBackground: true, PrefixCacheBytes: 8 * (4 << 20),
		HostBlocks: 32, HostPrefixCache: true}
	h := newMultiHarness(t, devs, cfg, split)
	conversations(t, h)
	// Swaps on every device: two sequences out together (their blocks to both devices' host
	// tiers), then back one at a time, every token checked through the table.
	for s := byte(5); s < 8; s++ {
		h.step(opAppend, s, 0, exactly(40))
	}
	h.step(opSwapOut, 5, 6, arg{n: 2})
	h.step(opSwapIn, 5, 0, arg{})
	h.step(opSwapIn, 6, 0, arg{})
	st := h.m.Stats()
	require.Positive(t, st.SwapIns)
	t.Logf("%+v: %d compactions moved %d blocks; %d page indexes mapped; %d prompt tokens hit (%d from the host); %d blocks swapped out and in",
		split, st.Compactions, st.BlocksMoved, st.MappedPages, h.hits, st.Prefix.HostHitTokens, st.SwapOuts)
}

// The multi-turn scenario on two host devices, heads or layers divided.
func TestMultiConversations(t *testing.T) {
	for _, split := range []kvcache.Split{{TensorParallel: 2}, {PipelineParallel: 2}} {
		t.Run(fmt.Sprintf("%+v", split), func(t *testing.T) {
			conversationsOn(t, []vmm.Device{hostDevice(t, 2<<20), hostDevice(t, 2<<20)}, split)
		})
	}
}

// The same on two GPUs.
func TestMultiOnGPUs(t *testing.T) {
	ords := gputest.RequireN(t, 2)
	for _, split := range []kvcache.Split{{TensorParallel: 2}, {PipelineParallel: 2}} {
		t.Run(fmt.Sprintf("%+v", split), func(t *testing.T) {
			leakcheck.Check(t)
			conversationsOn(t, cudaDevices(t, ords), split)
		})
	}
	t.Run("host prefix cache", func(t *testing.T) {
		leakcheck.Check(t)
		hostCacheScenario(t, newMultiHarness(t, cudaDevices(t, ords), multiHostCacheConfig(), kvcache.Split{TensorParallel: 2}))
	})
	t.Run("no driver call on the append path", func(t *testing.T) {
		d0, err := vmm.NewCUDADevice(ords[0])
		require.NoError(t, err)
		defer func() { require.NoError(t, d0.Close()) }()
		d1, err := vmm.NewCUDADevice(ords[1])
		require.NoError(t, err)
		defer func() { require.NoError(t, d1.Close()) }()
		appendMakesNoDeviceCall(t, vmm.InjectFaults(d0), vmm.InjectFaults(d1), kvcache.Config{Layers: 2, KVHeads: 4, HeadDim: 128,
			ElemSize: 2, BlockTokens: 16, PageSize: 4 << 20, Capacity: 4 * (4 << 20), NoBackground: true})
	})
}

// Two models share two devices, each model's heads divided between them, under a limit per
// device: a busy model takes the pages the idle one frees on both devices, no device ever maps
// beyond its limit, and every token's data stays right.
func TestMultiSharedPool(t *testing.T) {
	devs := []vmm.Device{hostDevice(t, 4<<10), hostDevice(t, 4<<10)}
	const perDevice = 6 * (16 << 10) // six pages of each model on each device
	s, err := kvcache.NewSharedMulti(devs, kvcache.SharedConfig{Limit: perDevice, Split: kvcache.Split{TensorParallel: 2}})
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close()) }()
	a, err := s.Register("a", multiConfig())
	require.NoError(t, err)
	b, err := s.Register("b", multiConfig())
	require.NoError(t, err)
	ha, hb := newHarnessOn(t, devs[0], a, false, 0), newHarnessOn(t, devs[0], b, false, 0)
	ha.noMemCheck, hb.noMemCheck = true, true // two managers share the devices
	for i := range 5 {
		ha.step(opAppend, byte(i), 0, arg{n: 16}) // a: 5 pages' worth
	}
	for i := range 5 {
		hb.step(opAppend, byte(i), 0, arg{n: 4}) // b cannot have more than the one page left
	}
	st := s.Stats()
	require.Len(t, st.Devices, 2)
	for _, d := range st.Devices {
		assert.LessOrEqual(t, d.Used, uint64(perDevice), "%s within its limit", d.Name)
	}
	for i := range 5 { // a finishes and returns its pages; b grows into them on both devices
		ha.step(opFree, byte(i), 0, arg{})
	}
	require.NoError(t, a.Settle())
	require.Positive(t, hb.ooms, "b was held to the page a left it")
	hb.ooms = 0
	for i := range 5 {
		hb.step(opAppend, byte(i), 0, arg{n: 16})
	}
	assert.Zero(t, hb.ooms, "b got a's pages back")
	for _, d := range s.Stats().Devices {
		assert.LessOrEqual(t, d.Used, uint64(perDevice), "%s within its limit", d.Name)
		free, total, _ := devs[0].MemInfo()
		assert.LessOrEqual(t, total-free, uint64(perDevice))
	}
	rep, err := s.SetLimit(4 * (16 << 10))
	require.NoError(t, err)
	assert.LessOrEqual(t, rep.Used, uint64(perDevice))
	ha.check()
	hb.check()
}

// hostDevices returns n host devices of 4 KiB granularity.
func hostDevices(t *testing.T, n int) []vmm.Device {
	devs := make([]vmm.Device, n)
	for i := range devs {
		devs[i] = hostDevice(t, 4<<10)
	}
	return devs
}

// NewMulti copies heads fewer than the ranks as a Hybrid's groups do: 2 KV heads over 4 ranks,
// ranks 0 and 1 holding head 0, ranks 2 and 3 head 1; every device's data reads back through
// the one table across growth and compaction.
func TestMultiCopiedHeads(t *testing.T) {
	devs := hostDevices(t, 4)
	cfg := multiConfig()
	cfg.KVHeads = 2
	h := newMultiHarness(t, devs, cfg, kvcache.Split{TensorParallel: 4})
	for d, s := range h.m.Shards() {
		assert.Equal(t, [2]int{d / 2, d/2 + 1}, s.KVHeads, "device %d", d)
		assert.Equal(t, 1, s.Config.KVHeads)
		assert.Equal(t, h.m.Config().BlocksPerPage(), s.Config.BlocksPerPage())
	}
	assert.Equal(t, 4, h.m.Config().KVHeads, "a copy of a head on each rank")
	for s := range 8 {
		h.step(opAppend, byte(s), 0, arg{n: 9})
	}
	for s := 1; s < 8; s += 2 {
		h.step(opFree, byte(s), 0, arg{})
	}
	h.step(opCompact, 0, 0, arg{})
	h.check()
	_, err := kvcache.NewMulti(devs[:3], cfg, kvcache.Split{TensorParallel: 3})
	var ce *kvcache.ConfigError
	require.ErrorAs(t, err, &ce, "2 heads do not divide 3 ranks")
}

// NewMulti divides a recurrent state among the ranks: each device holds half of every layer's
// state, and a page index holds as many states on each device as the manager counts.
func TestMultiDividedState(t *testing.T) {
	devs := hostDevices(t, 2)
	cfg := kvcache.Config{Layers: 2, StateBytes: 4096, PageSize: 4 * 2 * 4096, Capacity: 16 * 4 * 2 * 4096, NoBackground: true}
	m, err := kvcache.NewMulti(devs, cfg, kvcache.Split{TensorParallel: 2})
	require.NoError(t, err)
	defer func() { require.NoError(t, m.Close()) }()
	for _, s := range m.Shards() {
		assert.EqualValues(t, 2048, s.Config.StateBytes)
		assert.Equal(t, m.Config().BlocksPerPage(), s.Config.BlocksPerPage())
	}
	assert.Equal(t, 4, m.Config().BlocksPerPage())
	for s := range 6 {
		_, err := m.AppendTokens(kvcache.SeqID(s), 3, nil)
		require.NoError(t, err)
	}
	require.Equal(t, 2, m.Stats().MappedPages, "6 states, 4 a page")
	require.NoError(t, m.Verify())
	cfg.StateBytes = 4096 + 16
	cfg.PageSize, cfg.Capacity = 0, 0
	_, err = kvcache.NewMulti(devs, cfg, kvcache.Split{TensorParallel: 2})
	var ce *kvcache.ConfigError
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, "StateBytes", ce.Field)
}

// An unmap failing on one device while SetLimit shrinks a model below what it holds leaves
// every page index mapped on all devices or on none: the undo maps the page again on the
// devices that had unmapped it, though their budgets are over the new limit. Every device's
// memory matches its budget and the arena, and the data reads back.
func TestMultiShrinkUnmapFails(t *testing.T) {
	const page = 16 << 10 // a device's share of a page index
	for k := range 2 {
		for call := 1; ; call++ {
			devs, faults := faultyHostDevices(t, 2)
			free0 := freeOf(t, devs)
			s, err := kvcache.NewSharedMulti(devs, kvcache.SharedConfig{Limit: 8 * page, CompactOnPressure: true, Split: kvcache.Split{TensorParallel: 2}})
			require.NoError(t, err)
			cfg := multiConfig()
			cfg.HighWatermark = 8 // freed pages stay mapped until the limit falls
			a, err := s.Register("a", cfg)
			require.NoError(t, err)
			h := newHarnessOn(t, devs[0], a, false, free0)
			for seq := range 4 {
				h.step(opAppend, byte(seq), 0, arg{n: 16}) // a page index each
			}
			for seq := 1; seq < 4; seq++ {
				h.step(opFree, byte(seq), 0, arg{})
			}
			require.NoError(t, faults[k].FailNth(vmm.OpUnmap, call, nil))
			_, err = s.SetLimit(page)
			hit := faults[k].Calls(vmm.OpUnmap) >= call
			faults[k].Clear()
			require.NoError(t, err)
			h.check() // Verify: every page index the arena maps is mapped on each device
			for d, use := range s.Stats().Devices {
				free, total, err := devs[d].MemInfo()
				require.NoError(t, err)
				assert.Equal(t, total-free, use.Used, "device %d %s call %d on device %d: its budget counts what it maps", d, vmm.OpUnmap, call, k)
			}
			_, err = s.SetLimit(8 * page)
			require.NoError(t, err)
			h.step(opAppend, 2, 0, arg{n: 20}) // and it grows again on both devices
			require.NoError(t, s.Close())
			if !hit {
				break
			}
		}
	}
}
