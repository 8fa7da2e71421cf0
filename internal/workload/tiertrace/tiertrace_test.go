package tiertrace

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/redistest"
)

// Two replicas sharing one Redis, requests routed at random, serve from some cache at least
// 90% of the prompt tokens one replica (with the same tier) serves from its caches, every hit
// read back intact; without the cluster tier they serve fewer.
func TestSharedRedis(t *testing.T) {
	srv := redistest.Start(t)
	one, _, err := Shared(1, []string{srv.Addr}, false, 1)
	require.NoError(t, err)
	srv.Do("FLUSHALL")
	two, tiers, err := Shared(2, []string{srv.Addr}, false, 1)
	require.NoError(t, err)
	alone, _, err := Shared(2, nil, false, 1)
	require.NoError(t, err)
	t.Logf("hit rate: one replica %.3f, two on Redis %.3f (%d tokens from Redis), two without %.3f; tier %+v",
		one.HitRate(), two.HitRate(), tiers.HitTokens, alone.HitRate(), tiers)
	assert.Equal(t, one.QueryTokens, two.QueryTokens)
	assert.GreaterOrEqual(t, two.HitRate(), 0.9*one.HitRate())
	assert.Greater(t, two.HitTokens, alone.HitTokens)
	assert.Zero(t, tiers.Failures)
}
