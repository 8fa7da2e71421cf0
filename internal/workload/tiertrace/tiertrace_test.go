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
	one, _, err := Shared(Fleet{Replicas: 1, Addrs: []string{srv.Addr}, Seed: 1})
	require.NoError(t, err)
	srv.Do("FLUSHALL")
	two, tiers, err := Shared(Fleet{Replicas: 2, Addrs: []string{srv.Addr}, Seed: 1})
	require.NoError(t, err)
	alone, _, err := Shared(Fleet{Replicas: 2, Seed: 1})
	require.NoError(t, err)
	t.Logf("hit rate: one replica %.3f, two on Redis %.3f (%d tokens from Redis), two without %.3f; tier %+v",
		one.HitRate(), two.HitRate(), tiers.HitTokens, alone.HitRate(), tiers)
	assert.Equal(t, one.QueryTokens, two.QueryTokens)
	assert.GreaterOrEqual(t, two.HitRate(), 0.9*one.HitRate())
	assert.Greater(t, two.HitTokens, alone.HitTokens)
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

// Faults of the cluster tier leave the replicas correct, every hit's K/V read back intact, with
// the faults counted: Redis full (a small maxmemory, evicting), killed mid-run and started
// again, every stored value corrupted (every 40 requests from the 400th); and a 3-node Redis Cluster serves like one node.
func TestSharedRedisFaults(t *testing.T) {
	srv := redistest.Start(t, "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
	res, tiers, err := Shared(Fleet{Replicas: 2, Addrs: []string{srv.Addr}, Seed: 2, Before: func(started int) {
		switch {
		case started == 150:
			srv.Kill()
		case started == 250:
			srv.Restart()
		case started >= 400 && started%40 == 0: // from the 400th request, every 40th: reads of corrupted values, not by luck
			srv.Do("EVAL", "for _, k in ipairs(redis.call('KEYS', '*')) do redis.call('SETRANGE', k, 100, 'XYZ') end return 0", "0")
		}
	}})
	require.NoError(t, err, "every hit read back intact")
	t.Logf("hit rate %.3f; tier %+v", res.HitRate(), tiers)
	assert.Positive(t, tiers.Failures, "calls to the dead server")
	assert.Positive(t, tiers.Store.Corrupt, "corrupt values found and dropped")
	assert.Positive(t, tiers.HitTokens)

	cluster := redistest.StartCluster(t, 3)
	res3, tiers3, err := Shared(Fleet{Replicas: 2, Addrs: cluster.Addrs(), Cluster: true, Seed: 1})
	require.NoError(t, err)
	t.Logf("Redis Cluster of 3: hit rate %.3f; tier %+v", res3.HitRate(), tiers3)
	assert.GreaterOrEqual(t, res3.HitRate(), 0.9)
}
