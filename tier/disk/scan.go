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
	var seqs []uint64
	for _, d := range ents {
		if seq, ok := isSegName(d.Name()); ok && d.Type().IsRegular() {
			seqs = append(seqs, seq)
		}
	}
	slices.Sort(seqs)
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
		s.seq = seq
		if err := s.scanSegment(g, hdr); err != nil {
			return ioError(err)
		}
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
		if h.Fingerprint == dropped {
			off += size
			continue
		}
		if h.Fingerprint != s.fp || h.DataLen != uint64(s.blockBytes) {
			s.ds.DroppedAtOpen++
			off += size
			continue
		}
		k := ikey{h.NS, h.Key}
		if l, ok := s.index[k]; ok {
			delete(s.index, k)
			s.st.Blocks--
			s.ds.LiveBytes -= uint64(l.size)
			l.seg.live--
		}
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

// header reads and parses the header of the record at off in g, or returns nil where none
// parses. An I/O error is returned.
func (s *Store) header(g *segment, off int64, buf []byte) (*tier.Header, error) {
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
