package kvcache_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// eventView is what a router keeps of a manager's device cache: the events applied in order.
type eventView map[prefix.Key]bool

// apply applies events on the GPU medium; a removal or store that does not follow from the
// view so far fails the test.
func (v eventView) apply(t *testing.T, events []prefix.Event) {
	t.Helper()
	for _, ev := range events {
		if ev.Medium != prefix.MediumGPU {
			continue
		}
		switch ev.Kind {
		case prefix.BlockStored:
			for _, k := range ev.Keys {
				require.False(t, v[k], "stored twice")
				v[k] = true
			}
		case prefix.BlockRemoved:
			for _, k := range ev.Keys {
				require.True(t, v[k], "removed but never stored")
				delete(v, k)
			}
		case prefix.AllBlocksCleared:
			clear(v)
		default:
			t.Fatalf("unexpected %v", ev.Kind)
		}
	}
}

// requireCached checks the view against the manager's cached keys.
func (v eventView) requireCached(t *testing.T, m *kvcache.Manager, msg string) {
	t.Helper()
	want := eventView{}
	for _, k := range m.CachedKeys(nil) {
		want[k] = true
	}
	require.Equal(t, want, v, msg)
}

// A compaction whose copy fails still evicted the cache beyond the bound: its BlockRemoved
// events reach the subscriber even when the next call fails and forgets its own events.
func TestFailedCompactionSendsItsEvictions(t *testing.T) {
	dev := vmm.InjectFaults(hostDevice(t, 32<<10))
	cfg := tinyConfig() // PrefixCacheBytes 0: every idle block is beyond the bound
	m := newManager(t, dev, cfg)
	sub, err := m.Subscribe(1 << 10)
	require.NoError(t, err)
	view := eventView{}
	ids := make([]prefix.Token, 8*cfg.BlockTokens)
	for i := range ids {
		ids[i] = prefix.Token(i)
	}
	_, err = m.AppendTokenIDs(100, ids, nil) // two pages of cached blocks
	require.NoError(t, err)
	for i := range 8 {
		_, err := m.AppendTokens(kvcache.SeqID(i), 6, nil) // 2 blocks: 2 sequences a page
		require.NoError(t, err)
	}
	for i := 0; i < 8; i += 2 {
		require.NoError(t, m.FreeSequence(kvcache.SeqID(i))) // every page half empty
	}
	require.NoError(t, m.FreeSequence(100)) // eight idle blocks, two pages beyond the bound
	view.apply(t, sub.Read(nil))
	view.requireCached(t, m, "before the compaction")

	require.NoError(t, dev.FailNth(vmm.OpCopy, 1, nil))
	_, err = m.Compact(kvcache.CompactOptions{})
	require.ErrorIs(t, err, vmm.ErrInjected)
	require.Less(t, m.Stats().Prefix.CachedBlocks, 8, "the excess was evicted before the copy")
	require.NoError(t, dev.FailAlways(vmm.OpMap, nil))
	av := m.Available()
	_, err = m.AppendTokens(200, (av.FreeBlocks+av.IdleBlocks+1)*cfg.BlockTokens, nil) // must map: fails
	require.ErrorIs(t, err, vmm.ErrInjected)
	dev.Clear()
	view.apply(t, sub.Read(nil))
	view.requireCached(t, m, "after the failed compaction and append")
	require.NoError(t, m.Verify())
}
