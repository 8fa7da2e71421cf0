package disk

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// MaxBlockBytes is the largest Options.BlockBytes a store takes.
const MaxBlockBytes = 1 << 30

// MaxSegmentBytes is the largest Options.SegmentBytes a store takes, and the default where the
// limit allows.
const MaxSegmentBytes = 64 << 20

const lockName = "LOCK"

// Options configure a Store. They are pure data; Open checks them.
type Options struct {
	Fingerprint tier.Fingerprint // the model whose blocks the store holds
	BlockBytes  int              // the data bytes of every block, 1 to MaxBlockBytes
	LimitBytes  uint64           // the bound on the segments' bytes; at least one block's record
	// SpareBytes of LimitBytes are kept in the files of evicted segments, for new segments to
	// overwrite in place: writing over allocated blocks is faster than allocating them, and
	// deleting a file costs the filesystem's journal. 0 keeps none; at most LimitBytes less one
	// block's record.
	SpareBytes uint64
	// SegmentBytes is the size a segment file grows to before the next is started, rounded up
	// to 4096, and at most LimitBytes less SpareBytes. Eviction frees one whole segment at a
	// time. 0 picks an eighth of LimitBytes, between 4096 and MaxSegmentBytes.
	SegmentBytes uint64
	Mode         Mode // the I/O mode; ModeAuto picks ModeDirect where it works
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
		return &ArgumentError{Name: "LimitBytes", Value: int64(min(o.LimitBytes, math.MaxInt64)), Min: int64(recordSize(prefix.Namespace{}, o.BlockBytes))}
	case o.SpareBytes > o.LimitBytes-uint64(recordSize(prefix.Namespace{}, o.BlockBytes)):
		return &ArgumentError{Name: "SpareBytes", Value: int64(min(o.SpareBytes, math.MaxInt64)), Max: int64(min(o.LimitBytes-uint64(recordSize(prefix.Namespace{}, o.BlockBytes)), math.MaxInt64))}
	case o.SegmentBytes > MaxSegmentBytes:
		return &ArgumentError{Name: "SegmentBytes", Value: int64(min(o.SegmentBytes, math.MaxInt64)), Min: 0, Max: MaxSegmentBytes}
	case o.Mode < ModeAuto || o.Mode > ModeBuffered:
		return &ArgumentError{Name: "Mode", Value: int64(o.Mode), Min: int64(ModeAuto), Max: int64(ModeBuffered)}
	}
	return nil
}

// segmentBytes returns the segment size the options ask for, at most the room for segments:
// eviction frees whole segments, so a tail grown past LimitBytes less SpareBytes would be
// evicted with the blocks just put in it.
func (o Options) segmentBytes() int64 {
	seg := max(align, min(MaxSegmentBytes, int64(o.LimitBytes/8))&^(align-1))
	if o.SegmentBytes > 0 {
		seg = int64(roundUp(int(o.SegmentBytes)))
	}
	// validate has left room for one record, which is a multiple of align.
	return min(seg, int64(min(o.LimitBytes-o.SpareBytes, MaxSegmentBytes)&^(align-1)))
}

// Store is a tier.Store over the segment files of one directory. It is safe for concurrent
// use. The caller owns it from Open to Close; Close releases the directory's lock.
type Store struct {
	dir        string
	fp         tier.Fingerprint
	blockBytes int
	limit      uint64
	spareLimit uint64
	segBytes   int64
	mode       Mode
	io         fileIO
	lockFD     int
	bufs       sync.Pool // *[]byte: aligned buffers for records a Get moves and drop marks

	// smu guards stages, the Gets' stages not in use.
	smu    sync.Mutex
	stages []*stage

	calls sync.WaitGroup // the calls in flight, which Close waits for

	// wmu serializes appends (Put and a Get's second chances): one writer owns the tail. It is
	// taken before mu, never while holding it.
	wmu    sync.Mutex
	wstage *stage       // the appender's stage, or nil
	wqueue encodeQueue  // the appender's records, encoded by its writer and a helper
	witems []appendItem // the appender's items, reused
	wruns  []appendRun  // the appender's runs, reused

	// mu guards the following, and the segments' fields.
	mu     sync.Mutex
	closed bool
	index  map[ikey]loc
	segs   []*segment // the live segments, oldest first; the last is the tail
	spares []*segment // the spare files, oldest first, open
	seq    uint64     // the last segment's number
	next   uint64     // bytes ever appended: the next segment's base
	doomed []*segment // dead segments no Get reads, for reap to close and delete
	st     tier.Stats
	ds     DiskStats
	// The blocks the store removed on its own (eviction, a failed check), queued for
	// TakeEvictions once it has been called, up to EvictionQueue; lost counts those past it.
	reporting bool
	evicted   []tier.Eviction
	evictCap  int // EvictionQueue; smaller in tests
	lost      uint64
}

// EvictionQueue bounds the evictions a store queues for TakeEvictions: 56 bytes each, 3.5 MiB
// at most, four segments of 64 MiB of the smallest records.
const EvictionQueue = 1 << 16

// DiskStats are the counters a disk store keeps beside tier.Stats.
type DiskStats struct {
	Mode          Mode   // the I/O mode in use: ModeDirect or ModeBuffered
	DroppedAtOpen uint64 // records Open dropped: another model's, a bad header, a torn tail
	TornAtOpen    uint64 // segments Open truncated at a torn record
	Segments      uint64 // segment files now
	LiveBytes     uint64 // the records the index points at; Stats.Bytes less dead records
	SpareFiles    uint64 // evicted segments' files kept for reuse now (Options.SpareBytes)
	SpareBytes    uint64 // their bytes; with Stats.Bytes, at most Options.LimitBytes
}

// Open opens the store in dir, creating the directory if need be, and rebuilds its index from
// the segment files there (a warm restart): intact records of opt.Fingerprint are kept and
// counted in Stats.Restored, others are dropped and counted in DiskStats. The returned Store
// holds dir until Close.
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
	s := &Store{dir: dir, fp: opt.Fingerprint, blockBytes: opt.BlockBytes, limit: opt.LimitBytes, spareLimit: opt.SpareBytes, segBytes: opt.segmentBytes(), lockFD: -1, evictCap: EvictionQueue}
	s.wqueue.bell = make(chan struct{}, 1)
	s.index = make(map[ikey]loc)
	s.st.LimitBytes = opt.LimitBytes
	if err := s.lock(); err != nil {
		return nil, fmt.Errorf("disk: open %s: %w", dir, err)
	}
	err := s.pickMode(opt.Mode, wrap)
	if err == nil {
		err = s.scan()
	}
	if err != nil {
		s.reapClose()
		_ = unix.Close(s.lockFD)
		return nil, fmt.Errorf("disk: open %s: %w", dir, err)
	}
	s.mu.Lock()
	s.evictLocked()
	s.mu.Unlock()
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

// Has returns the length of the leading run of keys the store holds in namespace ns. It reads
// no file and, unlike Get, does not count as a use for eviction.
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
		if _, ok := s.index[ikey{ns, k}]; !ok {
			s.st.Misses++
			return i, nil
		}
	}
	return len(keys), nil
}

// Drop removes the keys' blocks in namespace ns; keys it does not hold are ignored. It marks
// their records dropped in place, so that a later Open does not restore them. Their space comes
// back when their segment is deleted: at once for a segment left with no live record (the tail
// excepted), else when it is evicted.
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
	var gone []loc
	s.mu.Lock()
	for _, k := range keys {
		if l, ok := s.index[ikey{ns, k}]; ok {
			l.seg.readers++ // pinned until its record is marked
			s.forgetLocked(ikey{ns, k}, l)
			gone = append(gone, l)
		}
	}
	s.mu.Unlock()
	var failed uint64
	for _, l := range gone {
		if s.markDropped(l) != nil {
			failed++ // the block comes back at the next Open
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range gone {
		s.unpinLocked(l.seg)
	}
	s.st.Failures += failed
	return nil
}

// dropped is the fingerprint a dropped record's header carries instead of its model's, so that
// Open skips it.
var dropped = tier.Fingerprint{0: 0xff, 1: 0xff, 2: 0xff, 3: 0xff, 30: 0xff, 31: 0xff}

// markDropped overwrites the fingerprint in the header of the record at l with dropped, so that
// the next Open does not restore it. A segment already deleted needs nothing. l.seg is pinned.
func (s *Store) markDropped(l loc) error {
	s.mu.Lock()
	dead := l.seg.dead
	s.mu.Unlock()
	if dead {
		return nil
	}
	buf := s.getBuf(align)
	defer s.putBuf(buf)
	page := (*buf)[:align]
	n, err := s.io.read(l.seg.fd, l.seg.path, page, l.off)
	if err != nil || n < align {
		return cmp.Or(err, error(unix.EIO))
	}
	copy(page[8:40], dropped[:])
	return s.io.write(l.seg.fd, l.seg.path, page, l.off)
}

// TakeEvictions moves the oldest blocks the store removed on its own, and does not hold again,
// into dst (see tier.EvictionReporter) and returns how many it moved, and how many it could not
// queue since the previous call. Reported are the blocks of evicted segments and blocks dropped
// because they failed their checks, from the first call on; neither Drop nor Open's own
// eviction (before any call could be made) is reported. The queue holds up to EvictionQueue
// blocks. It works on a closed Store too, and returns 0, 0 for a nil one.
func (s *Store) TakeEvictions(dst []tier.Eviction) (int, uint64) {
	if !s.made() {
		return 0, 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reporting = true
	n, i := 0, 0
	for ; i < len(s.evicted) && n < len(dst); i++ {
		e := s.evicted[i]
		if _, held := s.index[ikey{e.NS, e.Key}]; !held {
			dst[n] = e
			n++
		}
	}
	rest := copy(s.evicted, s.evicted[i:])
	clear(s.evicted[rest:])
	s.evicted = s.evicted[:rest]
	lost := s.lost
	s.lost = 0
	return n, lost
}

// reportLocked queues block k, which the store removed on its own, for TakeEvictions. The
// caller holds mu.
func (s *Store) reportLocked(k ikey) {
	switch {
	case !s.reporting:
	case len(s.evicted) < s.evictCap:
		s.evicted = append(s.evicted, tier.Eviction{NS: k.ns, Key: k.key})
	default:
		s.lost++
	}
}

var _ tier.EvictionReporter = (*Store)(nil)

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

// Close waits for the calls in flight, closes the segment files and releases the directory.
// Later calls return tier.ErrClosed; the files stay for the next Open.
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
	s.reapClose()
	s.wstage.free()
	for _, g := range s.stages {
		g.free()
	}
	s.wstage, s.stages = nil, nil
	if err := unix.Close(s.lockFD); err != nil {
		return fmt.Errorf("disk: close: %w: %w", tier.ErrUnavailable, err)
	}
	return nil
}

var _ tier.Store = (*Store)(nil)

// isNotExist reports a file that is gone.
func isNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }
