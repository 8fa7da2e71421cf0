package kvcache_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// hostCacheConfig is smallConfig (64 blocks a page) with an arena of two pages and a host
// prefix cache of two pages.
func hostCacheConfig() kvcache.Config {
	cfg := smallConfig()
	cfg.Capacity = 2 * cfg.PageSize
	cfg.HostBlocks, cfg.HostPrefixCache = 128, true
	return cfg
}

// longPrompt is a prompt of n blocks and one token more, of family fam.
func longPrompt(fam, blocks, bt int) []prefix.Token {
	p := make([]prefix.Token, blocks*bt+1)
	for i := range p {
		p[i] = prefix.Token(1000*fam + i)
	}
	return p
}

// A prompt whose blocks the device cache evicted is found in the host cache: StartSequence
// copies them back into device blocks, and every token reads back right through the table.
func TestHostPrefixCache(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		hostCacheScenario(t, newHarness(t, dev, hostCacheConfig()))
	})
}

// The same on two devices (host memory in CI), KV heads or layers divided.
func TestHostPrefixCacheMulti(t *testing.T) {
	for _, split := range []kvcache.Split{{TensorParallel: 2}, {PipelineParallel: 2}} {
		t.Run(fmt.Sprintf("%+v", split), func(t *testing.T) {
			devs := []vmm.Device{hostDevice(t, 2<<20), hostDevice(t, 2<<20)}
			hostCacheScenario(t, newMultiHarness(t, devs, multiHostCacheConfig(), split))
		})
	}
}

// multiHostCacheConfig is hostCacheConfig's geometry for two devices: 64 blocks to a page
// index of 2 MiB on each device, two page indexes, a host tier of two.
func multiHostCacheConfig() kvcache.Config {
	return kvcache.Config{Layers: 2, KVHeads: 4, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		PageSize: 4 << 20, Capacity: 2 * (4 << 20), NoBackground: true, HostBlocks: 128, HostPrefixCache: true}
}

// hostCacheScenario runs a 40-block prompt, evicts it from the device with 120 blocks of other
// work, and starts it again: h's arena holds 128 blocks, its host tier 128.
func hostCacheScenario(t *testing.T, h *harness) {
	m, bt := h.m, h.cfg.BlockTokens
	p := longPrompt(1, 40, bt)
	h.start(1, prefix.Namespace{}, p, false)
	h.step(opFree, 1, 0, arg{}) // its 40 full blocks go idle, and are written back
	st := m.Stats()
	require.EqualValues(t, 40, st.Prefix.HostStored)
	require.Equal(t, 40, st.Prefix.HostCachedBlocks)
	require.Equal(t, 40, st.Prefix.IdleBlocks)

	for s := byte(2); s < 5; s++ { // 120 blocks of other work evict the device's copy
		h.step(opAppend, s, 0, exactly(40*bt))
	}
	require.Zero(t, m.Stats().Prefix.IdleBlocks, "the device cache gave its blocks up")
	require.Equal(t, 40, m.Stats().Prefix.HostCachedBlocks, "the host keeps them")
	for s := byte(2); s < 5; s++ {
		h.step(opFree, s, 0, arg{})
	}

	h.start(5, prefix.Namespace{}, p, false) // checks the hit and every token's value
	st = m.Stats()
	assert.EqualValues(t, 40*bt, st.Prefix.HostHitTokens, "the whole prefix came from the host")
	assert.Zero(t, st.Prefix.HostFailures)
	assert.Equal(t, 40, st.Prefix.CachedBlocks, "and is cached on the device again")

	h.start(6, prefix.Namespace{}, p, false) // now a device hit: nothing more from the host
	assert.EqualValues(t, 40*bt, m.Stats().Prefix.HostHitTokens)
	h.step(opDecode, 6, 0, arg{n: 1})
}

// A prefix partly on the device and partly on the host: the device's blocks are shared, the
// host's fetched after them.
func TestHostPrefixCacheContinuesADeviceHit(t *testing.T) {
	h := newHarness(t, hostDevice(t, 2<<20), hostCacheConfig())
	bt := h.cfg.BlockTokens
	p := longPrompt(2, 30, bt)
	h.start(1, prefix.Namespace{}, p, false)
	h.start(2, prefix.Namespace{}, p[:10*bt+1], false) // holds the first ten blocks
	h.step(opFree, 1, 0, arg{})                        // the other twenty go idle, written back
	for s := byte(3); s < 6; s++ {
		h.step(opAppend, s, 0, exactly(40*bt)) // and are evicted from the device
	}
	h.start(6, prefix.Namespace{}, p, false)
	assert.EqualValues(t, 20*bt, h.m.Stats().Prefix.HostHitTokens)
}

// The host cache gives way to swaps; it survives Sleep; DropCache empties it.
func TestHostPrefixCacheGivesWay(t *testing.T) {
	cfg := hostCacheConfig()
	cfg.HostBlocks = 64
	h := newHarness(t, hostDevice(t, 2<<20), cfg)
	m, bt := h.m, h.cfg.BlockTokens
	p := longPrompt(3, 40, bt)
	h.start(1, prefix.Namespace{}, p, false)
	h.step(opFree, 1, 0, arg{})
	require.Equal(t, 40, m.Stats().Prefix.HostCachedBlocks)

	h.step(opAppend, 2, 0, exactly(30*bt)) // 30 blocks to swap: 24 free host blocks, 6 cached
	h.step(opSwapOut, 2, 2, arg{n: 1})
	st := m.Stats()
	require.Equal(t, 1, st.SwappedSequences)
	assert.Equal(t, 34, st.Prefix.HostCachedBlocks, "the six least recently used gave way")
	assert.EqualValues(t, 6, st.Prefix.HostEvictions)
	h.step(opSwapIn, 2, 0, arg{})
	h.step(opFree, 2, 0, arg{})

	_, err := m.Sleep()
	require.NoError(t, err)
	require.NoError(t, m.Wake())
	h.removals()
	h.stores()
	require.Equal(t, 34, m.Stats().Prefix.HostCachedBlocks, "Sleep drops the device's cache, not the host's")
	h.start(3, prefix.Namespace{}, p, false) // the six dropped were the prompt's tail
	assert.EqualValues(t, 34*bt, m.Stats().Prefix.HostHitTokens)
	h.step(opFree, 3, 0, arg{})

	_, err = m.DropCache()
	require.NoError(t, err)
	h.removals()
	h.check()
	assert.Zero(t, m.Stats().Prefix.HostCachedBlocks)
	assert.Equal(t, cfg.HostBlocks, m.Stats().HostFreeBlocks)
}

// A failed copy gives the host cache up for that call only: FreeSequence and StartSequence
// succeed, the runtime computes what was not fetched, and the failure is counted.
func TestHostPrefixCacheFaults(t *testing.T) {
	fd := vmm.InjectFaults(hostDevice(t, 2<<20))
	h := newHarness(t, fd, hostCacheConfig())
	m, bt := h.m, h.cfg.BlockTokens
	p := longPrompt(4, 20, bt)
	h.start(1, prefix.Namespace{}, p, false)
	require.NoError(t, fd.FailNth(vmm.OpCopy, 1, nil))
	h.step(opFree, 1, 0, arg{}) // the write-back fails
	fd.Clear()
	st := m.Stats()
	assert.EqualValues(t, 1, st.Prefix.HostFailures)
	assert.Zero(t, st.Prefix.HostCachedBlocks)

	h.start(2, prefix.Namespace{}, p, false)
	h.step(opFree, 2, 0, arg{}) // written back now
	require.Equal(t, 20, m.Stats().Prefix.HostCachedBlocks)
	for s := byte(3); s < 6; s++ {
		h.step(opAppend, s, 0, exactly(40*bt))
	}
	for s := byte(3); s < 6; s++ {
		h.step(opFree, s, 0, arg{})
	}
	before := m.Stats()
	require.NoError(t, fd.FailNth(vmm.OpCopy, 1, nil))
	hit, err := m.StartSequence(6, kvcache.Prompt{Tokens: p})
	fd.Clear()
	require.NoError(t, err)
	assert.Zero(t, hit, "the fetch failed: nothing found")
	after := m.Stats()
	assert.EqualValues(t, 2, after.Prefix.HostFailures)
	assert.Equal(t, before.LiveBlocks, after.LiveBlocks, "the blocks the fetch took went back")
	assert.Equal(t, before.MappedPages, after.MappedPages)
	require.NoError(t, m.Verify())
}

func TestHostPrefixCacheNeedsAHostTier(t *testing.T) {
	cfg := smallConfig()
	cfg.HostPrefixCache = true
	_, err := kvcache.New(hostDevice(t, 2<<20), cfg)
	var ce *kvcache.ConfigError
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, "HostPrefixCache", ce.Field)
}

// A write-back whose copy fails midway gives its host blocks back but leaves evicted the host
// cache entries it took them from: the copy may have overwritten them, and a later fetch must
// not bring another block's K/V back under their keys.
func TestHostWriteBackFailureDropsOverwritten(t *testing.T) {
	fd := vmm.InjectFaults(hostDevice(t, 2<<20))
	cfg := hostCacheConfig()
	cfg.HostBlocks = 20
	h := newHarness(t, fd, cfg)
	m, bt := h.m, h.cfg.BlockTokens
	h.start(1, prefix.Namespace{}, longPrompt(4, 20, bt), false)
	h.step(opFree, 1, 0, arg{}) // written back: the host cache is full
	require.Equal(t, 20, m.Stats().Prefix.HostCachedBlocks)
	h.start(2, prefix.Namespace{}, longPrompt(5, 2, bt), false)
	require.NoError(t, fd.FailNth(vmm.OpCopy, 2, nil)) // the first block is copied, the second fails
	h.step(opFree, 2, 0, arg{})                        // the write-back evicts two host entries for its blocks
	fd.Clear()
	st := m.Stats()
	assert.EqualValues(t, 1, st.Prefix.HostFailures)
	assert.Equal(t, 18, st.Prefix.HostCachedBlocks, "the two evicted entries stay evicted")
	assert.Equal(t, 2, st.HostFreeBlocks)
	require.NoError(t, m.Verify())
}
