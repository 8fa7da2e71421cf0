package disk

import (
	"context"
	"fmt"
	"sync"

	"github.com/pagedkv/pagedkv/tier"
)

// appendItem is one record an append writes: a Put's block, encoded, or a record a Get moves
// to the tail (its second chance), copied as read.
type appendItem struct {
	k    ikey
	size int64
	blk  *tier.Block // a Put's block, or nil
	raw  []byte      // a moved record's bytes, or nil
	from loc         // a moved record's place: it moves only if the index still points there
	at   loc         // where the append writes it
}

// appendRun is the items an append writes into one segment, one after the other.
type appendRun struct {
	seg     *segment
	fresh   bool // seg is made by this append
	renamed bool // seg's spare file is under seg's name
	off     int64
	lo, hi  int // its items
}

// Put stores blocks, skipping those the store holds. It appends their records to the tail
// segment, encoding them while it writes them (see the package doc), starting a new segment
// where the tail is full, then publishes them to the index and evicts the oldest segments over
// the limit. A failure (an I/O error, ctx done) deletes the segments it made, cuts the tail
// back to its old size and leaves the index as it was. The caller keeps blocks; the store
// copies their bytes.
func (s *Store) Put(ctx context.Context, blocks []tier.Block) error {
	if err := s.checkPut(ctx, blocks); err != nil {
		return fmt.Errorf("disk: put: %w", err)
	}
	if err := s.enter(); err != nil {
		return fmt.Errorf("disk: put: %w", err)
	}
	defer s.calls.Done()
	defer s.reap()
	s.wmu.Lock()
	items := s.witems[:0]
	for i := range blocks {
		b := &blocks[i]
		items = append(items, appendItem{k: ikey{b.NS, b.Key}, size: int64(recordSize(b.NS, s.blockBytes)), blk: b})
	}
	err := s.append(ctx, items)
	clear(items)
	s.witems = items[:0]
	s.wmu.Unlock()
	if err != nil {
		return s.failed(fmt.Errorf("disk: put: %w", err))
	}
	return nil
}

// checkPut validates a Put's arguments; it changes nothing.
func (s *Store) checkPut(ctx context.Context, blocks []tier.Block) error {
	if !s.made() {
		return errNotMade
	}
	if ctx == nil {
		return errNilContext
	}
	var need uint64
	for i, b := range blocks {
		if len(b.Data) != s.blockBytes {
			return &SizeError{What: "block", Index: i, Len: len(b.Data), Want: s.blockBytes}
		}
		if len(b.NS.Salt) > tier.MaxSalt {
			return &ArgumentError{Name: "salt length", Value: int64(len(b.NS.Salt)), Min: 0, Max: tier.MaxSalt}
		}
		need += uint64(recordSize(b.NS, s.blockBytes))
	}
	if room := s.limit - s.spareLimit; need > room {
		return &FitError{Blocks: len(blocks), Need: need, Limit: room}
	}
	return nil
}

// append writes items at the tail and publishes them. The caller holds wmu.
func (s *Store) append(ctx context.Context, items []appendItem) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	items, runs := s.plan(items)
	if len(items) == 0 {
		return nil
	}
	for i := range runs {
		if err := s.writeRun(ctx, items, &runs[i]); err != nil {
			s.undo(runs)
			return err
		}
	}
	s.publish(items, runs)
	return nil
}

// plan drops the items the append must not write (a Put's blocks the store holds, a move whose
// block has gone elsewhere) and places the others at the tail, in runs. The caller holds wmu.
func (s *Store) plan(items []appendItem) ([]appendItem, []appendRun) {
	s.mu.Lock()
	defer s.mu.Unlock()
	kept := items[:0]
	for _, it := range items {
		l, ok := s.index[it.k]
		if (it.blk != nil && !ok) || (it.blk == nil && ok && l == it.from) {
			kept = append(kept, it)
		}
	}
	runs := s.wruns[:0]
	seg, off, fresh := s.tailLocked(), int64(0), false
	if seg != nil {
		off = seg.size
	}
	next, seq := s.next, s.seq
	for i := range kept {
		it := &kept[i]
		if seg == nil || (off > 0 && off+it.size > s.segBytes) {
			if seg != nil {
				next = seg.base + uint64(off)
			}
			seq++
			seg, off, fresh = &segment{seq: seq, path: s.segName(seq), fd: -1, base: next}, 0, true
			if n := len(s.spares); n > 0 {
				sp := s.spares[n-1] // the newest: the likeliest to be in the disk's cache
				s.spares = s.spares[:n-1]
				s.ds.SpareFiles--
				s.ds.SpareBytes -= uint64(sp.fsize)
				seg.fd, seg.fsize, seg.spare = sp.fd, sp.fsize, sp.path
			}
		}
		if len(runs) == 0 || runs[len(runs)-1].seg != seg {
			runs = append(runs, appendRun{seg: seg, fresh: fresh, off: off, lo: i, hi: i})
		}
		it.at = loc{seg, off, it.size}
		off += it.size
		runs[len(runs)-1].hi = i + 1
	}
	s.seq = seq
	s.wruns = runs
	return kept, runs
}

// writeRun encodes a run's records into the append stage and writes them, creating the run's
// segment first where it is new. The caller holds wmu.
func (s *Store) writeRun(ctx context.Context, items []appendItem, r *appendRun) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	n := int(items[r.hi-1].at.off + items[r.hi-1].size - r.off)
	if s.wstage == nil || len(s.wstage.buf) < n+align {
		old := 0
		if s.wstage != nil {
			old = len(s.wstage.buf)
			s.wstage.free()
		}
		s.wstage = newStage(max(n+align, 2*old))
	}
	buf := s.wstage.buf[:n]
	if r.off+int64(n) < r.seg.fsize {
		// A reused file holds older records past the new ones: a zero page after them ends
		// the segment for Open's scan. The next append overwrites it.
		buf = s.wstage.buf[:n+align]
		clear(buf[n:])
	}
	switch {
	case r.fresh && r.seg.spare != "":
		if err := s.io.rename(r.seg.spare, r.seg.path); err != nil {
			return ioError(err)
		}
		r.renamed = true
	case r.fresh:
		fd, err := s.io.open(r.seg.path, true)
		if err != nil {
			return ioError(err)
		}
		r.seg.fd = fd
	}
	run := items[r.lo:r.hi]
	if n < 2*minPartBytes || len(run) == 1 {
		for i := range run {
			s.encode(buf, &run[i], r.off)
		}
		return s.writeAt(r.seg, buf, r.off)
	}
	// This goroutine encodes the first record and writes it while another encodes the rest;
	// then it writes each record, one write per record, once it is encoded. Where the next is
	// not encoded yet (the other goroutine waits for a CPU), it encodes one itself. The
	// checksums and copies overlap the I/O, and the other goroutine starts during the first
	// write, not before it. One write per record, not one for all those encoded: a disk takes
	// a stream of writes of a few hundred KiB faster than one of several MiB, which the kernel
	// splits and completes only when its last part is written.
	q := &s.wqueue
	q.reset(len(run))
	encode := func() bool {
		i := q.claim()
		if i < 0 {
			return false
		}
		s.encode(buf, &run[i], r.off)
		q.finish(i)
		return true
	}
	encode() // the first record
	var wg sync.WaitGroup
	wg.Go(func() {
		for encode() {
		}
	})
	err := s.writeAt(r.seg, buf[:run[0].size], r.off)
	for i := 1; i < len(run) && err == nil; i++ {
		for !q.encoded(i) {
			if !encode() {
				q.wait()
			}
		}
		from, to := run[i].at.off-r.off, run[i].at.off+run[i].size-r.off
		if i == len(run)-1 {
			to = int64(len(buf)) // with the zero page, where there is one
		}
		err = s.writeAt(r.seg, buf[from:to], r.off+from)
	}
	wg.Wait()
	return err
}

// minPartBytes is the least a run must hold for its encoding to overlap its writes, and the
// most a Get reads with one call where records lie one after the other.
const minPartBytes = 256 << 10

// encode encodes item it into buf, whose first byte goes to offset base of its segment, and
// zeroes its padding. checkPut has bounded the salt, so tier.Encode does not fail.
func (s *Store) encode(buf []byte, it *appendItem, base int64) {
	rec := buf[it.at.off-base:][:it.size]
	used := copy(rec, it.raw)
	if it.blk != nil {
		enc, _ := tier.Encode(rec[:0], s.fp, *it.blk)
		used = len(enc)
	}
	clear(rec[used:])
}

// writeAt writes buf at offset at of segment g.
func (s *Store) writeAt(g *segment, buf []byte, at int64) error {
	if err := s.io.write(g.fd, g.path, buf, at); err != nil {
		return ioError(err)
	}
	return nil
}

// undo deletes the segments a failed append made, gives back the spare files it took, under
// their names, and cuts the tail back to its committed size, so that no record of the append
// is found by the next Open. The caller holds wmu.
func (s *Store) undo(runs []appendRun) {
	var back []*segment
	for _, r := range runs {
		g := r.seg
		switch {
		case r.fresh && g.spare != "":
			if r.renamed && s.io.rename(g.path, g.spare) != nil {
				_ = s.io.close(g.fd)
				_ = s.io.remove(g.path)
				continue
			}
			back = append(back, &segment{seq: g.seq, path: g.spare, fd: g.fd, fsize: g.fsize})
		case r.fresh && g.fd >= 0:
			_ = s.io.close(g.fd)
			_ = s.io.remove(g.path)
		case !r.fresh:
			s.cut(g, r.off)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range back {
		s.addSpareLocked(g)
	}
	s.trimSparesLocked()
}

// cut ends the records of tail g at off, its committed size, after a failed append wrote past
// it. A file that ends at off is cut there. A reused spare file holds older records past off:
// the append's partial bytes overwrote the zero page that ended the segment for Open's scan, so
// it is written again; where that fails, the file is cut at off and its bytes past off no longer
// count. The caller holds wmu.
func (s *Store) cut(g *segment, off int64) {
	if off < g.fsize {
		page := s.getBuf(align)
		defer s.putBuf(page)
		clear((*page)[:align])
		if s.writeAt(g, (*page)[:align], off) == nil {
			return
		}
	}
	if s.io.truncate(g.fd, g.path, off) != nil || off >= g.fsize {
		return
	}
	s.mu.Lock()
	s.st.Bytes -= uint64(g.fsize - off)
	g.fsize = off
	s.mu.Unlock()
}

// publish commits a written append: new segments join the store, records enter the index, then
// emptied segments go and the oldest are evicted over the limit. The caller holds wmu.
func (s *Store) publish(items []appendItem, runs []appendRun) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range runs {
		if r.fresh {
			s.segs = append(s.segs, r.seg)
			s.ds.Segments++
		}
		end := items[r.hi-1].at.off + items[r.hi-1].size
		fsize := max(end, r.seg.fsize)
		if r.fresh {
			r.seg.fsize = 0
		}
		s.st.Bytes += uint64(fsize - r.seg.fsize)
		r.seg.size, r.seg.fsize = end, fsize
		s.next = r.seg.base + uint64(end)
	}
	for _, it := range items {
		if l, ok := s.index[it.k]; ok {
			s.forgetLocked(it.k, l) // a moved block's old place, or a key twice in one Put
		}
		s.index[it.k] = it.at
		it.at.seg.live++
		it.at.seg.keys = append(it.at.seg.keys, it.k)
		s.st.Blocks++
		s.ds.LiveBytes += uint64(it.size)
		if it.blk != nil {
			s.st.Puts++
			s.st.PutBytes += uint64(s.blockBytes)
		}
	}
	for i := 0; i < len(s.segs)-1; i++ {
		if g := s.segs[i]; g.live == 0 {
			s.killLocked(g)
			i--
		}
	}
	s.evictLocked()
}

// getBuf returns an aligned buffer of at least n bytes from the store's pool.
func (s *Store) getBuf(n int) *[]byte {
	if p, ok := s.bufs.Get().(*[]byte); ok {
		if cap(*p) >= n {
			*p = (*p)[:cap(*p)]
			return p
		}
	}
	b := alignedBuf(n)
	return &b
}

func (s *Store) putBuf(p *[]byte) { s.bufs.Put(p) }
