package disk

import (
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/pagedkv/pagedkv/tier"
)

// scan rebuilds the index from the segment files, oldest first: a later record of a key wins.
// It drops the records that are not this store's, cuts each segment at a torn or unreadable
// record and deletes the segments left with no live record.
func (s *Store) scan() error {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return ioError(err)
	}
	var seqs, spares []uint64
	for _, d := range ents {
		if seq, ok := isSegName(d.Name()); ok && d.Type().IsRegular() {
			seqs = append(seqs, seq)
		}
		if seq, ok := isName(d.Name(), ".spare"); ok && d.Type().IsRegular() {
			spares = append(spares, seq)
		}
	}
	slices.Sort(seqs)
	slices.Sort(spares)
	for _, seq := range spares {
		if err := s.scanSpare(seq); err != nil {
			return ioError(err)
		}
	}
	hdr := alignedBuf(align)
	for _, seq := range seqs {
		g := &segment{seq: seq, path: s.segName(seq), base: s.next}
		fd, err := s.io.open(g.path, false)
		if err != nil {
			return ioError(err)
		}
		g.fd = fd
		s.segs = append(s.segs, g) // closed by reapClose if the scan fails
		s.ds.Segments++
		s.seq = max(s.seq, seq)
		if err := s.scanSegment(g, hdr); err != nil {
			return ioError(err)
		}
		g.fsize = g.size
		s.st.Bytes += uint64(g.size)
		s.next += uint64(g.size)
	}
	s.st.Restored = s.st.Blocks
	for i := 0; i < len(s.segs); i++ {
		if g := s.segs[i]; g.live == 0 {
			s.killLocked(g)
			i--
		}
	}
	return nil
}

// scanSegment indexes the records of segment g, each at a 4096-aligned offset found from the
// length its predecessor's header gives, and cuts the file at the first record it cannot
// parse or whose bytes run past the file's end.
func (s *Store) scanSegment(g *segment, hdr []byte) error {
	var st unix.Stat_t
	if err := unix.Fstat(g.fd, &st); err != nil {
		return err
	}
	end := st.Size
	off := int64(0)
	for off < end {
		h, err := s.header(g, off, hdr)
		if err != nil {
			return err
		}
		if h == nil && !slices.ContainsFunc(hdr, func(b byte) bool { return b != 0 }) {
			// a zero page: the end of the records in a reused file
			if err := s.io.truncate(g.fd, g.path, off); err != nil {
				return err
			}
			break
		}
		size := int64(0)
		if h != nil && h.DataLen <= MaxBlockBytes {
			size = int64(roundUp(h.Size + int(h.DataLen)))
		}
		if size == 0 || off+size > end {
			// a bad header or a torn tail: nothing after it can be found
			s.ds.DroppedAtOpen++
			s.ds.TornAtOpen++
			if err := s.io.truncate(g.fd, g.path, off); err != nil {
				return err
			}
			break
		}
		k := ikey{h.NS, h.Key}
		if h.Fingerprint == dropped {
			// Drop marks only the record the index pointed at. An earlier copy of the block (the
			// old place of a moved record, a key twice in one Put) is still intact: the mark,
			// later in the log, drops it too.
			if h.DataLen == uint64(s.blockBytes) {
				s.unindex(k)
			}
			off += size
			continue
		}
		if h.Fingerprint != s.fp || h.DataLen != uint64(s.blockBytes) {
			s.ds.DroppedAtOpen++
			off += size
			continue
		}
		s.unindex(k)
		s.index[k] = loc{g, off, size}
		g.keys = append(g.keys, k)
		g.live++
		s.st.Blocks++
		s.ds.LiveBytes += uint64(size)
		off += size
	}
	g.size = off
	return nil
}

// unindex forgets an earlier record of k, found by the scan, where there is one: a later
// record, or the drop mark on one, replaces it.
func (s *Store) unindex(k ikey) {
	if l, ok := s.index[k]; ok {
		delete(s.index, k)
		s.st.Blocks--
		s.ds.LiveBytes -= uint64(l.size)
		l.seg.live--
	}
}

// scanSpare puts spare file seq into the pool at Open; evictLocked trims the pool to its
// bound.
func (s *Store) scanSpare(seq uint64) error {
	path := s.spareName(seq)
	fd, err := s.io.open(path, false)
	if err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Size == 0 || st.Size%align != 0 {
		_ = s.io.close(fd)
		_ = s.io.remove(path)
		return nil
	}
	s.seq = max(s.seq, seq)
	s.addSpareLocked(&segment{seq: seq, path: path, fd: fd, fsize: st.Size})
	return nil
}

// header reads and parses the header of the record at off in g, or returns nil where none
// parses. An I/O error is returned.
func (s *Store) header(g *segment, off int64, buf []byte) (*tier.Header, error) {
	clear(buf)
	n, err := s.io.read(g.fd, g.path, buf, off)
	if err != nil {
		return nil, err
	}
	h, err := tier.ParseHeader(buf[:n])
	if err != nil && n == len(buf) && h.Size > n && h.Size <= 128+tier.MaxSalt {
		// a long salt: read the whole header
		big := alignedBuf(roundUp(h.Size))
		if n, err = s.io.read(g.fd, g.path, big, off); err != nil {
			return nil, err
		}
		h, err = tier.ParseHeader(big[:n])
	}
	if err != nil {
		return nil, nil
	}
	return &h, nil
}
