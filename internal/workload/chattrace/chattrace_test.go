package chattrace

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

// On the chat trace (CI size) the manager's prefix cache hits as often as a plain LRU over
// blocks with the same bound (within 0.5%: its near-ties evict whole pages, which can cost a
// few hits on a small trace; on the issue's full trace the rates are equal), maps no more than
// 5% more memory at the peak, and once every request has ended and the cache is compacted,
// holds no page beyond what its cached blocks fill.
func TestAgainstLRU(t *testing.T) {
	leakcheck.Check(t)
	o := Issue()
	o.Conversations, o.Concurrent, o.Seed = 150, 24, 7
	const bt, bpp = 16, 64
	ideal, err := Run(NewLRU(bt, bpp, 1<<30), o, bt)
	require.NoError(t, err)
	for _, pct := range []int{10, 50} {
		capBlocks := ideal.PeakWorkingBlock * pct / 100
		lru, err := Run(NewLRU(bt, bpp, capBlocks), o, bt)
		require.NoError(t, err)

		dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 1 << 40})
		require.NoError(t, err)
		cfg := kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: bt,
			PageSize: 256 << 10, Capacity: 4096 * (256 << 10), ReservePages: 1, HighWatermark: 2, NoBackground: true}
		cfg.PrefixCacheBytes = uint64(capBlocks) * cfg.BlockStride()
		m, err := kvcache.New(dev, cfg)
		require.NoError(t, err)
		got, err := Run(&Manager{M: m, Settle: true}, o, bt)
		require.NoError(t, err)
		require.NoError(t, m.Verify())
		assert.GreaterOrEqual(t, got.HitRate(), lru.HitRate()*0.995, "bound %d%%: hit rate against the LRU's", pct)
		assert.LessOrEqual(t, float64(got.PeakMappedPages), float64(lru.PeakMappedPages)*1.05, "bound %d%%: peak pages", pct)
		_, err = m.Compact(kvcache.CompactOptions{})
		require.NoError(t, err)
		st := m.Stats()
		optimum := (st.Prefix.IdleBlocks+st.BlocksPerPage-1)/st.BlocksPerPage + cfg.ReservePages
		assert.LessOrEqual(t, float64(st.MappedPages), 1.05*float64(optimum), "bound %d%%: idle pages after compaction", pct)
		t.Logf("bound %d%%: hit rate %.4f (LRU %.4f, never evicting %.4f); peak pages %d (LRU %d); idle: %d pages for %d cached blocks (optimum %d)",
			pct, got.HitRate(), lru.HitRate(), ideal.HitRate(), got.PeakMappedPages, lru.PeakMappedPages, st.MappedPages, st.Prefix.IdleBlocks, optimum)
		require.NoError(t, m.Close())
		require.NoError(t, dev.Close())
	}
}
