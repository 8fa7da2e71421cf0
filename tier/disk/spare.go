package disk

import (
	"os"
	"strconv"
	"strings"
)

// spareDir holds the files of removed blocks kept for reuse, named by a decimal sequence
// number. A Put that finds a spare file of its record's size renames it to its temporary name
// and overwrites it in place: the filesystem then allocates and frees no blocks, which costs
// more than writing them (measured in BenchmarkPut).
const spareDir = "spare"

// spare is one file in the spare pool.
type spare struct {
	path string
	size uint64
}

// takeSpareLocked removes a spare file of size bytes from the pool and returns its path, or ""
// where the pool has none. The caller holds mu.
func (s *Store) takeSpareLocked(size uint64) string {
	for i := len(s.spares) - 1; i >= 0; i-- {
		if sp := s.spares[i]; sp.size == size {
			s.spares = append(s.spares[:i], s.spares[i+1:]...)
			s.ds.SpareBytes -= size
			s.ds.SpareFiles--
			return sp.path
		}
	}
	return ""
}

// addSpareLocked puts a file into the pool. The caller holds mu.
func (s *Store) addSpareLocked(path string, size uint64) {
	s.spares = append(s.spares, spare{path, size})
	s.ds.SpareBytes += size
	s.ds.SpareFiles++
}

// nextSparePathLocked returns an unused name in spareDir. The caller holds mu.
func (s *Store) nextSparePathLocked() string {
	s.spareSeq++
	return s.dir + "/" + spareDir + "/" + strconv.FormatUint(s.spareSeq, 10)
}

// settleSpaceLocked brings the store within its bounds after a Put commits or blocks are
// removed: it evicts least recently used blocks (their files become spares) until the blocks
// fit in LimitBytes less SpareBytes, then deletes spare files (through reap) until the spares
// fit in SpareBytes and blocks and spares together in LimitBytes. The caller holds mu.
func (s *Store) settleSpaceLocked() {
	for s.st.Bytes > s.limit-s.spareTarget {
		e := s.order.oldest()
		if e == nil {
			break
		}
		s.removeLocked(e)
		s.st.Evictions++
	}
	for len(s.spares) > 0 && (s.ds.SpareBytes > s.spareTarget || s.st.Bytes+s.ds.SpareBytes > s.limit) {
		sp := s.spares[0] // the oldest
		s.spares = s.spares[1:]
		s.ds.SpareBytes -= sp.size
		s.ds.SpareFiles--
		s.doomed = append(s.doomed, sp.path)
	}
}

// scanSpares fills the pool from spareDir at Open. Files whose size is not a whole number of
// 4096-byte pages, or whose name is not a sequence number, are deleted.
func (s *Store) scanSpares() error {
	dir := s.dir + "/" + spareDir
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, d := range ents {
		path := dir + "/" + d.Name()
		seq, err := strconv.ParseUint(d.Name(), 10, 64)
		info, ierr := d.Info()
		if err != nil || ierr != nil || !d.Type().IsRegular() || info.Size() == 0 || info.Size()%align != 0 || strings.HasPrefix(d.Name(), "0") {
			_ = s.io.remove(path)
			continue
		}
		s.spareSeq = max(s.spareSeq, seq)
		s.addSpareLocked(path, uint64(info.Size()))
	}
	return nil
}
