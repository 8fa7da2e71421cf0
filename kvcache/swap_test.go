package kvcache_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// exactly is the argument of a step with count n.
func exactly(n int) arg { return arg{full: true, wide: int64(n)} }

// swapConfig is smallConfig with a host tier of two pages (128 blocks).
func swapConfig() kvcache.Config {
	cfg := smallConfig()
	cfg.HostBlocks = 128
	return cfg
}

// Swapped-out sequences keep their data while other sequences reuse (and overwrite) the device
// blocks they gave up. A block shared with a sequence that stays is copied (the one that stays
// keeps it); one shared by two swapped sequences is copied once and stays shared on the host.
// Swapped back in, every token reads back through the table.
func TestSwapRoundTrip(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		h := newHarness(t, dev, swapConfig())
		m := h.m
		bt := h.cfg.BlockTokens
		h.step(opAppend, 0, 0, exactly(3*bt+5)) // four blocks
		h.step(opFork, 0, 1, arg{})             // 1 shares them
		h.step(opAppend, 1, 0, exactly(2*bt))   // and copies the tail: 3 shared, 3 of its own
		h.step(opAppend, 2, 0, exactly(2*bt+1)) // three blocks
		require.Equal(t, 10, m.Stats().LiveBlocks)

		swap := func(out bool, ids ...kvcache.SeqID) *kvcache.Swap {
			t.Helper()
			var sw *kvcache.Swap
			var err error
			if out {
				sw, err = m.SwapOut(ids, 0)
			} else {
				sw, err = m.SwapIn(ids, 0)
			}
			require.NoError(t, err)
			require.NoError(t, sw.Wait())
			done, err := sw.Done()
			require.NoError(t, err)
			require.True(t, done, "done after Wait")
			require.NoError(t, sw.Close())
			if out {
				h.ref.swapOut(ids)
			} else {
				h.ref.swapIn(ids)
			}
			h.check() // the sequences on the device, through the table; the host tier's counts
			return sw
		}
		sw := swap(true, 1) // 0 stays: it keeps the three shared blocks
		require.Equal(t, 6, sw.Blocks, "all six of 1's blocks, the shared ones copied")
		assert.EqualValues(t, 6*h.cfg.BlockStride(), sw.Bytes)
		assert.Equal(t, 7, m.Stats().LiveBlocks, "1's own three went free")
		assert.Equal(t, 128-6, m.Stats().HostFreeBlocks)

		swap(true, 0, 2)
		assert.Equal(t, 3, m.Stats().SwappedSequences)
		assert.Zero(t, m.Stats().LiveBlocks, "nothing left on the device")
		assert.Equal(t, 128-6-7, m.Stats().HostFreeBlocks)

		for s := byte(3); s < 6; s++ { // new sequences take (and overwrite) the freed blocks
			h.step(opAppend, s, 0, exactly(4*bt))
		}
		h.step(opFork, 3, 6, arg{})
		sw = swap(true, 3, 6) // shared by both: copied once, shared on the host
		require.Equal(t, 4, sw.Blocks)
		sw = swap(false, 6, 3) // and shared again on the device
		require.Equal(t, 4, sw.Blocks)
		for _, s := range []kvcache.SeqID{1, 0, 2} {
			swap(false, s)
		}
		assert.Equal(t, 128, m.Stats().HostFreeBlocks, "every host block is free again")
		assert.EqualValues(t, 6+7+4, m.Stats().SwapOuts)
		assert.EqualValues(t, 4+6+4+3, m.Stats().SwapIns)
		for s := byte(0); s < 7; s++ { // and they work: a decode step on every one
			h.step(opDecode, s, 0, arg{n: 1})
		}
	})
}

// What a swapped-out sequence refuses, and what it takes: every call that would read or write
// its blocks fails with ErrSwapped and changes nothing; FreeSequence frees its host blocks.
func TestSwappedSequenceCalls(t *testing.T) {
	m := newManager(t, hostDevice(t, 32<<10), func() kvcache.Config { c := tinyConfig(); c.HostBlocks = 8; return c }())
	_, err := m.AppendTokens(1, 9, nil)
	require.NoError(t, err)
	_, err = m.AppendTokens(2, 1, nil)
	require.NoError(t, err)
	sw, err := m.SwapOut([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Close())
	ok, err := m.Swapped(1)
	require.NoError(t, err)
	require.True(t, ok)
	before := shape(m.Stats())
	_, err = m.AppendTokens(1, 1, nil)
	require.ErrorIs(t, err, kvcache.ErrSwapped)
	_, err = m.AppendTokenIDs(1, []prefix.Token{1}, nil)
	require.ErrorIs(t, err, kvcache.ErrSwapped)
	require.ErrorIs(t, m.Fork(1, 3), kvcache.ErrSwapped)
	require.ErrorIs(t, m.Truncate(1, 2), kvcache.ErrSwapped)
	_, err = m.Slots(1, 0, 1, nil)
	require.ErrorIs(t, err, kvcache.ErrSwapped)
	table, err := blocktable.NewVLLM(4, 8, -1)
	require.NoError(t, err)
	require.ErrorIs(t, m.ExportVLLM([]kvcache.SeqID{2, 1}, table), kvcache.ErrSwapped)
	_, err = m.SwapOut([]kvcache.SeqID{1}, 0)
	require.ErrorIs(t, err, kvcache.ErrSwapped, "already out")
	_, err = m.SwapIn([]kvcache.SeqID{2}, 0)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument, "2 is not out")
	_, err = m.SwapIn([]kvcache.SeqID{1, 1}, 0)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument, "listed twice")
	_, err = m.SwapIn([]kvcache.SeqID{1, 9}, 0)
	require.ErrorIs(t, err, kvcache.ErrUnknownSequence)
	require.Equal(t, before, shape(m.Stats()))
	ok, err = m.Swapped(2)
	require.NoError(t, err)
	require.False(t, ok)
	_, err = m.Swapped(9)
	require.ErrorIs(t, err, kvcache.ErrUnknownSequence)

	require.NoError(t, m.FreeSequence(1))
	assert.Equal(t, 8, m.Stats().HostFreeBlocks)
	assert.Zero(t, m.Stats().SwappedSequences)
	require.NoError(t, m.Verify())
}

// A host tier too small, or none, refuses with the numbers and changes nothing.
func TestSwapOutOfHostMemory(t *testing.T) {
	cfg := tinyConfig()
	cfg.HostBlocks = 2
	m := newManager(t, hostDevice(t, 32<<10), cfg)
	_, err := m.AppendTokens(1, 9, nil) // three blocks
	require.NoError(t, err)
	before := shape(m.Stats())
	_, err = m.SwapOut([]kvcache.SeqID{1}, 0)
	require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
	var be *kvcache.BlocksError
	require.ErrorAs(t, err, &be)
	assert.Equal(t, 3, be.Blocks)
	assert.Equal(t, 2, be.Free)
	require.Equal(t, before, shape(m.Stats()))
	require.NoError(t, m.Verify())

	none := newManager(t, hostDevice(t, 32<<10), tinyConfig())
	_, err = none.AppendTokens(1, 1, nil)
	require.NoError(t, err)
	_, err = none.SwapOut([]kvcache.SeqID{1}, 0)
	require.ErrorIs(t, err, kvcache.ErrNotSupported)
	_, err = none.SwapIn([]kvcache.SeqID{1}, 0)
	require.ErrorIs(t, err, kvcache.ErrNotSupported)
}

// Swapping in when the device is full fails with ErrOutOfMemory and changes nothing; once
// memory is free it succeeds.
func TestSwapInOutOfDeviceMemory(t *testing.T) {
	cfg := tinyConfig()
	cfg.Capacity = 2 * cfg.PageSize // eight blocks
	cfg.HostBlocks = 8
	h := newHarness(t, hostDevice(t, 32<<10), cfg)
	h.step(opAppend, 1, 0, exactly(16)) // four blocks
	h.step(opSwapOut, 1, 1, arg{n: 1})
	h.step(opAppend, 2, 0, exactly(20)) // five of the eight
	before := shape(h.m.Stats())
	_, err := h.m.SwapIn([]kvcache.SeqID{1}, 0)
	require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
	require.Equal(t, before, shape(h.m.Stats()))
	h.check()
	h.step(opTruncate, 2, 0, exactly(4))
	h.step(opSwapIn, 1, 0, arg{})
	require.EqualValues(t, 4, h.m.Stats().SwapIns)
}

// A failed copy (on any device of several) leaves the manager exactly as before, both ways.
func TestSwapFaults(t *testing.T) {
	for _, split := range splits {
		n := max(split.TensorParallel, 1) * max(split.PipelineParallel, 1)
		for k := range n {
			t.Run(fmt.Sprintf("%dx%d/device%d", max(split.TensorParallel, 1), max(split.PipelineParallel, 1), k), func(t *testing.T) {
				devs, faults := faultyHostDevices(t, n)
				cfg := multiConfig()
				cfg.HostBlocks = 16
				h := newMultiHarness(t, devs, cfg, split)
				h.step(opAppend, 1, 0, exactly(13))
				h.step(opAppend, 2, 0, exactly(5))
				check := func(name string, do func() error) {
					before := shape(h.m.Stats())
					free0 := freeOf(t, devs)
					require.NoError(t, faults[k].FailNth(vmm.OpCopy, 1, nil))
					err := do()
					faults[k].Clear()
					require.ErrorIs(t, err, vmm.ErrInjected, name)
					require.Equal(t, before, shape(h.m.Stats()), name)
					require.Equal(t, free0, freeOf(t, devs), "%s: every device as before", name)
					h.check()
				}
				swap := func(out bool) func() error {
					return func() error {
						var err error
						if out {
							_, err = h.m.SwapOut([]kvcache.SeqID{1}, 0)
						} else {
							_, err = h.m.SwapIn([]kvcache.SeqID{1}, 0)
						}
						return err
					}
				}
				check("swap out", swap(true))
				h.step(opSwapOut, 1, 1, arg{n: 1})
				h.step(opFree, 2, 0, arg{})
				check("swap in", swap(false))
				h.step(opSwapIn, 1, 0, arg{})
				h.step(opDecode, 1, 0, arg{n: 1})
				require.EqualValues(t, 4, h.m.Stats().SwapIns)
			})
		}
	}
}

// Cached blocks stay cached when their sequence swaps out: the next prompt with the prefix hits.
func TestSwapKeepsTheCache(t *testing.T) {
	cfg := tinyConfig()
	cfg.HostBlocks = 8
	m := newManager(t, hostDevice(t, 32<<10), cfg)
	p := make([]prefix.Token, 13)
	for i := range p {
		p[i] = prefix.Token(i)
	}
	_, err := m.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	_, err = m.AppendTokenIDs(1, p, nil)
	require.NoError(t, err)
	sw, err := m.SwapOut([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Close())
	assert.Equal(t, 3, m.Stats().Prefix.IdleBlocks, "its three full blocks, idle")
	hit, err := m.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	assert.Equal(t, 12, hit)
	require.NoError(t, m.Verify())
}

// A static manager has no host tier.
func TestStaticHasNoHostTier(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	cfg := tinyConfig()
	cfg.HostBlocks = 4
	_, err := kvcache.NewStatic(dev, cfg, externalMemory(t, dev, 4*cfg.PageSize))
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
}
