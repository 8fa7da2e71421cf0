// Package tier is the small interface behind which cached blocks live below the host tier: a
// local disk (package tier/disk) and a cluster store shared by replicas (package tier/redis).
//
// A Store is content-addressed. It holds whole blocks under their prefix keys in a namespace,
// each stored with a self-describing header (the model's geometry Fingerprint, the namespace,
// the key, its parent and a checksum, see Encode). A reader checks all of it before serving a
// block's bytes as K/V: anything that does not match (another model or geometry, another
// namespace, a torn write, a flipped bit) is dropped and counted, never returned.
//
// Every call is fallible. A store that is down, slow or full answers with an error or a miss,
// and the caller (the kvcache manager) treats that as a miss: the runtime computes the blocks.
// Calls take a context, whose deadline bounds how long the caller waits.
package tier

import (
	"context"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/prefix"
)

// Block is one cached block on its way to or from a store. Data is the block's bytes as the
// arena lays them out (every layer's K and V rows); the caller owns it, and a store copies what
// it keeps before Put returns.
type Block struct {
	NS     prefix.Namespace // the namespace whose root the key chain starts from
	Key    prefix.Key       // the block's prefix key
	Parent prefix.Key       // the key of the block before it, or the namespace's root
	Data   []byte
}

// Store holds cached blocks below the host tier. Implementations are safe for concurrent use.
//
// A prefix lookup walks a chain: Get and Has answer for the leading run of keys, stopping at the
// first one the store does not hold (or holds corrupt), because a block is useful only after
// every block before it.
type Store interface {
	// Put stores blocks, each under its namespace and key, replacing nothing that is already
	// there with the same key (same key, same content). A full store makes room by its own
	// eviction policy; a store that cannot make room returns an error and keeps what it had.
	Put(ctx context.Context, blocks []Block) error
	// Get copies the blocks of the leading run of keys it holds, in namespace ns, into dst
	// (dst[i] must be exactly one block's bytes) and returns how many it copied. A block that
	// fails its checks ends the run: it is dropped and counted in Stats.Corrupt.
	Get(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, dst [][]byte) (int, error)
	// Has returns the length of the leading run of keys the store holds in namespace ns,
	// without reading their bytes. It is a hint: a later Get may find fewer.
	Has(ctx context.Context, ns prefix.Namespace, keys []prefix.Key) (int, error)
	// Drop removes the keys' blocks in namespace ns; keys it does not hold are ignored.
	Drop(ctx context.Context, ns prefix.Namespace, keys []prefix.Key) error
	// Stats returns the store's counters since it was opened.
	Stats() Stats
	// Close releases the store's resources; calls after Close return ErrClosed.
	Close() error
}

// Eviction names a block a store removed on its own: to make room, because it expired, or
// because it failed its checks.
type Eviction struct {
	NS  prefix.Namespace // its namespace; without the salt where the store keeps only a hash of it (tier/redis)
	Key prefix.Key
}

// EvictionReporter is implemented by a Store that can name the blocks it removes on its own,
// so that its caller can tell whoever it told of the blocks (the kvcache manager's KV events,
// which announce a block written to a tier with the tier's medium). Store does not require it.
//
// A store keeps a bounded queue of such blocks, from the first call to TakeEvictions on: a
// store nobody asks keeps none. Blocks the caller removes with Drop are its own act and are not
// reported. Past the bound, the store counts the blocks it cannot queue instead of naming them,
// and the next TakeEvictions returns that count: the caller no longer knows which of the
// blocks it announced are gone, and should withdraw them all (the kvcache manager sends
// AllBlocksCleared).
//
// Each eviction goes to one call: give a store one consumer. TakeEvictions is safe for
// concurrent use with every other call, does no I/O, never blocks on the store's calls in
// flight and calls nothing back, so a caller may hold its own locks around it.
type EvictionReporter interface {
	// TakeEvictions moves the oldest queued evictions into dst, up to len(dst), and returns
	// how many it moved and how many evictions it dropped unnamed since the previous call. A
	// block the store holds again by now (stored again since its eviction) is not reported,
	// where the store can tell.
	TakeEvictions(dst []Eviction) (n int, lost uint64)
}

// Stats counts a store's traffic and its faults.
type Stats struct {
	Puts, PutBytes uint64 // blocks stored and their bytes
	Gets, GetBytes uint64 // blocks served and their bytes
	Misses         uint64 // lookups (Get or Has) whose run ended at a key the store does not hold
	Evictions      uint64 // blocks the store's own eviction removed
	Corrupt        uint64 // blocks dropped because a check failed: checksum, header, size
	Failures       uint64 // calls that failed: the store down, a deadline passed, an I/O error
	Blocks, Bytes  uint64 // what the store holds now, where it knows (disk); 0 where not (redis)
	LimitBytes     uint64 // the bound on Bytes, where the store keeps one
	Restored       uint64 // blocks found intact at open (a disk tier's warm restart)
}

// Sentinel errors a store returns; each matches with errors.Is.
var (
	// ErrClosed reports a call after Close.
	ErrClosed = errdefs.ErrClosed
	// ErrUnavailable reports a store that cannot answer now: a server down, a deadline passed,
	// a disk failing. The caller treats it as a miss.
	ErrUnavailable = errdefs.ErrUnavailable
	// ErrCorrupt reports a stored block that failed its checks.
	ErrCorrupt = errdefs.ErrCorrupt
	// ErrMismatch reports a stored block of another model, geometry or namespace.
	ErrMismatch = errdefs.ErrMismatch
	// ErrInvalidArgument reports a malformed call: a block whose size is not the store's, a dst
	// shorter than keys.
	ErrInvalidArgument = errdefs.ErrInvalidArgument
)
