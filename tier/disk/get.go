package disk

import (
	"context"
	"fmt"
	"sync"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// Get copies the blocks of the leading run of keys the store holds in namespace ns into dst and
// returns how many it copied. Records that lie one after the other in a segment are read
// together, up to minPartBytes a call, into a stage of the store's; another goroutine checks
// each block there (tier.Check) and copies it out while the next are read. A block that fails
// is dropped from the index, counted in Stats.Corrupt and ends the run. A block served from a
// segment that eviction would reach soon is appended again at the tail (its second chance; see
// the package doc). dst must hold at least len(keys) slices of exactly Options.BlockBytes; the
// store keeps none of them. dst entries past the returned count may have been written.
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
	s.readAll(ctx, ns, keys, reads, dst)
	defer s.reap()
	n, err := s.settle(ns, keys, reads)
	s.secondChance(ctx, ns, keys, reads)
	return n, err
}

// getRead is one record a Get reads: what the index said under mu, and what the read found.
type getRead struct {
	at      loc     // its segment is pinned: its readers count this read
	old     bool    // eviction nears its segment: a block served moves to the tail
	raw     *[]byte // an old block's record, as read, for its move
	got     int     // the bytes of it read
	ok      bool    // the block was read, checked and copied
	corrupt bool    // the block failed its checks
	err     error   // an I/O error or ctx done: neither a miss nor corruption
}

// ringBytes is about how much of a stage one Get's reads fill before they reuse it.
const ringBytes = hugePage

// readAll reads the records of reads and checks them into dst. The calling goroutine reads
// them in order, in chunks of records that lie one after the other, each into the next slot of
// a ring in a stage; another checks each chunk once read, and frees its slot. Reading stops at
// the first I/O error or when ctx is done.
func (s *Store) readAll(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, reads []getRead, dst [][]byte) {
	if len(reads) == 0 {
		return
	}
	// Every record of one Get has the same size: one namespace, one block size.
	size := int(reads[0].at.size)
	slot := max(size, minPartBytes/size*size)
	ends := chunks(reads, slot/size)
	k := min(len(ends), max(2, ringBytes/slot))
	g := s.takeStage(k * slot)
	defer s.giveStage(g)
	check := func(c int) {
		lo := 0
		if c > 0 {
			lo = ends[c-1]
		}
		buf := g.buf[c%k*slot:]
		for i := lo; i < ends[c]; i++ {
			s.check(ns, keys[i], &reads[i], buf[(i-lo)*size:][:reads[i].got], dst[i])
		}
	}
	if len(ends) == 1 {
		if s.readChunk(ctx, reads[:ends[0]], g.buf[:slot]) {
			check(0)
		}
		return
	}
	read, freed := newHandoff(), newHandoff()
	var wg sync.WaitGroup
	wg.Go(func() {
		for c := 0; ; {
			n, last := read.wait(c)
			for ; c < n; c++ {
				check(c)
				freed.publish(c+1, false)
			}
			if last {
				return
			}
		}
	})
	c := 0
	for ; c < len(ends); c++ {
		if c >= k {
			freed.wait(c - k) // chunk c-k, in slot c%k, is checked
		}
		lo := 0
		if c > 0 {
			lo = ends[c-1]
		}
		if !s.readChunk(ctx, reads[lo:ends[c]], g.buf[c%k*slot:][:slot]) {
			break
		}
		read.publish(c+1, false)
	}
	read.publish(c, true)
	wg.Wait()
}

// chunks returns the ends of the runs of at most per reads that lie one after the other in one
// segment, in order.
func chunks(reads []getRead, per int) []int {
	var ends []int
	lo := 0
	for i := 1; i <= len(reads); i++ {
		if i < len(reads) && i-lo < per {
			if a, b := reads[i-1].at, reads[i].at; b.seg == a.seg && b.off == a.off+a.size {
				continue
			}
		}
		ends = append(ends, i)
		lo = i
	}
	return ends
}

// readChunk reads the records of reads, which lie one after the other, into buf, and sets the
// bytes each got. It reports false, with the first read's err set, on an I/O error or where ctx
// is done.
func (s *Store) readChunk(ctx context.Context, reads []getRead, buf []byte) bool {
	first := &reads[0]
	if first.err = ctxErr(ctx); first.err != nil {
		return false
	}
	size := int(first.at.size)
	n, err := s.io.read(first.at.seg.fd, first.at.seg.path, buf[:len(reads)*size], first.at.off)
	if err != nil {
		first.err = ioError(err)
		return false
	}
	for i := range reads {
		reads[i].got = min(n, size)
		n -= reads[i].got
	}
	return true
}

// check verifies record rec, as read, and copies its block into dst. A block in an old segment
// keeps a copy of its record for its move.
func (s *Store) check(ns prefix.Namespace, k prefix.Key, r *getRead, rec, dst []byte) {
	data, err := tier.Check(rec[:min(len(rec), tier.HeaderSize(ns)+s.blockBytes)], s.fp, ns, k, s.blockBytes)
	if err != nil {
		r.corrupt = true
		return
	}
	copy(dst, data)
	if r.old {
		r.raw = s.getBuf(len(rec))
		copy(*r.raw, rec)
	}
	r.ok = true
}

// takeStage returns a stage of at least n bytes for a Get, one the store keeps where one fits.
func (s *Store) takeStage(n int) *stage {
	s.smu.Lock()
	defer s.smu.Unlock()
	for i, g := range s.stages {
		if len(g.buf) >= n {
			s.stages = append(s.stages[:i], s.stages[i+1:]...)
			return g
		}
	}
	return newStage(n)
}

// giveStage keeps a Get's stage for the next.
func (s *Store) giveStage(g *stage) {
	s.smu.Lock()
	s.stages = append(s.stages, g)
	s.smu.Unlock()
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
		if r := &reads[i]; r.raw != nil && r.ok {
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
