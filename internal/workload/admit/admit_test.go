package admit_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/workload/admit"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// Geometry of the CI-size trace: 64 blocks of 16 tokens per 256 KiB page.
func config() kvcache.Config {
	return kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		PageSize: 256 << 10, ReservePages: 1, HighWatermark: 2, NoBackground: true}
}

const limit = 72 * (256 << 10)

// Static shares against one shared budget on the same arrivals: the shared budget admits with
// less queueing at p50 and p99, and the trace really queues under static shares.
func TestStaticVersusShared(t *testing.T) {
	o := admit.Default()
	o.Steps = 1800 // two rounds of the three busy phases
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
	require.NoError(t, err)
	defer dev.Close()
	cfg := config()
	cfg.Capacity = limit
	sres, err := admit.RunShares(dev, cfg, limit, o)
	require.NoError(t, err)

	pool, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: limit, CompactOnPressure: true})
	require.NoError(t, err)
	defer pool.Close()
	var shared []*kvcache.Manager
	for i := range o.Models {
		m, err := pool.Register(string(rune('a'+i)), cfg)
		require.NoError(t, err)
		shared = append(shared, m)
	}
	hres, err := admit.Run(shared, o)
	require.NoError(t, err)
	t.Logf("static: %+v", sres)
	t.Logf("shared: %+v", hres)
	require.Greater(t, sres.P99, 0.0, "static shares must queue, or the trace proves nothing")
	require.Less(t, hres.P99, sres.P99)
	require.LessOrEqual(t, hres.P50, sres.P50)
}
