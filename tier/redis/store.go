package redis

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// Store is a tier.Store on a Redis server or cluster. Open returns it; Close releases its
// connections. It is safe for concurrent use.
type Store struct {
	opt     Options
	timeout time.Duration
	keyHead string // "pagedkv:v1:<model>:<fingerprint>:"
	client  goredis.UniversalClient
	closed  atomic.Bool
	serial  bool      // the client writes a pipeline's commands in order on one connection
	pipes   int       // connections a large Put spreads over (Options.Pipelines, resolved)
	batches sync.Pool // *batch: a call's buffers, reused once its pipeline returns

	puts, putBytes, gets, getBytes, misses, corrupt, failures atomic.Uint64

	ev evictions
}

var _ tier.Store = (*Store)(nil)

// Open validates opt and returns a Store for its servers. It does not connect: a server that is
// down makes calls fail (and count) until it is back, and Ping reports whether it answers.
func Open(opt Options) (*Store, error) {
	if err := opt.Validate(); err != nil {
		return nil, fmt.Errorf("tier/redis: open: %w", err)
	}
	ep, _ := opt.endpoint() // Validate has checked it
	opt.Addrs = append([]string(nil), opt.Addrs...)
	s := &Store{opt: opt, timeout: opt.Timeout}
	if s.timeout == 0 {
		s.timeout = DefaultTimeout
	}
	s.keyHead = "pagedkv:v1:" + opt.Model + ":" + hex.EncodeToString(opt.Fingerprint[:8]) + ":"
	s.client = goredis.NewUniversalClient(&goredis.UniversalOptions{
		Addrs:                 ep.addrs,
		IsClusterMode:         opt.Cluster,
		Username:              ep.username,
		Password:              ep.password,
		DB:                    ep.db,
		TLSConfig:             ep.tls,
		DialTimeout:           s.timeout,
		ReadTimeout:           s.timeout,
		WriteTimeout:          s.timeout,
		ContextTimeoutEnabled: true, // the call's deadline, not a fixed one, bounds each read
		// One retry replaces a pooled connection the server dropped (a restart); a second
		// would only spend the caller's deadline on a server that is down.
		MaxRetries:    1,
		DialerRetries: 1,
		// In a cluster, no second round: a retried pipeline that runs out of time marks every
		// command failed, the hits from live nodes included (go-redis v9.23 processPipeline).
		// Without it a dead node's blocks fail at once, the run before them is served, and a
		// MOVED reply (a resharding) is one failed call while the client reloads the slot map.
		MaxRedirects:             -1,
		DisableIdentity:          true, // no CLIENT SETINFO round trip on each new connection
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	})
	// A single node's client writes each SET's value before it encodes the next; a cluster
	// client writes to its nodes in parallel.
	_, s.serial = s.client.(*goredis.Client)
	s.pipes = 1
	switch {
	case !s.serial:
	case opt.Pipelines > 0:
		s.pipes = opt.Pipelines
	case runtime.GOMAXPROCS(0) >= 4:
		s.pipes = 2
	}
	s.startWatch()
	return s, nil
}

// Client returns the go-redis client the store owns (nil for a nil store), so that a benchmark
// or a tool measures or inspects the servers through the same connections: the bench program's
// yardstick is pipelined raw SETs and GETs on it. The store still owns the client: the caller
// neither closes it nor uses it after Close.
func (s *Store) Client() goredis.UniversalClient {
	if s == nil {
		return nil
	}
	return s.client
}

// Key returns the Redis key under which the store keeps block k of namespace ns, for operators
// and tools that inspect the server (the package doc describes the layout).
func (s *Store) Key(ns prefix.Namespace, k prefix.Key) string {
	if s == nil {
		return ""
	}
	return s.key(nsTag(ns), k)
}

// nsTag is the namespace's part of a key: the adapter and a hash of the salt, so that a tenant's
// salt never appears on the server in clear.
func nsTag(ns prefix.Namespace) string {
	sum := sha256.Sum256([]byte(ns.Salt))
	var adapter [8]byte
	binary.BigEndian.PutUint64(adapter[:], ns.Adapter)
	b := make([]byte, 0, 33)
	b = hex.AppendEncode(b, adapter[:])
	b = append(b, '-')
	b = hex.AppendEncode(b, sum[:8])
	return string(b)
}

func (s *Store) key(tag string, k prefix.Key) string {
	b := make([]byte, 0, len(s.keyHead)+len(tag)+1+2*len(k))
	b = append(b, s.keyHead...)
	b = append(b, tag...)
	b = append(b, ':')
	b = hex.AppendEncode(b, k[:])
	return string(b)
}

// begin checks what every call needs and bounds the call by the store's timeout.
func (s *Store) begin(ctx context.Context, op string) (context.Context, context.CancelFunc, error) {
	switch {
	case s == nil:
		return nil, nil, fmt.Errorf("tier/redis: %s: %w: nil store", op, ErrInvalidArgument)
	case ctx == nil:
		return nil, nil, fmt.Errorf("tier/redis: %s: %w: nil context", op, ErrInvalidArgument)
	case s.closed.Load():
		return nil, nil, fmt.Errorf("tier/redis: %s: %w", op, ErrClosed)
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	return ctx, cancel, nil
}

// fail counts a failed call and wraps the client's error.
func (s *Store) fail(op string, keys int, err error) error {
	if s.closed.Load() && errors.Is(err, goredis.ErrClosed) {
		return fmt.Errorf("tier/redis: %s: %w", op, ErrClosed)
	}
	s.failures.Add(1)
	denied := goredis.IsAuthError(err) || goredis.IsPermissionError(err)
	return fmt.Errorf("tier/redis: %w", &CallError{Op: op, Keys: keys, Full: goredis.IsOOMError(err), Denied: denied, Err: err})
}

// exec runs a pipeline and returns its commands, each holding its reply or its error, which
// the caller reads. A single node's client leaves every command unmarked when the connection
// fails with a server's error reply (WRONGPASS to its AUTH): none ran, so each gets that error.
func exec(ctx context.Context, pipe goredis.Pipeliner) []goredis.Cmder {
	cmds, err := pipe.Exec(ctx)
	if err == nil {
		return cmds
	}
	for _, c := range cmds {
		if c.Err() != nil {
			return cmds
		}
	}
	for _, c := range cmds {
		c.SetErr(err)
	}
	return cmds
}

// Put stores the blocks with one pipelined SET each (with Options.TTL where set), a large batch
// spread over Options.Pipelines connections (see Pipelines). Every block's Data must be
// Options.BlockBytes long. A full server under noeviction refuses the SETs: Put returns a
// *CallError (ErrOutOfMemory) and the blocks whose SETs it took stay: spread over pipelines,
// those may include blocks after a refused one, which Get (a leading run) serves only once the
// blocks before them are stored again; use an evicting policy (allkeys-lru) or a TTL for a
// cache. The store does not keep blocks' memory after Put returns.
func (s *Store) Put(ctx context.Context, blocks []tier.Block) error {
	ctx, cancel, err := s.begin(ctx, "put")
	if err != nil {
		return err
	}
	defer cancel()
	total, largest := 0, 0
	for i, b := range blocks {
		if len(b.Data) != s.opt.BlockBytes {
			return fmt.Errorf("tier/redis: put: %w", &SizeError{What: "blocks[" + strconv.Itoa(i) + "].Data", Unit: "bytes", Got: len(b.Data), Want: s.opt.BlockBytes})
		}
		if len(b.NS.Salt) > tier.MaxSalt {
			return fmt.Errorf("tier/redis: put: %w", &errdefs.CountError{What: "blocks[" + strconv.Itoa(i) + "].NS.Salt bytes", N: len(b.NS.Salt), Max: tier.MaxSalt})
		}
		total += tier.HeaderSize(b.NS) + len(b.Data)
		largest = max(largest, tier.HeaderSize(b.NS)+len(b.Data))
	}
	if len(blocks) == 0 {
		return nil
	}
	parts := s.putPipelines(total, len(blocks))
	stored, err := 0, error(nil)
	if parts == 1 {
		stored, err = s.putRun(ctx, blocks, total, largest)
	} else {
		stored, err = s.putSpread(ctx, blocks, parts, largest)
	}
	s.puts.Add(uint64(stored))
	s.putBytes.Add(uint64(stored * s.opt.BlockBytes))
	if err != nil {
		return s.fail("put", len(blocks), err)
	}
	return nil
}

// Pipelines returns how many connections a Put of n blocks (as encoded, bytes in all) spreads
// over: Options.Pipelines, resolved, but no more than bytes/PipelineBytes (each share about
// PipelineBytes or more, the blocks split as evenly as their count allows) and n.
// A benchmark's yardstick spreads its raw SETs the same way. 0 for a nil store.
func (s *Store) Pipelines(bytes, n int) int {
	if s == nil {
		return 0
	}
	return s.putPipelines(bytes, n)
}

func (s *Store) putPipelines(bytes, n int) int {
	return max(1, min(s.pipes, bytes/PipelineBytes, n))
}

// putSpread is Put over parts connections at once: the blocks in parts nearly equal runs, each
// written by putRun on a goroutine of its own (the first on the caller's). It returns the blocks
// stored and the first run's error.
func (s *Store) putSpread(ctx context.Context, blocks []tier.Block, parts, largest int) (int, error) {
	type result struct {
		stored int
		err    error
	}
	results := make(chan result, parts-1)
	run := func(p int) result {
		from, to := p*len(blocks)/parts, (p+1)*len(blocks)/parts
		n, err := s.putRun(ctx, blocks[from:to], largest, largest)
		return result{n, err}
	}
	for p := 1; p < parts; p++ {
		go func() { results <- run(p) }()
	}
	r := run(0)
	for range parts - 1 {
		o := <-results
		r.stored += o.stored
		if r.err == nil {
			r.err = o.err
		}
	}
	return r.stored, r.err
}

// putRun writes blocks in one pipeline of SETs and returns how many were stored and the first
// command's error. total is the bytes of the encoded blocks, largest the longest one's.
func (s *Store) putRun(ctx context.Context, blocks []tier.Block, total, largest int) (int, error) {
	bt := s.batch()
	defer s.release(bt)
	if s.serial {
		total = largest
	}
	buf, vals := bt.bytes(total), bt.values(len(blocks))
	pipe := s.client.Pipeline()
	var tag string
	off := 0
	for i := range blocks {
		b := &blocks[i]
		if i == 0 || b.NS != blocks[i-1].NS {
			tag = nsTag(b.NS)
		}
		size := tier.HeaderSize(b.NS) + len(b.Data)
		vals[i] = value{fp: &s.opt.Fingerprint, b: b, buf: buf[off : off : off+size]}
		if !s.serial {
			off += size
		}
		pipe.Set(ctx, s.key(tag, b.Key), &vals[i], s.opt.TTL)
	}
	cmds := exec(ctx, pipe)
	stored, firstErr := 0, error(nil)
	for _, c := range cmds {
		if c.Err() == nil {
			stored++
		} else if firstErr == nil {
			firstErr = c.Err()
		}
	}
	return stored, firstErr
}

// value is a block as Put hands it to the client. The client calls MarshalBinary as it writes
// the SET, so the block is encoded just before its bytes go to the socket, while they are
// still in the cache. Values of a serial client share one buffer: the client has written a
// value before it asks for the next.
type value struct {
	fp  *tier.Fingerprint
	b   *tier.Block
	buf []byte // empty, with the capacity of the encoded block
}

// MarshalBinary encodes the block into the value's buffer. It cannot fail: Put checked the
// salt's length.
func (v *value) MarshalBinary() ([]byte, error) {
	return tier.Encode(v.buf[:0], *v.fp, *v.b)
}

// batch is one call's scratch memory, pooled by the store: the buffer that Put encodes into
// and Get reads into, and Put's values.
type batch struct {
	buf  []byte
	vals []value
}

func (s *Store) batch() *batch {
	if bt, ok := s.batches.Get().(*batch); ok {
		return bt
	}
	return new(batch)
}

// release returns bt to the pool without the caller's blocks it points to.
func (s *Store) release(bt *batch) {
	clear(bt.vals)
	s.batches.Put(bt)
}

// bytes returns n bytes of the batch's buffer, growing it where it is short. The bytes are
// not cleared: every user overwrites them before it reads them.
func (bt *batch) bytes(n int) []byte {
	if cap(bt.buf) < n {
		bt.buf = make([]byte, n)
	}
	return bt.buf[:n]
}

// values returns n of the batch's values.
func (bt *batch) values(n int) []value {
	if cap(bt.vals) < n {
		bt.vals = make([]value, n)
	}
	return bt.vals[:n]
}

// Get copies the blocks of the leading run of keys held in namespace ns into dst and returns how
// many it copied. dst needs a buffer of exactly Options.BlockBytes for each key. It reads every
// key in one pipeline, so a caller that expects a long chain to miss early asks Has first. A
// stored block that fails tier.Check ends the run: Get deletes it and counts it in
// Stats.Corrupt. On a failure after a run of hits, Get returns that run's length with the error,
// like io.Reader.
func (s *Store) Get(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, dst [][]byte) (int, error) {
	ctx, cancel, err := s.begin(ctx, "get")
	if err != nil {
		return 0, err
	}
	defer cancel()
	if len(dst) < len(keys) {
		return 0, fmt.Errorf("tier/redis: get: %w", &SizeError{What: "dst", Unit: "buffers", Got: len(dst), Want: len(keys)})
	}
	for i := range keys {
		if len(dst[i]) != s.opt.BlockBytes {
			return 0, fmt.Errorf("tier/redis: get: %w", &SizeError{What: "dst[" + strconv.Itoa(i) + "]", Unit: "bytes", Got: len(dst[i]), Want: s.opt.BlockBytes})
		}
	}
	if len(keys) == 0 {
		return 0, nil
	}
	tag := nsTag(ns)
	bt := s.batch()
	defer s.release(bt)
	// Each reply lands in a buffer of its own, with room for the protocol's CRLF, which the
	// client then reads in the same call.
	size := tier.HeaderSize(ns) + s.opt.BlockBytes + 2
	buf := bt.bytes(len(keys) * size)
	cmds := make([]*goredis.ZeroCopyStringCmd, len(keys))
	pipe := s.client.Pipeline()
	for i, k := range keys {
		cmds[i] = pipe.GetToBuffer(ctx, s.key(tag, k), buf[i*size:(i+1)*size])
	}
	exec(ctx, pipe)
	n, err := s.copyRun(ctx, ns, tag, keys, cmds, dst)
	s.gets.Add(uint64(n))
	s.getBytes.Add(uint64(n * s.opt.BlockBytes))
	return n, err
}

// copyRun checks and copies the leading run of replies, dropping a corrupt block where the run
// ends. A failed read marks every command of the pipeline failed, the ones read before it too:
// a reply that arrived whole is checked and served all the same, and the run ends at the first
// reply that did not arrive.
func (s *Store) copyRun(ctx context.Context, ns prefix.Namespace, tag string, keys []prefix.Key, cmds []*goredis.ZeroCopyStringCmd, dst [][]byte) (int, error) {
	for i, c := range cmds {
		err := c.Err()
		if errors.Is(err, goredis.Nil) {
			s.misses.Add(1)
			return i, nil
		}
		if err != nil && c.Val() == 0 && !s.oversized(ctx, ns, s.key(tag, keys[i]), err) {
			return i, s.fail("get", len(keys), err)
		}
		data, err := tier.Check(c.Bytes(), s.opt.Fingerprint, ns, keys[i], s.opt.BlockBytes)
		if err != nil {
			s.corrupt.Add(1)
			// Best effort: a block left behind is dropped again by the next reader.
			_ = s.client.Del(ctx, s.key(tag, keys[i])).Err()
			s.report(tier.Eviction{NS: ns, Key: keys[i]})
			return i, nil
		}
		copy(dst[i], data)
	}
	return len(cmds), nil
}

// oversized reports whether a read that failed with err met a value under key longer than a
// block of namespace ns. Such a value overflows the buffer that the reply is read into, and
// the client reports that like a broken connection; the value's length tells the two apart.
func (s *Store) oversized(ctx context.Context, ns prefix.Namespace, key string, err error) bool {
	var reply goredis.Error // the server's error reply: the read itself went well
	if errors.As(err, &reply) {
		return false
	}
	n, err := s.client.StrLen(ctx, key).Result()
	return err == nil && n > int64(tier.HeaderSize(ns)+s.opt.BlockBytes)
}

// Has returns the length of the leading run of keys held in namespace ns, with one pipelined
// EXISTS per key. It is a hint: Redis may evict a block before the Get that follows.
func (s *Store) Has(ctx context.Context, ns prefix.Namespace, keys []prefix.Key) (int, error) {
	ctx, cancel, err := s.begin(ctx, "has")
	if err != nil {
		return 0, err
	}
	defer cancel()
	if len(keys) == 0 {
		return 0, nil
	}
	tag := nsTag(ns)
	cmds := make([]*goredis.IntCmd, len(keys))
	pipe := s.client.Pipeline()
	for i, k := range keys {
		cmds[i] = pipe.Exists(ctx, s.key(tag, k))
	}
	exec(ctx, pipe)
	for i, c := range cmds {
		held, err := c.Result()
		if err != nil {
			return i, s.fail("has", len(keys), err)
		}
		if held == 0 {
			s.misses.Add(1)
			return i, nil
		}
	}
	return len(keys), nil
}

// Drop deletes the keys' blocks in namespace ns with one pipelined DEL per key; keys the store
// does not hold are ignored.
func (s *Store) Drop(ctx context.Context, ns prefix.Namespace, keys []prefix.Key) error {
	ctx, cancel, err := s.begin(ctx, "drop")
	if err != nil {
		return err
	}
	defer cancel()
	if len(keys) == 0 {
		return nil
	}
	tag := nsTag(ns)
	pipe := s.client.Pipeline()
	for _, k := range keys {
		pipe.Del(ctx, s.key(tag, k))
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return s.fail("drop", len(keys), err)
	}
	return nil
}

// Ping reports whether the servers answer within the store's timeout: nil, or a *CallError
// (counted in Stats.Failures).
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel, err := s.begin(ctx, "ping")
	if err != nil {
		return err
	}
	defer cancel()
	if err := s.client.Ping(ctx).Err(); err != nil {
		return s.fail("ping", 0, err)
	}
	return nil
}

// Stats returns the store's counters since Open. Evictions, Blocks, Bytes, LimitBytes and
// Restored stay 0: Redis keeps those figures server-wide.
func (s *Store) Stats() tier.Stats {
	if s == nil {
		return tier.Stats{}
	}
	return tier.Stats{
		Puts: s.puts.Load(), PutBytes: s.putBytes.Load(),
		Gets: s.gets.Load(), GetBytes: s.getBytes.Load(),
		Misses: s.misses.Load(), Corrupt: s.corrupt.Load(), Failures: s.failures.Load(),
	}
}

// Close ends the subscription of Options.Evictions and releases the store's connections; calls after Close, a second Close included, return
// ErrClosed. Blocks stay on the server.
func (s *Store) Close() error {
	if s == nil {
		return fmt.Errorf("tier/redis: close: %w: nil store", ErrInvalidArgument)
	}
	if s.closed.Swap(true) {
		return fmt.Errorf("tier/redis: close: %w", ErrClosed)
	}
	s.stopWatch()
	if err := s.client.Close(); err != nil {
		return fmt.Errorf("tier/redis: close: %w", err)
	}
	return nil
}
