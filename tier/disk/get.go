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
// returns how many it copied. Each record is read with one call and checked (tier.Check) before
// its bytes are copied: a block that fails is dropped from the index, counted in Stats.Corrupt
// and ends the run. A block served from a segment that eviction would reach soon is appended
// again at the tail (its second chance; see the package doc). dst must hold at least len(keys) slices of exactly
// Options.BlockBytes; the store keeps none of them. Up to ioWorkers records are read at once;
// dst entries past the returned count may have been written.
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
		r.ok, r.err = s.readOne(ns, keys[i], r, dst[i])
		if errors.Is(r.err, errCorrupt) {
			r.corrupt, r.err = true, nil
		}
	})
	defer s.reap()
	n, err := s.settle(ns, keys, reads)
	s.secondChance(ctx, ns, keys, reads)
	return n, err
}

// getRead is one record a Get reads: what the index said under mu, and what the read found.
type getRead struct {
	at      loc  // its segment is pinned: its readers count this read
	old     bool // eviction nears its segment: a block served moves to the tail
	raw     *[]byte
	ok      bool  // the block was read, checked and copied
	corrupt bool  // the block failed its checks
	err     error // an I/O error or ctx done: neither a miss nor corruption
}

// resolve returns the leading run of keys the index holds, pinning their segments, and counts a
// miss where the run ends before the keys do.
func (s *Store) resolve(ns prefix.Namespace, keys []prefix.Key) []getRead {
	s.mu.Lock()
	defer s.mu.Unlock()
	var reads []getRead
	for _, k := range keys {
		l, ok := s.index[ikey{ns, k}]
		if !ok {
			s.st.Misses++
			break
		}
		l.seg.readers++
		if reads == nil {
			reads = make([]getRead, 0, len(keys))
		}
		reads = append(reads, getRead{at: l, old: s.oldLocked(l.seg)})
	}
	return reads
}

// settle ends a Get's reads: the run is the reads that succeeded, of blocks the index still
// holds there, before the first that did not. Blocks that failed their checks are forgotten
// wherever they are in the run.
func (s *Store) settle(ns prefix.Namespace, keys []prefix.Key, reads []getRead) (int, error) {
	run := len(reads)
	var err error
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range reads {
		r := &reads[i]
		s.unpinLocked(r.at.seg)
		k := ikey{ns, keys[i]}
		l, held := s.index[k]
		held = held && l == r.at
		switch {
		case r.corrupt && held:
			s.st.Corrupt++
			s.forgetLocked(k, l)
			s.reportLocked(k)
		case r.ok && !held: // dropped or evicted while it was read
			r.ok = false
			if i < run {
				s.st.Misses++
			}
		}
		if !r.ok && i < run {
			run, err = i, r.err
		}
	}
	s.st.Gets += uint64(run)
	s.st.GetBytes += uint64(run) * uint64(s.blockBytes)
	if err != nil {
		s.st.Failures++
		return run, fmt.Errorf("disk: get: %w", err)
	}
	return run, nil
}

// secondChance appends the records a Get served from the oldest segments again at the tail,
// and gives their buffers back. A failure leaves them where they were.
func (s *Store) secondChance(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, reads []getRead) {
	var moves []appendItem
	for i := range reads {
		r := &reads[i]
		if r.raw == nil {
			continue
		}
		if r.ok {
			moves = append(moves, appendItem{k: ikey{ns, keys[i]}, size: r.at.size, raw: (*r.raw)[:r.at.size], from: r.at})
		}
	}
	if len(moves) > 0 {
		s.wmu.Lock()
		_ = s.append(ctx, moves)
		s.wmu.Unlock()
	}
	for i := range reads {
		if reads[i].raw != nil {
			s.putBuf(reads[i].raw)
		}
	}
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
// checks, with a nil error. A record in an old segment keeps its buffer in r.raw for its second
// chance.
//
// The record is read outside mu. That is safe because a published record is whole and never
// written again, and its segment, pinned, is not deleted until the read is done.
func (s *Store) readOne(ns prefix.Namespace, k prefix.Key, r *getRead, dst []byte) (bool, error) {
	size := int(r.at.size)
	buf := s.getBuf(size)
	keep := false
	defer func() {
		if !keep {
			s.putBuf(buf)
		}
	}()
	n, err := s.io.read(r.at.seg.fd, r.at.seg.path, (*buf)[:size], r.at.off)
	if err != nil {
		return false, ioError(err)
	}
	data, err := tier.Check((*buf)[:min(n, tier.HeaderSize(ns)+s.blockBytes)], s.fp, ns, k, s.blockBytes)
	if err != nil {
		return false, errCorrupt
	}
	copy(dst, data)
	if r.old {
		keep, r.raw = true, buf
	}
	return true, nil
}

// errCorrupt marks, inside a Get, a block that failed its checks.
var errCorrupt = tier.ErrCorrupt

// ioWorkers is how many records one Get reads at once: enough to keep a disk's queue
// busy and to check one block while another is read.
const ioWorkers = 4

// parallel calls f(i) for every i below n, from up to ioWorkers goroutines, and returns when
// all calls have.
func parallel(n int, f func(i int)) { parallelN(n, ioWorkers, f) }

// parallelN is parallel with up to w goroutines.
func parallelN(n, w int, f func(i int)) {
	w = min(n, w)
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
