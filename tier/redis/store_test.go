package redis_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/redistest"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/redis"
)

const blockBytes = 4096

var fp = tier.Fingerprint{0x9f, 0x86, 0xd0, 0x81, 1, 2, 3}

func TestMain(m *testing.M) {
	// go-redis logs each failed dial process-wide; the fault tests make many on purpose.
	goredis.SetLogger(quiet{})
	os.Exit(m.Run())
}

type quiet struct{}

func (quiet) Printf(context.Context, string, ...any) {}

// open returns a store on addrs, closed when the test ends.
func open(t testing.TB, addrs []string, edit func(*redis.Options)) *redis.Store {
	t.Helper()
	opt := redis.Options{Addrs: addrs, Model: "test-model", Fingerprint: fp, BlockBytes: blockBytes, Timeout: 500 * time.Millisecond}
	if edit != nil {
		edit(&opt)
	}
	s, err := redis.Open(opt)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// chain returns n blocks of a chain in ns, each key and its bytes derived from seed and place.
func chain(ns prefix.Namespace, seed byte, n, size int) []tier.Block {
	blocks := make([]tier.Block, n)
	parent := prefix.Root(ns, 16)
	for i := range blocks {
		b := tier.Block{NS: ns, Parent: parent, Data: make([]byte, size)}
		b.Key[0], b.Key[1], b.Key[2] = seed, byte(i), byte(i>>8)
		for j := range b.Data {
			b.Data[j] = byte(j*31+i*7) ^ seed
		}
		blocks[i], parent = b, b.Key
	}
	return blocks
}

func keysOf(blocks []tier.Block) []prefix.Key {
	keys := make([]prefix.Key, len(blocks))
	for i, b := range blocks {
		keys[i] = b.Key
	}
	return keys
}

func buffers(n, size int) [][]byte {
	dst := make([][]byte, n)
	for i := range dst {
		dst[i] = make([]byte, size)
	}
	return dst
}

// requireRun asserts that Get serves exactly the first want blocks, byte for byte.
func requireRun(t *testing.T, s *redis.Store, blocks []tier.Block, want int) {
	t.Helper()
	dst := buffers(len(blocks), len(blocks[0].Data))
	n, err := s.Get(context.Background(), blocks[0].NS, keysOf(blocks), dst)
	require.NoError(t, err)
	require.Equal(t, want, n)
	for i := range n {
		require.Equal(t, blocks[i].Data, dst[i], "block %d", i)
	}
}

func TestRoundTripSingleNode(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, nil)
	ctx := context.Background()
	require.NoError(t, s.Ping(ctx))
	ns := prefix.Namespace{Adapter: 3, Salt: "tenant-a"}
	blocks := chain(ns, 1, 8, blockBytes)

	n, err := s.Has(ctx, ns, keysOf(blocks))
	require.NoError(t, err)
	require.Zero(t, n)
	require.NoError(t, s.Put(ctx, blocks))
	n, err = s.Has(ctx, ns, keysOf(blocks))
	require.NoError(t, err)
	require.Equal(t, 8, n)
	requireRun(t, s, blocks, 8)

	// A hole ends the run: the blocks after it are useless without it.
	require.NoError(t, s.Drop(ctx, ns, []prefix.Key{blocks[5].Key}))
	requireRun(t, s, blocks, 5)
	n, err = s.Has(ctx, ns, keysOf(blocks))
	require.NoError(t, err)
	require.Equal(t, 5, n)

	st := s.Stats()
	assert.Equal(t, uint64(8), st.Puts)
	assert.Equal(t, uint64(8*blockBytes), st.PutBytes)
	assert.Equal(t, uint64(13), st.Gets)
	assert.Equal(t, uint64(13*blockBytes), st.GetBytes)
	assert.Equal(t, uint64(3), st.Misses) // Has before Put, Get and Has at the hole
	assert.Zero(t, st.Corrupt)
	assert.Zero(t, st.Failures)

	// The key layout the package doc promises, readable with redis-cli.
	key := s.Key(ns, blocks[0].Key)
	require.Regexp(t, `^pagedkv:v1:test-model:9f86d08101020300:0000000000000003-[0-9a-f]{16}:[0-9a-f]{64}$`, key)
	require.Equal(t, "1", srv.Do("EXISTS", key))
	require.Equal(t, strconv.Itoa(tier.HeaderSize(ns)+blockBytes), srv.Do("STRLEN", key))
	require.Equal(t, "-1", srv.Do("PTTL", key), "no TTL unless asked")
}

func TestTTL(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.TTL = time.Hour })
	blocks := chain(prefix.Namespace{}, 2, 2, blockBytes)
	require.NoError(t, s.Put(context.Background(), blocks))
	ttl, err := strconv.Atoi(srv.Do("PTTL", s.Key(blocks[1].NS, blocks[1].Key)))
	require.NoError(t, err)
	require.Greater(t, ttl, 0)
	require.LessOrEqual(t, ttl, int(time.Hour/time.Millisecond))
}

// One Put may carry blocks of several namespaces, whose headers differ in size: each is stored
// whole, on a single node (whose client writes every value through one buffer) as in a cluster
// (whose client writes to its nodes in parallel).
func TestPutMixedNamespaces(t *testing.T) {
	for name, addrs := range map[string][]string{
		"node":    {redistest.Start(t).Addr},
		"cluster": redistest.StartCluster(t, 3).Addrs(),
	} {
		t.Run(name, func(t *testing.T) {
			s := open(t, addrs, nil)
			ctx := context.Background()
			salts := []string{"", "a", strings.Repeat("s", 300), "", strings.Repeat("t", 5000), "b"}
			var blocks []tier.Block
			for i, salt := range salts {
				blocks = append(blocks, chain(prefix.Namespace{Adapter: uint64(i), Salt: salt}, byte(40+i), 3, blockBytes)...)
			}
			require.NoError(t, s.Put(ctx, blocks))
			for i := range salts {
				requireRun(t, s, blocks[3*i:3*i+3], 3)
			}
			require.Zero(t, s.Stats().Corrupt)
		})
	}
}

// In a cluster the blocks of one chain spread over the nodes (no hash tag pins them to one
// slot) and Get still returns the whole run in order.
func TestClusterRoundTripAcrossSlots(t *testing.T) {
	c := redistest.StartCluster(t, 3)
	s := open(t, c.Addrs(), nil)
	ctx := context.Background()
	ns := prefix.Namespace{Adapter: 1, Salt: "s"}
	blocks := chain(ns, 3, 48, blockBytes)
	require.NoError(t, s.Put(ctx, blocks))
	requireRun(t, s, blocks, 48)
	n, err := s.Has(ctx, ns, keysOf(blocks))
	require.NoError(t, err)
	require.Equal(t, 48, n)

	total := 0
	for _, node := range c.Nodes {
		held, err := strconv.Atoi(node.Do("DBSIZE"))
		require.NoError(t, err)
		assert.Positive(t, held, "node %s holds none of the chain", node.Addr)
		total += held
	}
	require.Equal(t, 48, total)

	require.NoError(t, s.Drop(ctx, ns, keysOf(blocks)[10:]))
	requireRun(t, s, blocks, 10)
	assert.Zero(t, s.Stats().Failures)
}

// The bound "10 x Timeout" is generous: the point is that a call never blocks on a dead or
// stalled server, not how fast it gives up.
const timeout = 100 * time.Millisecond

func requireUnavailableWithin(t *testing.T, what string, call func() error) {
	t.Helper()
	start := time.Now()
	err := call()
	took := time.Since(start)
	require.ErrorIs(t, err, redis.ErrUnavailable, what)
	var ce *redis.CallError
	require.ErrorAs(t, err, &ce, what)
	require.LessOrEqual(t, took, 10*timeout, "%s blocked for %v", what, took)
}

func TestKilledServerFailsFastAndRecovers(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.Timeout = timeout })
	ctx := context.Background()
	ns := prefix.Namespace{Salt: "k"}
	blocks := chain(ns, 4, 4, blockBytes)
	require.NoError(t, s.Put(ctx, blocks))
	requireRun(t, s, blocks, 4)

	srv.Kill()
	dst := buffers(4, blockBytes)
	requireUnavailableWithin(t, "get", func() error { _, err := s.Get(ctx, ns, keysOf(blocks), dst); return err })
	requireUnavailableWithin(t, "has", func() error { _, err := s.Has(ctx, ns, keysOf(blocks)); return err })
	requireUnavailableWithin(t, "put", func() error { return s.Put(ctx, blocks) })
	requireUnavailableWithin(t, "drop", func() error { return s.Drop(ctx, ns, keysOf(blocks)) })
	requireUnavailableWithin(t, "ping", func() error { return s.Ping(ctx) })
	st := s.Stats()
	require.Equal(t, uint64(5), st.Failures)
	require.Equal(t, uint64(4), st.Puts, "a failed Put stores nothing")

	// The same store works again once the server is back (empty: persistence is off).
	srv.Restart()
	requireEventually(t, func() error { return s.Ping(ctx) })
	requireRun(t, s, blocks, 0)
	require.NoError(t, s.Put(ctx, blocks))
	requireRun(t, s, blocks, 4)
}

// requireEventually retries call until it succeeds, for a reconnect that may take a retry or
// two; the bound only keeps a broken client from hanging the test.
func requireEventually(t *testing.T, call func() error) {
	t.Helper()
	var err error
	for range 100 {
		if err = call(); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	require.NoError(t, err)
}

// Open does not connect: a store opened while its server is down works once the server is up.
func TestOpenWhileServerDown(t *testing.T) {
	srv := redistest.Start(t)
	srv.Kill()
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.Timeout = timeout })
	requireUnavailableWithin(t, "ping", func() error { return s.Ping(context.Background()) })
	srv.Restart()
	requireEventually(t, func() error { return s.Ping(context.Background()) })
	blocks := chain(prefix.Namespace{}, 5, 2, blockBytes)
	require.NoError(t, s.Put(context.Background(), blocks))
	requireRun(t, s, blocks, 2)
}

// A stalled server (CLIENT PAUSE) makes calls end at the store's timeout or the caller's
// deadline, whichever comes first.
func TestStalledServerHonoursDeadlines(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.Timeout = timeout })
	ctx := context.Background()
	blocks := chain(prefix.Namespace{}, 6, 2, blockBytes)
	require.NoError(t, s.Put(ctx, blocks))
	require.Equal(t, "OK", srv.Do("CLIENT", "PAUSE", "5000", "ALL"))

	dst := buffers(2, blockBytes)
	requireUnavailableWithin(t, "get", func() error { _, err := s.Get(ctx, blocks[0].NS, keysOf(blocks), dst); return err })
	requireUnavailableWithin(t, "put", func() error { return s.Put(ctx, blocks) })

	// A caller's deadline shorter than the store's timeout ends the call first.
	slow := open(t, []string{srv.Addr}, func(o *redis.Options) { o.Timeout = time.Minute })
	short, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var err error
	requireUnavailableWithin(t, "has", func() error { _, err = slow.Has(short, blocks[0].NS, keysOf(blocks)); return err })
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

// Under allkeys-lru a full server evicts: Puts keep succeeding and old blocks become misses.
func TestFullServerEvictsToMisses(t *testing.T) {
	srv := redistest.Start(t, "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
	const size = 64 << 10
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.BlockBytes = size })
	ctx := context.Background()
	blocks := chain(prefix.Namespace{}, 7, 160, size) // 10 MiB through a 4 MiB server
	for i := 0; i < len(blocks); i += 4 {
		require.NoError(t, s.Put(ctx, blocks[i:i+4]))
	}
	held := 0
	for _, b := range blocks {
		n, err := s.Has(ctx, b.NS, []prefix.Key{b.Key})
		require.NoError(t, err)
		held += n
	}
	require.Positive(t, held)
	require.Less(t, held, len(blocks))
	evicted, err := strconv.Atoi(infoField(t, srv, "evicted_keys"))
	require.NoError(t, err)
	require.Positive(t, evicted)
	st := s.Stats()
	require.Zero(t, st.Failures)
	require.Equal(t, uint64(len(blocks)), st.Puts)
}

func infoField(t *testing.T, srv *redistest.Server, field string) string {
	t.Helper()
	for _, line := range strings.Split(srv.Do("INFO", "stats"), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			return v
		}
	}
	t.Fatalf("INFO has no %s", field)
	return ""
}

// Under noeviction a full server refuses writes: Put returns ErrOutOfMemory, counted, and the
// store keeps serving what it holds; dropping blocks makes room again.
func TestFullServerNoEvictionPutFails(t *testing.T) {
	srv := redistest.Start(t, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
	const size = 64 << 10
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.BlockBytes = size })
	ctx := context.Background()
	blocks := chain(prefix.Namespace{}, 8, 160, size)
	var err error
	put := 0
	for ; put < len(blocks) && err == nil; put += 4 {
		err = s.Put(ctx, blocks[put:put+4])
	}
	require.ErrorIs(t, err, redis.ErrOutOfMemory)
	require.ErrorIs(t, err, redis.ErrUnavailable)
	var ce *redis.CallError
	require.ErrorAs(t, err, &ce)
	require.True(t, ce.Full)
	require.Equal(t, uint64(1), s.Stats().Failures)

	requireRun(t, s, blocks[:4], 4)
	require.NoError(t, s.Drop(ctx, blocks[0].NS, keysOf(blocks[:put])))
	require.NoError(t, s.Put(ctx, blocks[:4]))
	requireRun(t, s, blocks[:4], 4)
}

// A large batch is spread over Options.Pipelines connections: every block arrives whole, and
// the counters count each once.
func TestPutSpreadOverPipelines(t *testing.T) {
	srv := redistest.Start(t)
	const size = 256 << 10
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.BlockBytes, o.Pipelines = size, 3 })
	ns := prefix.Namespace{Salt: "spread"}
	blocks := chain(ns, 4, 16, size)
	encoded := 16 * (tier.HeaderSize(ns) + size)
	require.Equal(t, 3, s.Pipelines(encoded, 16))
	require.Equal(t, 2, s.Pipelines(encoded, 2), "no pipeline without a block")
	require.Equal(t, 1, s.Pipelines(redis.PipelineBytes+1, 16), "none carries less than PipelineBytes")
	require.Equal(t, 1, s.Pipelines(0, 0))
	require.NoError(t, s.Put(context.Background(), blocks))
	requireRun(t, s, blocks, 16)
	require.Equal(t, "16", srv.Do("DBSIZE"))
	st := s.Stats()
	require.Equal(t, uint64(16), st.Puts)
	require.Equal(t, uint64(16*size), st.PutBytes)
	require.Zero(t, st.Failures)
	var none *redis.Store
	require.Zero(t, none.Pipelines(encoded, 16))
}

// A spread Put that fills a noeviction server fails once, and counts as stored exactly the
// blocks the server took, whichever pipelines they came on.
func TestPutSpreadFullServer(t *testing.T) {
	srv := redistest.Start(t, "--maxmemory", "6mb", "--maxmemory-policy", "noeviction")
	const size = 256 << 10
	s := open(t, []string{srv.Addr}, func(o *redis.Options) { o.BlockBytes, o.Pipelines = size, 2 })
	blocks := chain(prefix.Namespace{}, 9, 64, size)
	var err error
	for at := 0; at < len(blocks) && err == nil; at += 8 {
		err = s.Put(context.Background(), blocks[at:at+8])
	}
	require.ErrorIs(t, err, redis.ErrOutOfMemory)
	st := s.Stats()
	require.Equal(t, uint64(1), st.Failures)
	require.Equal(t, srv.Do("DBSIZE"), strconv.FormatUint(st.Puts, 10))
	require.Positive(t, st.Puts)
	require.Less(t, st.Puts, uint64(len(blocks)))
}

// A stored value that fails its checks ends the run; Get deletes it and counts it, and serves
// the blocks before it.
func TestCorruptValueDroppedAndCounted(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, nil)
	ctx := context.Background()
	ns := prefix.Namespace{Adapter: 1, Salt: "c"}
	hs := tier.HeaderSize(ns)
	for _, tc := range []struct {
		name  string
		spoil func(key string)
	}{
		{"data byte", func(key string) { srv.Do("SETRANGE", key, strconv.Itoa(hs+10), "\x01\x02") }},
		{"header byte", func(key string) { srv.Do("SETRANGE", key, "50", "Z") }},
		{"truncated", func(key string) { srv.Do("SET", key, "PKVBLK01 torn") }},
		{"grown", func(key string) { srv.Do("APPEND", key, "x") }},
		// Longer than the buffer Get reads a block into: the read fails as a broken
		// connection's would, and the store still tells it for a corrupt value.
		{"grown past its buffer", func(key string) { srv.Do("APPEND", key, strings.Repeat("x", 100)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blocks := chain(ns, 9, 5, blockBytes)
			require.NoError(t, s.Put(ctx, blocks))
			before := s.Stats()
			key := s.Key(ns, blocks[2].Key)
			tc.spoil(key)
			requireRun(t, s, blocks, 2)
			require.Equal(t, "0", srv.Do("EXISTS", key), "the corrupt block is deleted")
			after := s.Stats()
			require.Equal(t, before.Corrupt+1, after.Corrupt)
			require.Equal(t, before.Failures, after.Failures)
			requireRun(t, s, blocks, 2) // now a plain miss
			require.Equal(t, before.Corrupt+1, s.Stats().Corrupt)
		})
	}
}

// Tenants never read each other's blocks: the namespace is in every key, and a block copied
// under another namespace's key fails the header's check.
func TestNamespacesIsolated(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, nil)
	ctx := context.Background()
	a := prefix.Namespace{Adapter: 1, Salt: "a"}
	blocks := chain(a, 10, 3, blockBytes)
	require.NoError(t, s.Put(ctx, blocks))
	for _, other := range []prefix.Namespace{{Adapter: 1, Salt: "b"}, {Adapter: 2, Salt: "a"}, {}} {
		require.NotEqual(t, s.Key(a, blocks[0].Key), s.Key(other, blocks[0].Key))
		n, err := s.Get(ctx, other, keysOf(blocks), buffers(3, blockBytes))
		require.NoError(t, err)
		require.Zero(t, n, "namespace %+v", other)
	}
	require.Zero(t, s.Stats().Corrupt)
	requireRun(t, s, blocks, 3)

	// A foreign block under b's key (a salt-hash collision, a rogue writer) is never served.
	b := prefix.Namespace{Adapter: 1, Salt: "b"}
	require.Equal(t, "1", srv.Do("COPY", s.Key(a, blocks[0].Key), s.Key(b, blocks[0].Key)))
	n, err := s.Get(ctx, b, keysOf(blocks[:1]), buffers(1, blockBytes))
	require.NoError(t, err)
	require.Zero(t, n)
	require.Equal(t, uint64(1), s.Stats().Corrupt)
	require.Equal(t, "0", srv.Do("EXISTS", s.Key(b, blocks[0].Key)))
	requireRun(t, s, blocks, 3)
}

// Another model's geometry never reads this one's blocks, even under the same key.
func TestOtherFingerprintMismatchDropped(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, nil)
	other := open(t, []string{srv.Addr}, func(o *redis.Options) { o.Fingerprint = tier.Fingerprint{0x9f, 0x86, 0xd0, 0x81, 1, 2, 3, 0, 0xee} })
	ctx := context.Background()
	ns := prefix.Namespace{}
	blocks := chain(ns, 11, 2, blockBytes)
	require.NoError(t, other.Put(ctx, blocks))
	// The first 8 bytes of the fingerprints agree, so the keys do: only the header tells.
	require.Equal(t, s.Key(ns, blocks[0].Key), other.Key(ns, blocks[0].Key))
	n, err := s.Get(ctx, ns, keysOf(blocks), buffers(2, blockBytes))
	require.NoError(t, err)
	require.Zero(t, n)
	require.Equal(t, uint64(1), s.Stats().Corrupt)
	require.Equal(t, "0", srv.Do("EXISTS", s.Key(ns, blocks[0].Key)))
	n, err = other.Has(ctx, ns, keysOf(blocks))
	require.NoError(t, err)
	require.Zero(t, n, "the mismatched block was dropped")

	third := open(t, []string{srv.Addr}, func(o *redis.Options) { o.Fingerprint = tier.Fingerprint{1} })
	require.NoError(t, third.Put(ctx, blocks))
	n, err = s.Has(ctx, ns, keysOf(blocks))
	require.NoError(t, err)
	require.Zero(t, n, "another fingerprint's keys differ")
}

func TestOpenRejectsInvalidOptions(t *testing.T) {
	good := redis.Options{Addrs: []string{"127.0.0.1:1"}, Model: "m", Fingerprint: fp, BlockBytes: 1}
	for _, tc := range []struct {
		field string
		edit  func(*redis.Options)
	}{
		{"Addrs", func(o *redis.Options) { o.Addrs = nil }},
		{"Addrs[1]", func(o *redis.Options) { o.Addrs = []string{"a:1", ""} }},
		{"Model", func(o *redis.Options) { o.Model = "" }},
		{"Model", func(o *redis.Options) { o.Model = "{tag}" }},
		{"Model", func(o *redis.Options) { o.Model = "a:b" }},
		{"Model", func(o *redis.Options) { o.Model = string(make([]byte, 129)) }},
		{"Fingerprint", func(o *redis.Options) { o.Fingerprint = tier.Fingerprint{} }},
		{"BlockBytes", func(o *redis.Options) { o.BlockBytes = 0 }},
		{"BlockBytes", func(o *redis.Options) { o.BlockBytes = -1 }},
		{"BlockBytes", func(o *redis.Options) { o.BlockBytes = 1 << 30 }},
		{"Timeout", func(o *redis.Options) { o.Timeout = -1 }},
		{"Pipelines", func(o *redis.Options) { o.Pipelines = -1 }},
		{"Pipelines", func(o *redis.Options) { o.Pipelines = redis.MaxPipelines + 1 }},
		{"TTL", func(o *redis.Options) { o.TTL = time.Microsecond }},
		{"TTL", func(o *redis.Options) { o.TTL = -time.Second }},
		{"URL", func(o *redis.Options) { o.URL = "redis://127.0.0.1:1" }}, // and Addrs
		{"URL", func(o *redis.Options) { o.Addrs, o.URL = nil, "redis://u:pw@host:port" }},
		{"URL", func(o *redis.Options) { o.Addrs, o.URL = nil, "redis://host:1/db" }},
		{"URL", func(o *redis.Options) { o.Addrs, o.URL = nil, "redis://host:1/0/1" }},
		{"URL", func(o *redis.Options) { o.Addrs, o.URL = nil, "http://host:1" }},
		{"URL", func(o *redis.Options) { o.Addrs, o.URL = nil, "host:1" }},
		{"URL", func(o *redis.Options) { o.Addrs, o.URL = nil, "redis://host:1?dial_timeout=1" }},
		{"URL", func(o *redis.Options) { o.Addrs, o.URL, o.Password = nil, "redis://:a@host:1", "b" }},
		{"URL", func(o *redis.Options) { o.Addrs, o.URL, o.Cluster = nil, "redis://host:1/?db=2", true }},
	} {
		opt := good
		tc.edit(&opt)
		s, err := redis.Open(opt)
		require.ErrorIs(t, err, redis.ErrInvalidArgument, tc.field)
		var oe *redis.OptionError
		require.ErrorAs(t, err, &oe, tc.field)
		require.Equal(t, tc.field, oe.Field)
		require.Nil(t, s)
		require.NotContains(t, err.Error(), "pw", "a password never reaches an error text")
	}
	for _, url := range []string{"redis://127.0.0.1:1", "rediss://u:p@[::1]:1/3", "redis://h:1?db=2"} {
		opt := good
		opt.Addrs, opt.URL = nil, url
		require.NoError(t, opt.Validate(), url)
	}
	cluster := good
	cluster.Addrs, cluster.URL, cluster.Cluster = nil, "redis://a:1?addr=b:2&addr=c:3", true
	require.NoError(t, cluster.Validate())
	var nilOpt *redis.Options
	require.ErrorIs(t, nilOpt.Validate(), redis.ErrInvalidArgument)
	s, err := redis.Open(good)
	require.NoError(t, err)
	require.NoError(t, s.Close())
}

// Malformed calls fail before touching the server (none runs here) and count nothing.
func TestExtremeArguments(t *testing.T) {
	s, err := redis.Open(redis.Options{Addrs: []string{"127.0.0.1:1"}, Model: "m", Fingerprint: fp, BlockBytes: blockBytes})
	require.NoError(t, err)
	ctx := context.Background()
	ns := prefix.Namespace{}
	blocks := chain(ns, 12, 2, blockBytes)
	keys := keysOf(blocks)
	var nilCtx context.Context

	var se *redis.SizeError
	for name, dst := range map[string][][]byte{
		"nil dst":   nil,
		"short dst": buffers(1, blockBytes),
		"small buf": {make([]byte, blockBytes), make([]byte, blockBytes-1)},
		"large buf": {make([]byte, blockBytes+1), make([]byte, blockBytes)},
		"nil buf":   {nil, make([]byte, blockBytes)},
	} {
		n, err := s.Get(ctx, ns, keys, dst)
		require.ErrorIs(t, err, redis.ErrInvalidArgument, name)
		require.ErrorAs(t, err, &se, name)
		require.Zero(t, n)
	}
	short := chain(ns, 12, 2, blockBytes-1)
	require.ErrorAs(t, s.Put(ctx, short), &se)
	require.Equal(t, "blocks[0].Data", se.What)
	salted := chain(prefix.Namespace{Salt: string(make([]byte, tier.MaxSalt+1))}, 12, 1, blockBytes)
	require.ErrorIs(t, s.Put(ctx, salted), redis.ErrInvalidArgument)

	// Empty calls succeed without a round trip (the server is down).
	n, err := s.Get(ctx, ns, nil, nil)
	require.NoError(t, err)
	require.Zero(t, n)
	n, err = s.Has(ctx, ns, nil)
	require.NoError(t, err)
	require.Zero(t, n)
	require.NoError(t, s.Put(ctx, nil))
	require.NoError(t, s.Drop(ctx, ns, nil))

	_, err = s.Get(nilCtx, ns, keys, buffers(2, blockBytes))
	require.ErrorIs(t, err, redis.ErrInvalidArgument)
	_, err = s.Has(nilCtx, ns, keys)
	require.ErrorIs(t, err, redis.ErrInvalidArgument)
	require.ErrorIs(t, s.Put(nilCtx, blocks), redis.ErrInvalidArgument)
	require.ErrorIs(t, s.Drop(nilCtx, ns, keys), redis.ErrInvalidArgument)
	require.ErrorIs(t, s.Ping(nilCtx), redis.ErrInvalidArgument)
	require.Equal(t, tier.Stats{}, s.Stats())

	require.NoError(t, s.Close())
	require.ErrorIs(t, s.Close(), redis.ErrClosed)
	_, err = s.Get(ctx, ns, keys, buffers(2, blockBytes))
	require.ErrorIs(t, err, redis.ErrClosed)
	_, err = s.Has(ctx, ns, keys)
	require.ErrorIs(t, err, redis.ErrClosed)
	require.ErrorIs(t, s.Put(ctx, blocks), redis.ErrClosed)
	require.ErrorIs(t, s.Drop(ctx, ns, keys), redis.ErrClosed)
	require.ErrorIs(t, s.Ping(ctx), redis.ErrClosed)
	require.False(t, errors.Is(err, redis.ErrUnavailable))

	var none *redis.Store
	_, err = none.Get(ctx, ns, keys, buffers(2, blockBytes))
	require.ErrorIs(t, err, redis.ErrInvalidArgument)
	require.ErrorIs(t, none.Close(), redis.ErrInvalidArgument)
	require.Equal(t, tier.Stats{}, none.Stats())
	require.Empty(t, none.Key(ns, keys[0]))
}

// Concurrent callers each see their own blocks intact (run with -race): the store shares its
// connections and its Put buffers between them.
func TestConcurrentUse(t *testing.T) {
	srv := redistest.Start(t)
	s := open(t, []string{srv.Addr}, nil)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			ns := prefix.Namespace{Adapter: uint64(g)}
			blocks := chain(ns, byte(20+g), 6, blockBytes)
			dst := buffers(6, blockBytes)
			for range 10 {
				if err := s.Put(ctx, blocks); err != nil {
					errs <- err
					return
				}
				n, err := s.Get(ctx, ns, keysOf(blocks), dst)
				if err != nil || n != 6 {
					errs <- fmt.Errorf("goroutine %d: got %d blocks: %v", g, n, err)
					return
				}
				for i := range dst {
					if !bytes.Equal(dst[i], blocks[i].Data) {
						errs <- fmt.Errorf("goroutine %d: block %d differs", g, i)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, uint64(8*10*6), s.Stats().Gets)
}

// A cluster node that dies takes its slots' blocks with it: Get serves the run up to the first
// block it held and reports the failure, within the deadline.
func TestClusterNodeKilled(t *testing.T) {
	c := redistest.StartCluster(t, 3)
	s := open(t, c.Addrs(), func(o *redis.Options) { o.Timeout = timeout })
	ctx := context.Background()
	ns := prefix.Namespace{Salt: "n"}
	blocks := chain(ns, 30, 24, blockBytes)
	require.NoError(t, s.Put(ctx, blocks))
	dead := c.Nodes[1]
	first := -1
	for i, b := range blocks {
		if dead.Do("EXISTS", s.Key(ns, b.Key)) == "1" { // other slots answer MOVED
			first = i
			break
		}
	}
	require.GreaterOrEqual(t, first, 0, "the node holds none of the chain")

	dead.Kill()
	dst := buffers(len(blocks), blockBytes)
	var n int
	requireUnavailableWithin(t, "get", func() error {
		var err error
		n, err = s.Get(ctx, ns, keysOf(blocks), dst)
		return err
	})
	require.Equal(t, first, n)
	for i := range n {
		require.Equal(t, blocks[i].Data, dst[i])
	}
	requireUnavailableWithin(t, "has", func() error {
		var err error
		n, err = s.Has(ctx, ns, keysOf(blocks))
		return err
	})
	require.Equal(t, first, n)
}

// A server that requires a password: the store opens (it does not connect), and every call
// fails with ErrDenied (and ErrUnavailable), counted, until the store has the right password,
// in Password or in a URL.
func TestWrongPasswordIsDenied(t *testing.T) {
	srv := redistest.Start(t, "--requirepass", "secret")
	ctx := context.Background()
	blocks := chain(prefix.Namespace{}, 5, 2, blockBytes)
	for _, edit := range []func(*redis.Options){
		func(o *redis.Options) { o.Password = "wrong" },
		func(o *redis.Options) {},
		func(o *redis.Options) { o.Addrs, o.URL = nil, "redis://:wrong@"+srv.Addr },
	} {
		s := open(t, []string{srv.Addr}, edit)
		err := s.Ping(ctx)
		require.ErrorIs(t, err, redis.ErrDenied)
		require.ErrorIs(t, err, redis.ErrUnavailable)
		var ce *redis.CallError
		require.ErrorAs(t, err, &ce)
		assert.True(t, ce.Denied)
		assert.NotContains(t, err.Error(), "wrong")
		require.ErrorIs(t, s.Put(ctx, blocks), redis.ErrDenied)
		n, err := s.Get(ctx, prefix.Namespace{}, keysOf(blocks), buffers(2, blockBytes))
		require.ErrorIs(t, err, redis.ErrDenied)
		assert.Zero(t, n)
		assert.Equal(t, uint64(3), s.Stats().Failures)
	}
	for _, edit := range []func(*redis.Options){
		func(o *redis.Options) { o.Password = "secret" },
		func(o *redis.Options) { o.Addrs, o.URL = nil, "redis://:secret@"+srv.Addr },
		func(o *redis.Options) { o.Addrs, o.URL, o.Password = nil, "redis://"+srv.Addr+"/1", "secret" },
	} {
		s := open(t, []string{srv.Addr}, edit)
		require.NoError(t, s.Ping(ctx))
		requireRun(t, s, blocks, 0)
		require.NoError(t, s.Put(ctx, blocks))
		requireRun(t, s, blocks, 2)
		require.NoError(t, s.Drop(ctx, prefix.Namespace{}, keysOf(blocks)))
		assert.Zero(t, s.Stats().Failures)
	}
	// The URL's database is the one written.
	s := open(t, nil, func(o *redis.Options) { o.URL = "redis://:secret@" + srv.Addr + "/2" })
	require.NoError(t, s.Put(ctx, blocks))
	assert.Equal(t, "2", srv.Do("--no-auth-warning", "-a", "secret", "-n", "2", "DBSIZE"))
	assert.Equal(t, "0", srv.Do("--no-auth-warning", "-a", "secret", "-n", "0", "DBSIZE"))
}
