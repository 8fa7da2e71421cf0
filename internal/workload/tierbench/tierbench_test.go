package tierbench_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/redistest"
	"github.com/pagedkv/pagedkv/internal/workload/tierbench"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/redis"
)

// One round of each measurement runs end to end and yields figures; their values are the bench
// program's business.
func TestDiskMeasures(t *testing.T) {
	put, get, err := tierbench.Disk(t.TempDir(), 16<<10, 1)
	require.NoError(t, err)
	for _, f := range []tierbench.Figure{put, get} {
		assert.Positive(t, f.StoreGBps)
		assert.Positive(t, f.YardGBps)
		assert.Contains(t, []string{"direct", "buffered"}, f.Mode)
	}
}

func TestRedisMeasures(t *testing.T) {
	srv := redistest.Start(t)
	s, err := redis.Open(redis.Options{Addrs: []string{srv.Addr}, Model: "m", Fingerprint: tier.Fingerprint{1}, BlockBytes: 16 << 10, Timeout: 10 * time.Second})
	require.NoError(t, err)
	defer s.Close()
	put, get, err := tierbench.Redis(s, 16<<10, 1)
	require.NoError(t, err)
	for _, f := range []tierbench.Figure{put, get} {
		assert.Positive(t, f.StoreGBps)
		assert.Positive(t, f.YardGBps)
	}
	assert.Zero(t, s.Stats().Failures)
	assert.Zero(t, s.Stats().Corrupt)
}
