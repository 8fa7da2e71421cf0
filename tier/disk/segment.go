package disk

import (
	"fmt"
)

// segName returns the file of segment seq: 16 hex digits and ".seg".
func (s *Store) segName(seq uint64) string { return fmt.Sprintf("%s/%016x.seg", s.dir, seq) }

// spareName returns the name a spare file takes: 16 hex digits and ".spare".
func (s *Store) spareName(seq uint64) string { return fmt.Sprintf("%s/%016x.spare", s.dir, seq) }

// isSegName reports whether name has the form segName gives, and its number.
func isSegName(name string) (uint64, bool) { return isName(name, ".seg") }

// isName reports whether name is 16 hex digits and then suffix, and the number.
func isName(name, suffix string) (uint64, bool) {
	var seq uint64
	if len(name) != 16+len(suffix) || name[16:] != suffix {
		return 0, false
	}
	for _, c := range name[:16] {
		switch {
		case c >= '0' && c <= '9':
			seq = seq<<4 | uint64(c-'0')
		case c >= 'a' && c <= 'f':
			seq = seq<<4 | uint64(c-'a'+10)
		default:
			return 0, false
		}
	}
	return seq, true
}

// tailLocked returns the segment appends go to, or nil. The caller holds mu.
func (s *Store) tailLocked() *segment {
	if len(s.segs) == 0 {
		return nil
	}
	return s.segs[len(s.segs)-1]
}

// oldLocked reports whether eviction would reach segment g, not the tail, within the next
// quarter of the segments' room (LimitBytes less SpareBytes) of appends: a Get of a block there
// gives it a second chance at the tail. A store far from full moves nothing. The caller holds
// mu.
func (s *Store) oldLocked(g *segment) bool {
	if len(s.segs) == 0 || g == s.tailLocked() {
		return false
	}
	room := s.limit - s.spareLimit
	free := room - min(room, s.st.Bytes)
	return free+(g.base-s.segs[0].base) < room/4
}

// forgetLocked removes key k, found at l, from the index. A segment left with no live record is
// deleted, unless it is the tail. The caller holds mu.
func (s *Store) forgetLocked(k ikey, l loc) {
	delete(s.index, k)
	s.st.Blocks--
	s.ds.LiveBytes -= uint64(l.size)
	l.seg.live--
	if l.seg.live == 0 && l.seg != s.tailLocked() {
		s.killLocked(l.seg)
	}
}

// evictLocked deletes the oldest segments, and forgets their blocks, until the segments fit in
// LimitBytes less SpareBytes, then deletes spare files over SpareBytes or the limit. The
// caller holds mu.
func (s *Store) evictLocked() {
	for s.st.Bytes > s.limit-s.spareLimit && len(s.segs) > 0 {
		g := s.segs[0]
		for _, k := range g.keys {
			if l, ok := s.index[k]; ok && l.seg == g {
				delete(s.index, k)
				s.st.Blocks--
				s.ds.LiveBytes -= uint64(l.size)
				s.st.Evictions++
				s.reportLocked(k)
			}
		}
		g.live = 0
		s.killLocked(g)
	}
	s.trimSparesLocked()
}

// trimSparesLocked deletes the oldest spare files until the spares fit in SpareBytes and,
// with the segments, in LimitBytes. The caller holds mu.
func (s *Store) trimSparesLocked() {
	for len(s.spares) > 0 && (s.ds.SpareBytes > s.spareLimit || s.st.Bytes+s.ds.SpareBytes > s.limit) {
		g := s.spares[0]
		s.spares = s.spares[1:]
		s.ds.SpareFiles--
		s.ds.SpareBytes -= uint64(g.fsize)
		s.doomed = append(s.doomed, g)
	}
}

// addSpareLocked puts file g into the spare pool. The caller holds mu.
func (s *Store) addSpareLocked(g *segment) {
	s.spares = append(s.spares, g)
	s.ds.SpareFiles++
	s.ds.SpareBytes += uint64(g.fsize)
}

// retireLocked disposes of the file of dead segment g, which no Get reads: it becomes a spare
// where the pool has room for it, else reap deletes it. Renaming it under mu orders the rename
// before any later append that reuses it. The caller holds mu.
func (s *Store) retireLocked(g *segment) {
	if s.ds.SpareBytes+uint64(g.fsize) <= s.spareLimit && g.fd >= 0 {
		name := s.spareName(g.seq)
		if s.io.rename(g.path, name) == nil {
			s.addSpareLocked(&segment{seq: g.seq, path: name, fd: g.fd, fsize: g.fsize})
			return
		}
		s.st.Failures++
	}
	s.doomed = append(s.doomed, g)
}

// killLocked takes segment g out of the store: its bytes no longer count, and its file is
// deleted by reap once no Get reads it. The caller holds mu and has forgotten g's blocks.
func (s *Store) killLocked(g *segment) {
	if g.dead {
		return
	}
	g.dead = true
	for i, h := range s.segs {
		if h == g {
			s.segs = append(s.segs[:i], s.segs[i+1:]...)
			break
		}
	}
	s.st.Bytes -= uint64(g.fsize)
	s.ds.Segments--
	g.keys = nil
	if g.readers == 0 {
		s.retireLocked(g)
	}
}

// unpinLocked ends a Get's read of g. The caller holds mu.
func (s *Store) unpinLocked(g *segment) {
	g.readers--
	if g.dead && g.readers == 0 {
		s.retireLocked(g)
	}
}

// reap closes and deletes the dead segments no Get reads and the spare files let go. Deleting a file frees its blocks,
// which takes the filesystem's journal, so it is done outside mu.
func (s *Store) reap() {
	s.mu.Lock()
	doomed := s.doomed
	s.doomed = nil
	s.mu.Unlock()
	var failed uint64
	for _, g := range doomed {
		_ = s.io.close(g.fd)
		if s.io.remove(g.path) != nil {
			failed++ // found again by the next Open
		}
	}
	if failed > 0 {
		s.mu.Lock()
		s.st.Failures += failed
		s.mu.Unlock()
	}
}

// reapClose is reap, then closes the live segments' and spares' files, which stay on disk. Close and a
// failed Open call it once no call is in flight.
func (s *Store) reapClose() {
	s.reap()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range append(s.segs, s.spares...) {
		if g.fd >= 0 {
			_ = s.io.close(g.fd)
			g.fd = -1
		}
	}
}
