package disk

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// Get copies the blocks of the leading run of keys the store holds in namespace ns into dst and
// returns how many it copied. Each file is read whole and checked (tier.Check) before its bytes
// are copied: a block that fails is deleted, counted in Stats.Corrupt and ends the run. dst must
// hold at least len(keys) slices of exactly Options.BlockBytes; the store keeps none of them.
// Up to ioWorkers files are read at once; dst entries past the returned count may have been
// written.
func (s *Store) Get(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, dst [][]byte) (int, error) {
	if err := s.checkGet(ctx, keys, dst); err != nil {
		return 0, fmt.Errorf("disk: get: %w", err)
	}
	if err := s.enter(); err != nil {
		return 0, fmt.Errorf("disk: get: %w", err)
	}
	defer s.calls.Done()
	if err := ctxErr(ctx); err != nil {
		return 0, s.failed(fmt.Errorf("disk: get: %w", err))
	}
	reads := s.resolve(ns, keys)
	parallel(len(reads), func(i int) {
		r := &reads[i]
		if r.err = ctxErr(ctx); r.err != nil {
			return
		}
		r.ok, r.err = s.readOne(ns, keys[i], r.path, dst[i])
		if errors.Is(r.err, errCorrupt) {
			r.corrupt, r.err = true, nil
		}
	})
	defer s.reap()
	return s.settle(ns, keys, reads)
}

// getRead is one file a Get reads: what the index said under mu, and what the read found.
type getRead struct {
	e       *entry // pinned: its readers count this read
	path    string
	ok      bool  // the block was read, checked and copied
	corrupt bool  // the block failed its checks
	err     error // an I/O error or ctx done: neither a miss nor corruption
}

// resolve returns the leading run of keys the index holds, marking them recently used, and
// counts a miss where the run ends before the keys do.
func (s *Store) resolve(ns prefix.Namespace, keys []prefix.Key) []getRead {
	s.mu.Lock()
	defer s.mu.Unlock()
	var reads []getRead
	for _, k := range keys {
		e := s.index[ikey{ns, k}]
		if e == nil || e.pending {
			s.st.Misses++
			break
		}
		s.order.touch(e)
		e.readers++
		if reads == nil {
			reads = make([]getRead, 0, len(keys))
		}
		reads = append(reads, getRead{e: e, path: e.path})
	}
	return reads
}

// settle ends a Get: the run is the reads that succeeded before the first that did not.
// Blocks that failed their checks are forgotten wherever they are in the run.
func (s *Store) settle(ns prefix.Namespace, keys []prefix.Key, reads []getRead) (int, error) {
	run := len(reads)
	var err error
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, r := range reads {
		r.e.readers--
		switch {
		case r.ok:
		case r.corrupt:
			s.st.Corrupt++
			s.forgetLocked(r.e)
		case r.err == nil: // the file is gone
			if i < run {
				s.st.Misses++
			}
			s.forgetLocked(r.e)
		}
		if !r.ok && i < run {
			run, err = i, r.err
		}
	}
	s.settleSpaceLocked()
	s.st.Gets += uint64(run)
	s.st.GetBytes += uint64(run) * uint64(s.blockBytes)
	if err != nil {
		s.st.Failures++
		return run, fmt.Errorf("disk: get: %w", err)
	}
	return run, nil
}

// checkGet validates a Get's arguments; it changes nothing.
func (s *Store) checkGet(ctx context.Context, keys []prefix.Key, dst [][]byte) error {
	if !s.made() {
		return errNotMade
	}
	if ctx == nil {
		return errNilContext
	}
	if len(dst) < len(keys) {
		return &ArgumentError{Name: "len(dst)", Value: int64(len(dst)), Min: int64(len(keys)), Reason: fmt.Sprintf("%d slices for %d keys", len(dst), len(keys))}
	}
	for i := range keys {
		if len(dst[i]) != s.blockBytes {
			return &SizeError{What: "dst", Index: i, Len: len(dst[i]), Want: s.blockBytes}
		}
	}
	return nil
}

// readOne reads, checks and copies one block. It reports false for a block that failed its
// checks, or whose file is gone, with a nil error.
//
// The file is read outside mu. That is safe because a file under a block's final name is
// always whole and never written again: an eviction moves it away (a later open fails with
// ENOENT), to be deleted rather than reused while a Get reads it, and a later Put of the key
// renames a new whole file to the name.
func (s *Store) readOne(ns prefix.Namespace, k prefix.Key, path string, dst []byte) (bool, error) {
	size := recordSize(ns, s.blockBytes)
	buf := s.getBuf(size)
	defer s.putBuf(buf)
	n, err := s.io.read(path, (*buf)[:size])
	if isNotExist(err) {
		return false, nil
	}
	if err != nil {
		return false, ioError(err)
	}
	data, err := tier.Check((*buf)[:min(n, tier.HeaderSize(ns)+s.blockBytes)], s.fp, ns, k, s.blockBytes)
	if err != nil {
		return false, errCorrupt
	}
	copy(dst, data)
	return true, nil
}

// errCorrupt marks, inside a Get, a block that failed its checks.
var errCorrupt = tier.ErrCorrupt

// forgetLocked forgets the block a Get found gone or corrupt, if the index still holds that
// same block (not one a later Put stored under the key). The caller holds mu.
func (s *Store) forgetLocked(e *entry) {
	if s.index[e.k] == e {
		s.removeLocked(e)
	}
}

// ioWorkers is how many files one call reads or writes at once: enough to keep a disk's queue
// busy and to check one block while another is read.
const ioWorkers = 4

// parallel calls f(i) for every i below n, from up to ioWorkers goroutines, and returns when
// all calls have.
func parallel(n int, f func(i int)) {
	w := min(n, ioWorkers)
	if w <= 1 {
		for i := range n {
			f(i)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range w {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				f(i)
			}
		})
	}
	wg.Wait()
}
