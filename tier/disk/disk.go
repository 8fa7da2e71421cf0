package disk

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// MaxBlockBytes is the largest Options.BlockBytes a store takes.
const MaxBlockBytes = 1 << 30

const (
	tmpSuffix = ".tmp"
	lockName  = "LOCK"
)

// Options configure a Store. They are pure data; Open checks them.
type Options struct {
	Fingerprint tier.Fingerprint // the model whose blocks the store holds
	BlockBytes  int              // the data bytes of every block, 1 to MaxBlockBytes
	LimitBytes  uint64           // the bound on the files' bytes; at least one block's file
	// SpareBytes of LimitBytes are kept in the files of evicted blocks, for later Puts to
	// overwrite: a Put of up to SpareBytes creates and deletes no file. 0 keeps none; at most
	// LimitBytes less one block's file.
	SpareBytes uint64
	Mode       Mode // the I/O mode; ModeAuto picks ModeDirect where it works
}

// recordSize returns the bytes of the file of a block of blockBytes in namespace ns.
func recordSize(ns prefix.Namespace, blockBytes int) int {
	return roundUp(tier.HeaderSize(ns) + blockBytes)
}

// validate checks the options' ranges.
func (o Options) validate(dir string) error {
	switch {
	case dir == "":
		return &ArgumentError{Name: "dir", Reason: "is empty"}
	case o.BlockBytes < 1 || o.BlockBytes > MaxBlockBytes:
		return &ArgumentError{Name: "BlockBytes", Value: int64(o.BlockBytes), Min: 1, Max: MaxBlockBytes}
	case o.LimitBytes < uint64(recordSize(prefix.Namespace{}, o.BlockBytes)):
		return &ArgumentError{Name: "LimitBytes", Value: int64(o.LimitBytes), Min: int64(recordSize(prefix.Namespace{}, o.BlockBytes))}
	case o.SpareBytes > o.LimitBytes-uint64(recordSize(prefix.Namespace{}, o.BlockBytes)):
		return &ArgumentError{Name: "SpareBytes", Value: int64(min(o.SpareBytes, math.MaxInt64)), Max: int64(min(o.LimitBytes-uint64(recordSize(prefix.Namespace{}, o.BlockBytes)), math.MaxInt64))}
	case o.Mode < ModeAuto || o.Mode > ModeBuffered:
		return &ArgumentError{Name: "Mode", Value: int64(o.Mode), Min: int64(ModeAuto), Max: int64(ModeBuffered)}
	}
	return nil
}

// Store is a tier.Store over the files of one directory. It is safe for concurrent use. The
// caller owns it from Open to Close; Close releases the directory's lock.
type Store struct {
	dir         string
	fp          tier.Fingerprint
	blockBytes  int
	limit       uint64
	spareTarget uint64
	mode        Mode
	io          fileIO
	lockFD      int
	bufs        sync.Pool // *[]byte: aligned read buffers

	calls sync.WaitGroup // the calls in flight, which Close waits for

	// mu guards the following.
	mu       sync.Mutex
	closed   bool
	index    map[ikey]*entry
	order    lru
	st       tier.Stats
	ds       DiskStats
	spares   []spare  // the spare pool, oldest first
	spareSeq uint64   // the last spare file's number
	doomed   []string // spare files for reap to delete
}

// DiskStats are the counters a disk store keeps beside tier.Stats.
type DiskStats struct {
	Mode          Mode   // the I/O mode in use: ModeDirect or ModeBuffered
	DroppedAtOpen uint64 // files Open deleted: another model's, a bad header, a torn file
	TmpRemoved    uint64 // unfinished writes Open deleted
	SpareFiles    uint64 // files kept for reuse now (Options.SpareBytes)
	SpareBytes    uint64 // their bytes; with Stats.Bytes, at most Options.LimitBytes
}

// Open opens the store in dir, creating the directory if need be, and rebuilds its index from
// the block files there (a warm restart): intact blocks of opt.Fingerprint are kept and counted
// in Stats.Restored, other files of the layout are deleted and counted in DiskStats. The
// returned Store holds dir until Close.
func Open(dir string, opt Options) (*Store, error) {
	return open(dir, opt, nil)
}

// open is Open with a wrapper over the store's file I/O (a test's fault injection), or nil.
func open(dir string, opt Options, wrap func(fileIO) fileIO) (*Store, error) {
	if err := opt.validate(dir); err != nil {
		return nil, fmt.Errorf("disk: open: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) && pe.Err == syscall.ENOTDIR {
			// dir, or a directory above it, is a file: a mistake in the configuration, not a
			// fault that may pass.
			return nil, fmt.Errorf("disk: open: %w", &ArgumentError{Name: "dir", Reason: pe.Path + " is a file, not a directory"})
		}
		return nil, fmt.Errorf("disk: open: %w", ioError(err))
	}
	s := &Store{dir: dir, fp: opt.Fingerprint, blockBytes: opt.BlockBytes, limit: opt.LimitBytes, spareTarget: opt.SpareBytes, lockFD: -1}
	s.index = make(map[ikey]*entry)
	s.order.init()
	s.st.LimitBytes = opt.LimitBytes
	if err := s.lock(); err != nil {
		return nil, fmt.Errorf("disk: open %s: %w", dir, err)
	}
	err := s.pickMode(opt.Mode, wrap)
	if err == nil {
		err = s.scan()
	}
	if err != nil {
		_ = unix.Close(s.lockFD)
		return nil, fmt.Errorf("disk: open %s: %w", dir, err)
	}
	s.settleSpaceLocked()
	s.reap()
	return s, nil
}

// lock takes the directory's lock file, so that two stores never share one directory.
func (s *Store) lock() error {
	fd, err := unix.Open(s.dir+"/"+lockName, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return ioError(&fs.PathError{Op: "open", Path: lockName, Err: err})
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = unix.Close(fd)
		if err == unix.EWOULDBLOCK {
			return ErrLocked
		}
		return fmt.Errorf("%w: flock: %w", tier.ErrUnavailable, err)
	}
	s.lockFD = fd
	return nil
}

func (s *Store) pickMode(m Mode, wrap func(fileIO) fileIO) error {
	direct := m == ModeDirect
	if m == ModeAuto || m == ModeDirect {
		ok, err := probeDirect(s.dir)
		if err != nil {
			return fmt.Errorf("probe O_DIRECT: %w", ioError(err))
		}
		if m == ModeDirect && !ok {
			return fmt.Errorf("%w: O_DIRECT refused by the filesystem", ErrNotSupported)
		}
		direct = ok
	}
	s.mode = ModeBuffered
	if direct {
		s.mode = ModeDirect
	}
	s.ds.Mode = s.mode
	s.io = osIO{direct: direct}
	if wrap != nil {
		s.io = wrap(s.io)
	}
	return nil
}

// nsHash names a namespace in file names: the first 8 bytes of SHA-256 over its adapter
// (little-endian) and salt, in hex.
func nsHash(ns prefix.Namespace) string {
	h := sha256.New()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], ns.Adapter)
	h.Write(b[:])
	h.Write([]byte(ns.Salt))
	var sum [sha256.Size]byte
	return hex.EncodeToString(h.Sum(sum[:0])[:8])
}

// blockPath returns the file of key k in namespace ns.
func (s *Store) blockPath(ns prefix.Namespace, k prefix.Key) string {
	return s.dir + "/" + hex.EncodeToString(k[:1]) + "/" + nsHash(ns) + "-" + k.String()
}

// made reports a Store made by Open. Every method checks it first, so a nil or zero Store gets
// an error (or zero Stats), never a panic.
func (s *Store) made() bool { return s != nil && s.index != nil }

// errNotMade is the cause of every call on a nil or zero Store.
var errNotMade = &ArgumentError{Name: "store", Reason: "nil, or not made by Open"}

// enter admits a call unless the store is closed; the caller defers s.calls.Done.
func (s *Store) enter() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return tier.ErrClosed
	}
	s.calls.Add(1)
	return nil
}

// failed counts a failed call and returns err.
func (s *Store) failed(err error) error {
	s.mu.Lock()
	s.st.Failures++
	s.mu.Unlock()
	return err
}

func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", tier.ErrUnavailable, err)
	}
	return nil
}

var errNilContext = &ArgumentError{Name: "ctx", Reason: "is nil"}

// removeLocked forgets a committed entry and moves its file into the spare pool, to be reused
// or deleted by settleSpaceLocked; a file a Get reads now goes straight to reap instead, so that
// no Put overwrites it under the reader. Moving it under mu orders the move before any later
// Put of the key renames a new file to the name. A file that cannot be moved is counted as a
// failure and found again by the next Open.
func (s *Store) removeLocked(e *entry) {
	s.order.remove(e)
	delete(s.index, e.k)
	s.st.Blocks--
	s.st.Bytes -= e.size
	to := s.nextSparePathLocked()
	switch err := s.io.rename(e.path, to); {
	case err == nil && e.readers > 0:
		s.doomed = append(s.doomed, to)
	case err == nil:
		s.addSpareLocked(to, e.size)
	case !isNotExist(err):
		s.st.Failures++
	}
}

// reap deletes the spare files settleSpaceLocked let go, several at once: deleting a file frees
// its blocks, which takes the filesystem's journal, so it is done outside mu.
func (s *Store) reap() {
	s.mu.Lock()
	doomed := s.doomed
	s.doomed = nil
	s.mu.Unlock()
	if len(doomed) == 0 {
		return
	}
	var failed atomic.Uint64
	parallel(len(doomed), func(i int) {
		if s.io.remove(doomed[i]) != nil {
			failed.Add(1)
		}
	})
	if n := failed.Load(); n > 0 {
		s.mu.Lock()
		s.st.Failures += n
		s.mu.Unlock()
	}
}

// Has returns the length of the leading run of keys the store holds in namespace ns, and marks
// them recently used. It reads no file.
func (s *Store) Has(ctx context.Context, ns prefix.Namespace, keys []prefix.Key) (int, error) {
	if !s.made() {
		return 0, fmt.Errorf("disk: has: %w", errNotMade)
	}
	if ctx == nil {
		return 0, fmt.Errorf("disk: has: %w", errNilContext)
	}
	if err := s.enter(); err != nil {
		return 0, fmt.Errorf("disk: has: %w", err)
	}
	defer s.calls.Done()
	if err := ctxErr(ctx); err != nil {
		return 0, s.failed(fmt.Errorf("disk: has: %w", err))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, k := range keys {
		e := s.index[ikey{ns, k}]
		if e == nil || e.pending {
			s.st.Misses++
			return i, nil
		}
		s.order.touch(e)
	}
	return len(keys), nil
}

// Drop removes the keys' blocks in namespace ns and deletes their files; keys it does not hold,
// or that a Put is writing now, are ignored.
func (s *Store) Drop(ctx context.Context, ns prefix.Namespace, keys []prefix.Key) error {
	if !s.made() {
		return fmt.Errorf("disk: drop: %w", errNotMade)
	}
	if ctx == nil {
		return fmt.Errorf("disk: drop: %w", errNilContext)
	}
	if err := s.enter(); err != nil {
		return fmt.Errorf("disk: drop: %w", err)
	}
	defer s.calls.Done()
	defer s.reap()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range keys {
		if e := s.index[ikey{ns, k}]; e != nil && !e.pending {
			s.removeLocked(e)
		}
	}
	s.settleSpaceLocked()
	return nil
}

// Stats returns the store's counters since Open (zero for a nil Store).
func (s *Store) Stats() tier.Stats {
	if !s.made() {
		return tier.Stats{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st
}

// DiskStats returns the counters the disk store keeps beside Stats, and its I/O mode.
func (s *Store) DiskStats() DiskStats {
	if !s.made() {
		return DiskStats{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ds
}

// Close waits for the calls in flight, then releases the directory. Later calls return
// tier.ErrClosed; the files stay for the next Open.
func (s *Store) Close() error {
	if !s.made() {
		return fmt.Errorf("disk: close: %w", errNotMade)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("disk: close: %w", tier.ErrClosed)
	}
	s.closed = true
	s.mu.Unlock()
	s.calls.Wait()
	if err := unix.Close(s.lockFD); err != nil {
		return fmt.Errorf("disk: close: %w: %w", tier.ErrUnavailable, err)
	}
	return nil
}

var _ tier.Store = (*Store)(nil)

// isNotExist reports a file that is gone.
func isNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }
