// Package redis is a tier.Store on Redis: a cluster tier that the replicas of a model share, so a
// prefix one replica computed is a hit for the others.
//
// # Keys and values
//
// Each block is one Redis string:
//
//	pagedkv:v1:<model>:<fingerprint>:<adapter>-<salt hash>:<key>
//
// where <model> is Options.Model, <fingerprint> the first 8 bytes of Options.Fingerprint in hex,
// <adapter> the namespace's adapter id in 16 hex digits, <salt hash> the first 8 bytes of the
// SHA-256 of its salt in hex and <key> the block's 32-byte prefix key in hex. For example:
//
//	pagedkv:v1:llama-3-8b:9f86d081884c7d65:0000000000000000-e3b0c44298fc1c14:2c26b46b...
//
// The value is tier.Encode's output: the self-describing header, then the block's bytes. The
// header repeats the full fingerprint, namespace and key, and a reader checks it with tier.Check
// before serving a byte. The key's hashes only spread and separate; the header is the authority,
// so a hash collision or a foreign writer is caught and dropped, never served.
//
// The store pools its buffers, so a call allocates no block's worth of memory once the pool is
// warm. Put hands the client each block unencoded and encodes it as the client writes the SET:
// the bytes are still in the cache when they go to the socket. Get reads each reply from the
// socket straight into a pooled buffer with go-redis's GetToBuffer, checks it there and copies
// the data into the caller's buffer.
//
// One key holds header and data together, where LMCache writes two (kv_bytes and metadata).
// One key is written and read in one command, so a reader never sees one half of a pair
// without the other, and an eviction never leaves a header without its data.
//
// Keys carry no hash tag ({...}). In a Redis Cluster each block's key hashes to its own slot,
// so a long chain spreads over the nodes instead of loading one. A Get or Has pipelines one
// command per key; the client groups the pipeline by node and sends the groups in parallel.
// On a single node a Put of a large batch (PipelineBytes or more per share) spreads over
// Options.Pipelines connections at once, 2 by default on 4 or more cores: each share's blocks
// are encoded (header, copy, checksum) and written on a core of their own, while one server
// thread reads them all. On the H200 host's 16 cores, 16 blocks of 256 KiB went from 3.2-3.5
// GB/s on one pipeline to 4.0-4.2 on two (BenchmarkPut, docs/performance.md).
//
// # Bounds and eviction
//
// The store keeps no bound of its own: the operator sets Redis's maxmemory and an eviction
// policy, allkeys-lru for a cache. A full server then evicts and a later Get misses. Under
// maxmemory-policy noeviction a full server refuses writes: Put returns a *CallError matching
// tier.ErrUnavailable and ErrOutOfMemory, counted in Stats.Failures, and what was stored stays
// readable. Options.TTL optionally expires blocks as well. Stats.Evictions, Blocks and Bytes
// stay 0: Redis counts its evictions server-wide (INFO stats), not per store.
//
// # Eviction reports
//
// TakeEvictions (tier.EvictionReporter) names the blocks removed without the caller: those a Get
// deleted for failing their checks and, with Options.Evictions, those the server evicted or
// expired. With Options.Evictions a goroutine subscribes to the server's keyspace notifications
// of evicted and expired keys in the store's database (__keyevent@<db>__:evicted and :expired)
// and keeps the store's own. Each time the subscription is confirmed, it adds the flags E, x and
// e to the server's notify-keyspace-events where they are missing (CONFIG SET, a setting of
// the whole server). Watching says whether the store hears the server now. The limits:
//
//   - A single node only: Options.Evictions with Cluster or several Addrs is an *OptionError,
//     because each node of a cluster notifies its own subscribers only.
//   - Every store subscribed to a server hears every eviction of its model's blocks there,
//     whichever replica stored them. A replica reports blocks it never announced, which a router
//     that keeps its view per replica and medium has nothing to remove for. It may also report a
//     block that a replica stored again since: the router under-counts it until it is announced
//     again.
//   - Pub/sub delivers at most once. A dropped connection (a restart, a subscriber past the
//     server's output buffer limit) loses what was sent meanwhile: once the store has stored a
//     block, each new confirmation of the subscription counts one lost eviction, so that the
//     caller withdraws what it announced. Keys other clients delete (DEL, FLUSHALL) are not
//     heard: a router keeps counting them.
//   - A server that refuses CONFIG (an ACL without it, a managed service) does not fail Open:
//     the refusal is counted in Stats.Failures and Watching returns it, and the store hears what
//     the server's own configuration sends. The operator sets notify-keyspace-events to Exe.
//   - The server sends every subscriber a message for each evicted or expired key of the
//     database, every model's: with R replicas subscribed, R messages per eviction, on the
//     server's main thread, while it is full.
//
// # Faults
//
// Every call runs under the caller's context and Options.Timeout, whichever ends first. A server
// that is down, slow or refusing makes the call return a *CallError (tier.ErrUnavailable) within
// that deadline, counted in Stats.Failures; the caller treats it as a miss. In a cluster whose node
// is down, Get and Has return the run of blocks before the first one that node held, with the
// error, at once: the store does not retry, so a dead node does not spend every caller's deadline.
// Open does not connect: a store opened while the server is down answers with errors until the
// server is back, then works without being reopened. Ping reports reachability. A wrong
// password is found the same way: every call fails with a *CallError matching ErrDenied (and
// ErrUnavailable), counted. Options that cannot work (a URL that does not parse, a URL with
// Addrs) are an *OptionError at Open. The client
// (go-redis) logs each failed dial through its process-wide logger; a program silences it with
// go-redis's SetLogger.
//
// # Concurrency
//
// A Store is safe for concurrent use. It owns its client's connections until Close.
package redis
