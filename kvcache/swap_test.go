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
// blocks they gave up. A block shared with a sequence that stays is not copied: both keep it,
// until that one swaps out too and it moves to the host, copied once for both; one shared by
// two swapped sequences is copied once and stays shared on the host. Swapped back in, every
// token reads back through the table.
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

		sw := h.swap(true, 1) // 0 stays: it holds the three shared blocks, which 1 keeps too
		require.Equal(t, 3, sw.Blocks, "1's own three blocks")
		assert.Equal(t, 3, sw.Kept, "the three it shares with 0")
		assert.EqualValues(t, 3*h.cfg.BlockStride(), sw.Bytes)
		assert.Equal(t, 7, m.Stats().LiveBlocks, "1's own three went free")
		assert.Equal(t, 128-3, m.Stats().HostFreeBlocks)

		sw = h.swap(true, 0, 2) // the shared three leave the device now: copied once, for 0 and 1
		require.Equal(t, 3+1+3, sw.Blocks)
		assert.Zero(t, sw.Kept)
		assert.Equal(t, 3, m.Stats().SwappedSequences)
		assert.Zero(t, m.Stats().LiveBlocks, "nothing left on the device")
		assert.Equal(t, 128-3-7, m.Stats().HostFreeBlocks)

		for s := byte(3); s < 6; s++ { // new sequences take (and overwrite) the freed blocks
			h.step(opAppend, s, 0, exactly(4*bt))
		}
		h.step(opFork, 3, 6, arg{})
		sw = h.swap(true, 3, 6) // shared by both: copied once, shared on the host
		require.Equal(t, 4, sw.Blocks)
		sw = h.swap(false, 6, 3) // and shared again on the device
		require.Equal(t, 4, sw.Blocks)
		for _, s := range []kvcache.SeqID{1, 0, 2} {
			h.swap(false, s)
		}
		assert.Equal(t, 128, m.Stats().HostFreeBlocks, "every host block is free again")
		assert.EqualValues(t, 3+7+4, m.Stats().SwapOuts)
		assert.EqualValues(t, 4+6+4+3, m.Stats().SwapIns)
		for s := byte(0); s < 7; s++ { // and they work: a decode step on every one
			h.step(opDecode, s, 0, arg{n: 1})
		}
	})
}

// swap swaps ids out (or in) on the manager and the reference, waits for the copy and checks
// both: the sequences on the device through the table, the host tier's counts. It returns the
// Swap, closed.
func (h *harness) swap(out bool, ids ...kvcache.SeqID) *kvcache.Swap {
	t := h.t
	var sw *kvcache.Swap
	var err error
	if out {
		sw, err = h.m.SwapOut(ids, 0)
	} else {
		sw, err = h.m.SwapIn(ids, 0)
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
	h.removals()
	h.stores()
	h.check()
	return sw
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
	var se *kvcache.SwapError
	require.ErrorAs(t, err, &se)
	assert.Equal(t, kvcache.SwapError{Op: "swap out", Seqs: 1, Blocks: 3, Bytes: 3 * 8 << 10, Free: 2, Max: 2, Where: "the host tier", Err: se.Err}, *se)
	assert.Equal(t, "kvcache: swap out of 1 sequence: 3 blocks (24576 bytes) to copy into the host tier, 2 can be had now, 2 at most: out of memory: need 24576 bytes, 16384 free", err.Error())
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

// systemPrompt is sequence seq's prompt: a system prompt of 300 tokens that every sequence
// shares (18 whole blocks of 16, and 12 tokens of a 19th), then tail tokens of its own.
func systemPrompt(seq, tail int) []prefix.Token {
	p := make([]prefix.Token, 300+tail)
	for i := range p {
		p[i] = prefix.Token(i)
		if i >= 300 {
			p[i] = prefix.Token(10000*(seq+1) + i)
		}
	}
	return p
}

// Issue 17: four sequences on a 300-token system prompt, started with StartSequence and fed
// with AppendTokenIDs; two swap out and back in. The prompt's 18 blocks, which the other two
// hold, are neither copied nor duplicated: each way only the private blocks move, and the
// device holds as many blocks after as before. A private full block, cached and left idle by
// the swap-out, is found again by its key. Every token reads back through the table.
func TestSwapSharedPrompt(t *testing.T) {
	for _, c := range []struct {
		tail    int
		private int // blocks of each sequence's own
		cached  int // of those, full ones (cached)
	}{{tail: 3, private: 1}, {tail: 10, private: 2, cached: 1}} {
		t.Run(fmt.Sprintf("tail%d", c.tail), func(t *testing.T) {
			backends(t, func(t *testing.T, dev vmm.Device) {
				h := newHarness(t, dev, swapConfig())
				m := h.m
				for s := range 4 {
					h.start(kvcache.SeqID(s), prefix.Namespace{}, systemPrompt(s, c.tail), false)
				}
				live := 18 + 4*c.private
				require.Equal(t, live, m.Stats().LiveBlocks, "the prompt's 18 blocks, shared")
				require.Equal(t, 18+4*c.cached, m.Stats().Prefix.CachedBlocks)

				sw := h.swap(true, 1, 2)
				assert.Equal(t, 2*c.private, sw.Blocks, "their own blocks only")
				assert.Equal(t, 18, sw.Kept, "the prompt stays, held by 0 and 3")
				assert.EqualValues(t, 2*c.private*int(h.cfg.BlockStride()), sw.Bytes)
				st := m.Stats()
				assert.Equal(t, live-2*c.private, st.LiveBlocks, "their own blocks left the device")
				assert.Equal(t, 2*c.cached, st.Prefix.IdleBlocks, "their full ones stay cached")
				assert.Equal(t, 128-2*c.private, st.HostFreeBlocks)

				sw = h.swap(false, 1, 2)
				assert.Equal(t, 2*(c.private-c.cached), sw.Blocks, "their own blocks the cache lacks")
				assert.Equal(t, 2*c.cached, sw.Kept, "found in the cache by their keys")
				st = m.Stats()
				assert.Equal(t, live, st.LiveBlocks, "as many blocks as before: no duplicate of the prompt")
				assert.Equal(t, 18+4*c.cached, st.Prefix.CachedBlocks)
				assert.Zero(t, st.Prefix.IdleBlocks)
				assert.Equal(t, 128, st.HostFreeBlocks)
				assert.EqualValues(t, 2*c.private, st.SwapOuts)
				assert.EqualValues(t, 2*(c.private-c.cached), st.SwapIns)
				for s := byte(0); s < 4; s++ { // and they work: a decode step on every one
					h.step(opDecode, s, 0, arg{n: 1})
				}
			})
		})
	}
}

// onePageConfig is swapConfig on a device of one page: 64 blocks.
func onePageConfig() kvcache.Config {
	cfg := swapConfig()
	cfg.Capacity = cfg.PageSize
	return cfg
}

// A sequence swapped out beside a sharer keeps the prompt's blocks when that sharer is freed:
// they stay held, not idle, so pressure cannot evict them, and SwapIn copies only its tail.
func TestSwapKeepsWhatASharerLeaves(t *testing.T) {
	h := newHarness(t, hostDevice(t, 2<<20), onePageConfig())
	m := h.m
	h.start(0, prefix.Namespace{}, systemPrompt(0, 3), false)
	h.start(1, prefix.Namespace{}, systemPrompt(1, 3), false)
	sw := h.swap(true, 1)
	require.Equal(t, 1, sw.Blocks)
	require.Equal(t, 18, sw.Kept)
	h.step(opFree, 0, 0, arg{})
	st := m.Stats()
	assert.Equal(t, 18, st.LiveBlocks, "held by 1, out")
	assert.Zero(t, st.Prefix.IdleBlocks)

	h.step(opAppend, 2, 0, exactly((64-18)*16)) // the rest of the device
	h.step(opAppend, 3, 0, exactly(1))          // and no more: the prompt is not evicted
	assert.Equal(t, 1, h.ooms)
	assert.Zero(t, m.Stats().Prefix.Evictions)
	h.step(opFree, 2, 0, arg{})

	sw = h.swap(false, 1)
	assert.Equal(t, 1, sw.Blocks, "its tail")
	assert.Zero(t, sw.Kept)
	assert.Equal(t, 19, m.Stats().LiveBlocks)
	h.step(opDecode, 1, 0, arg{n: 1})
}

// When the prompt's last holders swap out (the second moves the first's references to the host
// copy), its blocks are copied once and go idle in the cache. Evicted under pressure, SwapIn
// copies them back from the host; still cached, SwapIn finds them and copies only the tails.
func TestSwapBringsBackWhatTheCacheLost(t *testing.T) {
	for _, evict := range []bool{false, true} {
		t.Run(fmt.Sprintf("evicted=%v", evict), func(t *testing.T) {
			h := newHarness(t, hostDevice(t, 2<<20), onePageConfig())
			m := h.m
			h.start(1, prefix.Namespace{}, systemPrompt(1, 3), false)
			h.start(2, prefix.Namespace{}, systemPrompt(2, 3), false)
			sw := h.swap(true, 1)
			require.Equal(t, 1, sw.Blocks)
			require.Equal(t, 18, sw.Kept)
			sw = h.swap(true, 2)
			require.Equal(t, 18+1, sw.Blocks, "the prompt, once for both, and 2's tail")
			require.Zero(t, sw.Kept)
			st := m.Stats()
			require.Zero(t, st.LiveBlocks)
			require.Equal(t, 18, st.Prefix.IdleBlocks)
			require.Equal(t, 128-20, st.HostFreeBlocks)

			if evict {
				h.step(opAppend, 3, 0, exactly(64*16)) // the whole device: the cache goes
				require.EqualValues(t, 18, m.Stats().Prefix.Evictions)
				h.step(opFree, 3, 0, arg{})
			}
			sw = h.swap(false, 1, 2)
			st = m.Stats()
			if evict {
				assert.Equal(t, 18+2, sw.Blocks, "the prompt from the host, once for both, and the tails")
				assert.Zero(t, sw.Kept)
				assert.Zero(t, st.Prefix.CachedBlocks)
			} else {
				assert.Equal(t, 2, sw.Blocks, "the tails")
				assert.Equal(t, 18, sw.Kept, "the prompt, found in the cache")
				assert.Equal(t, 18, st.Prefix.CachedBlocks)
			}
			assert.Equal(t, 20, st.LiveBlocks, "the prompt shared again")
			assert.Zero(t, st.Prefix.IdleBlocks)
			assert.Equal(t, 128, st.HostFreeBlocks)
			h.step(opDecode, 1, 0, arg{n: 1})
			h.step(opDecode, 2, 0, arg{n: 1})
		})
	}
}

// A SwapIn that fails after finding blocks in the device's cache (its copy fails, or the device
// has no room for the rest) gives them back exactly: idle again, at their place in the LRU
// order, so later evictions go as if it had never been called.
func TestSwapInUndoesWhatItFound(t *testing.T) {
	for _, failure := range []string{"copy", "memory"} {
		t.Run(failure, func(t *testing.T) {
			run := func(fail bool) []prefix.Key {
				dev := vmm.InjectFaults(hostDevice(t, 2<<20))
				h := newHarness(t, dev, onePageConfig())
				h.start(4, prefix.Namespace{}, longPrompt(7, 10, 16), false) // other cached blocks, older
				h.step(opFree, 4, 0, arg{})
				h.start(1, prefix.Namespace{}, systemPrompt(1, 3), false)
				h.start(2, prefix.Namespace{}, systemPrompt(2, 3), false)
				h.swap(true, 1)
				h.swap(true, 2) // 1's references move last, the prompt's head first: it goes idle in order
				require.Equal(t, 10+18, h.m.Stats().Prefix.IdleBlocks)
				if failure == "memory" {
					h.step(opAppend, 3, 0, exactly((64-18)*16)) // the older cache goes; the prompt's stays
					require.Equal(t, 18, h.m.Stats().Prefix.IdleBlocks)
				}
				if fail {
					before := shape(h.m.Stats())
					want := kvcache.ErrOutOfMemory
					if failure == "copy" {
						require.NoError(t, dev.FailNth(vmm.OpCopy, 1, nil))
						want = vmm.ErrInjected
					}
					_, err := h.m.SwapIn([]kvcache.SeqID{1, 2}, 0)
					dev.Clear()
					require.ErrorIs(t, err, want)
					require.Equal(t, before, shape(h.m.Stats()))
					h.check()
				}
				h.step(opFree, 3, 0, arg{})
				sub, err := h.m.Subscribe(1 << 10)
				require.NoError(t, err)
				defer sub.Close()
				h.step(opAppend, 5, 0, exactly(64*16)) // evict every idle block, in LRU order
				var order []prefix.Key
				for _, e := range sub.Read(nil) {
					if e.Kind == prefix.BlockRemoved {
						order = append(order, e.Keys...)
					}
				}
				return order
			}
			clean := run(false)
			require.NotEmpty(t, clean)
			require.Equal(t, clean, run(true))
		})
	}
}

// A Swap never closed is counted, and the manager's Close reports it after closing all the same.
func TestUnclosedSwapIsReported(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	cfg := tinyConfig()
	cfg.HostBlocks = 8
	m, err := kvcache.New(dev, cfg)
	require.NoError(t, err)
	_, err = m.AppendTokens(1, 5, nil)
	require.NoError(t, err)
	out, err := m.SwapOut([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.EqualValues(t, 1, m.Stats().Warnings.OpenSwaps)
	require.NoError(t, out.Close())
	require.NoError(t, out.Close(), "a second Close does nothing")
	require.Zero(t, m.Stats().Warnings.OpenSwaps, "counted once")
	in, err := m.SwapIn([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, in.Wait())
	require.EqualValues(t, 1, m.Stats().Warnings.OpenSwaps)
	err = m.Close()
	require.ErrorIs(t, err, kvcache.ErrNotClosed)
	require.Equal(t, "kvcache: close: 1 swaps were never closed (their events stay allocated): not closed", err.Error())
	require.ErrorIs(t, m.Close(), kvcache.ErrClosed, "it did close")
	require.NoError(t, in.Close())
}

// Six sequences that do not fit back are named by their count, with the blocks they need.
func TestSwapInOutOfMemoryNamesTheSet(t *testing.T) {
	cfg := tinyConfig()
	cfg.HostBlocks, cfg.MemoryLimit = 64, 2*cfg.PageSize // 8 device blocks
	m := newManager(t, hostDevice(t, 32<<10), cfg)
	ids := []kvcache.SeqID{1, 2, 3, 4, 5, 6}
	for _, id := range ids[:4] {
		_, err := m.AppendTokens(id, 8, nil) // two blocks each: the 8 blocks the limit allows
		require.NoError(t, err)
	}
	out, err := m.SwapOut(ids[:4], 0)
	require.NoError(t, err)
	require.NoError(t, out.Close())
	for _, id := range ids[4:] {
		_, err := m.AppendTokens(id, 16, nil) // the device full again
		require.NoError(t, err)
	}
	out, err = m.SwapOut(ids[4:], 0)
	require.NoError(t, err)
	require.NoError(t, out.Close())
	_, err = m.AppendTokens(7, 32, nil)
	require.NoError(t, err)
	before := shape(m.Stats())
	_, err = m.SwapIn(ids, 0)
	require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
	var se *kvcache.SwapError
	require.ErrorAs(t, err, &se)
	require.Equal(t, 6, se.Seqs)
	require.Equal(t, 16, se.Blocks)
	require.Contains(t, err.Error(), "kvcache: swap in of 6 sequences: 16 blocks (131072 bytes) to copy into the arena (MemoryLimit 65536 bytes), 0 can be had now, 8 at most: ")
	require.Equal(t, before, shape(m.Stats()))
	require.NoError(t, m.Verify())
}

// A sleeping manager takes no device block for a swap-in, as it takes none for an append: the
// swap-in fails with ErrAsleep and maps nothing, the sequence stays out, and after Wake it
// comes back.
func TestSwapInAsleep(t *testing.T) {
	m := newManager(t, hostDevice(t, 32<<10), func() kvcache.Config { c := tinyConfig(); c.HostBlocks = 8; return c }())
	_, err := m.AppendTokens(1, 9, nil)
	require.NoError(t, err)
	sw, err := m.SwapOut([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Close())
	_, err = m.Sleep()
	require.NoError(t, err)
	before := m.Stats()
	require.Zero(t, before.MappedBytes, "nothing live on the device")

	_, err = m.SwapIn([]kvcache.SeqID{1}, 0)
	require.ErrorIs(t, err, kvcache.ErrAsleep)
	var serr *kvcache.SequenceError
	require.ErrorAs(t, err, &serr)
	require.Equal(t, shape(before), shape(m.Stats()), "a refused swap-in changes nothing")
	ok, err := m.Swapped(1)
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, m.Verify())

	require.NoError(t, m.Wake())
	sw, err = m.SwapIn([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Close())
	require.NoError(t, m.Verify())
}
