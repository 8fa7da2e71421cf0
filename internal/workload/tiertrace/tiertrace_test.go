package tiertrace

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/proctest"
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

// A process killed half-way through the chat trace (SIGKILL: nothing flushed, nothing closed)
// and started again on the same disk tier reaches at least 95% of the hit rate, over the second
// half, of a process that never stopped; a restart without the disk tier falls far short.
func TestWarmRestart(t *testing.T) {
	dir := t.TempDir()
	child := proctest.Start(t, "first-half", dir)
	child.Expect("half", 5*time.Minute)
	child.Kill9()
	again, ts, err := RunPart(dir, SecondHalf)
	require.NoError(t, err)
	never, _, err := RunPart(t.TempDir(), Whole)
	require.NoError(t, err)
	cold, _, err := RunPart(t.TempDir(), SecondHalf)
	require.NoError(t, err)
	t.Logf("second half's hit rate: never stopped %.3f, restarted on its disk tier %.3f (%d tokens from disk), restarted cold %.3f",
		never.HitRate(), again.HitRate(), ts.HitTokens, cold.HitRate())
	require.Equal(t, never.QueryTokens, again.QueryTokens, "the same requests")
	assert.GreaterOrEqual(t, again.HitRate(), 0.95*never.HitRate())
	assert.Less(t, cold.HitRate(), again.HitRate())
}
