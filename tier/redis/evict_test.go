package redis_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/redistest"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/redis"
)

// syncWithin bounds a test's wait for the subscription: a bound on a wait, not a timed
// assertion.
const syncWithin = 20 * time.Second

func syncStore(t *testing.T, s *redis.Store, after uint64) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), syncWithin)
	defer cancel()
	n, err := redis.Sync(ctx, s, after)
	require.NoError(t, err)
	return n
}

// take returns every eviction s reports now, and the count it lost.
func take(s *redis.Store) ([]tier.Eviction, uint64) {
	var out []tier.Eviction
	var lost uint64
	dst := make([]tier.Eviction, 16)
	for {
		n, l := s.TakeEvictions(dst)
		out = append(out, dst[:n]...)
		lost += l
		if n < len(dst) {
			return out, lost
		}
	}
}

// notifyFlags returns the server's notify-keyspace-events.
func notifyFlags(t *testing.T, srv *redistest.Server) string {
	lines := strings.Split(srv.Do("CONFIG", "GET", "notify-keyspace-events"), "\n")
	require.Equal(t, "notify-keyspace-events", lines[0])
	if len(lines) == 1 { // an empty value, trimmed away
		return ""
	}
	return lines[1]
}

func keySet(evs []tier.Eviction) map[prefix.Key]int {
	out := map[prefix.Key]int{}
	for _, e := range evs {
		out[e.Key]++
	}
	return out
}

// With Options.Evictions, the blocks a full server evicts are reported, each once, with their
// adapter; those of another model on the same server are not, nor are blocks still held.
func TestEvictionsHeard(t *testing.T) {
	srv := redistest.Start(t, "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
	const size = 64 << 10
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.BlockBytes, o.Evictions = size, true })
	other := open(t, []string{srv.Addr}, func(o *redis.Options) { o.BlockBytes, o.Model = size, "other-model" })
	take(s)
	syncStore(t, s, 0)
	require.NoError(t, s.Watching())
	assert.ElementsMatch(t, []rune("xeE"), []rune(notifyFlags(t, srv)), "added by the store")
	ctx := context.Background()
	ns := prefix.Namespace{Adapter: 5, Salt: "s"}
	blocks := chain(ns, 7, 160, size) // 10 MiB through a 4 MiB server
	for i := 0; i < len(blocks); i += 4 {
		require.NoError(t, s.Put(ctx, blocks[i:i+4]))
		require.NoError(t, other.Put(ctx, chain(ns, 8, 4, size)))
	}
	// The server checks its limit before every command, reads included: lifted, it evicts no
	// block while the test reads which are left.
	srv.Do("CONFIG", "SET", "maxmemory", "0")
	syncStore(t, s, 0)
	got, lost := take(s)
	assert.Zero(t, lost)
	reported := keySet(got)
	var gone int
	for _, b := range blocks {
		n, err := s.Has(ctx, ns, []prefix.Key{b.Key})
		require.NoError(t, err)
		if n == 0 {
			gone++
			assert.Equal(t, 1, reported[b.Key], "an evicted block is reported once")
		} else {
			assert.Zero(t, reported[b.Key], "a held block is not reported")
		}
	}
	require.Greater(t, gone, 80)
	assert.Len(t, reported, gone, "nothing but the store's evicted blocks")
	for _, e := range got {
		assert.Equal(t, prefix.Namespace{Adapter: 5}, e.NS, "the adapter; the key holds only the salt's hash")
	}
}

// An expired block is reported too.
func TestEvictionsExpiredHeard(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.Evictions, o.TTL = true, time.Millisecond })
	take(s)
	syncStore(t, s, 0)
	blocks := chain(prefix.Namespace{}, 3, 2, blockBytes)
	require.NoError(t, s.Put(context.Background(), blocks))
	srv.Do("DEBUG", "SLEEP", "0.01") // the server's clock passes the TTL; each block expires when next read
	requireRun(t, s, blocks, 0)
	syncStore(t, s, 0)
	got, _ := take(s)
	assert.Equal(t, []tier.Eviction{{Key: blocks[0].Key}, {Key: blocks[1].Key}}, got, "the read's pipeline finds both expired")
}

// A server that refuses CONFIG (an ACL without it) does not fail Open: the refusal is counted
// and Watching says so, and the store hears what the server's own configuration sends.
func TestEvictionsConfigRefused(t *testing.T) {
	srv := redistest.Start(t)
	srv.Do("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-config")
	s := open(t, []string{srv.Addr}, func(o *redis.Options) {
		o.Evictions, o.TTL, o.Username, o.Password = true, time.Millisecond, "app", "pw"
	})
	take(s)
	syncStore(t, s, 0)
	require.ErrorIs(t, s.Watching(), redis.ErrDenied)
	assert.Positive(t, s.Stats().Failures)
	assert.Empty(t, notifyFlags(t, srv), "left as it was")

	srv.Do("CONFIG", "SET", "notify-keyspace-events", "Ex") // the operator's choice
	blocks := chain(prefix.Namespace{}, 4, 2, blockBytes)
	require.NoError(t, s.Put(context.Background(), blocks))
	srv.Do("DEBUG", "SLEEP", "0.01")
	requireRun(t, s, blocks, 0)
	syncStore(t, s, 0)
	got, _ := take(s)
	// Both expired in the same instant; the server's expiry cycle visits keys in its hash
	// table's order, which a random seed at each start decides.
	assert.ElementsMatch(t, []tier.Eviction{{Key: blocks[0].Key}, {Key: blocks[1].Key}}, got)
}

// A subscription confirmed again after the connection dropped may have missed evictions of the
// blocks stored before: that is one lost eviction. So is every eviction past the queue's bound.
func TestEvictionsGapAndOverflowAreLost(t *testing.T) {
	srv := redistest.Start(t, "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
	const size = 64 << 10
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.BlockBytes, o.Evictions = size, true })
	take(s)
	first := syncStore(t, s, 0)
	ctx := context.Background()
	require.NoError(t, s.Put(ctx, chain(prefix.Namespace{}, 1, 4, size)))
	srv.Restart()
	syncStore(t, s, first)
	got, lost := take(s)
	assert.Empty(t, got)
	assert.Equal(t, uint64(1), lost)

	redis.SetEvictionQueue(s, 2)
	blocks := chain(prefix.Namespace{}, 2, 160, size)
	for i := 0; i < len(blocks); i += 4 {
		require.NoError(t, s.Put(ctx, blocks[i:i+4]))
	}
	syncStore(t, s, 0)
	got, lost = take(s)
	assert.Len(t, got, 2)
	assert.Greater(t, lost, uint64(50))
}

// Without Options.Evictions the store hears nothing from the server, but still reports the
// blocks it deleted itself for failing their checks.
func TestEvictionsOffReportsCorruptDeletes(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, nil)
	require.ErrorIs(t, s.Watching(), redis.ErrInvalidArgument)
	take(s)
	ns := prefix.Namespace{Adapter: 1, Salt: "x"}
	blocks := chain(ns, 5, 2, blockBytes)
	require.NoError(t, s.Put(context.Background(), blocks))
	srv.Do("SET", s.Key(ns, blocks[1].Key), "garbage")
	requireRun(t, s, blocks, 1)
	got, lost := take(s)
	assert.Equal(t, []tier.Eviction{{NS: ns, Key: blocks[1].Key}}, got)
	assert.Zero(t, lost)
}

// Evictions need a single node: a cluster's nodes notify only their own subscribers.
func TestEvictionsRefusedForCluster(t *testing.T) {
	for _, o := range []redis.Options{
		{Addrs: []string{"a:1", "b:1"}, Model: "m", Fingerprint: fp, BlockBytes: 1, Evictions: true},
		{Addrs: []string{"a:1"}, Cluster: true, Model: "m", Fingerprint: fp, BlockBytes: 1, Evictions: true},
	} {
		_, err := redis.Open(o)
		var oe *redis.OptionError
		require.ErrorAs(t, err, &oe)
		assert.Equal(t, "Evictions", oe.Field)
	}
}
