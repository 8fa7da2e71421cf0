package disk

import (
	"cmp"
	"encoding/hex"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/pagedkv/pagedkv/tier"
)

// found is a block file the scan at Open kept, with its modification time for the LRU order.
type found struct {
	e     *entry
	mtime int64
}

// scan creates the 256 fan-out directories and rebuilds the index from the block files in them,
// oldest written least recently used. It deletes temporary files and block files that fail the
// checks of keep.
func (s *Store) scan() error {
	var kept []found
	buf := alignedBuf(align)
	for i := range 256 {
		sub := fmt.Sprintf("%s/%02x", s.dir, i)
		if err := os.MkdirAll(sub, 0o755); err != nil {
			return ioError(err)
		}
		ents, err := os.ReadDir(sub)
		if err != nil {
			return ioError(err)
		}
		for _, d := range ents {
			path := sub + "/" + d.Name()
			switch {
			case strings.HasSuffix(d.Name(), tmpSuffix):
				if s.io.remove(path) == nil {
					s.ds.TmpRemoved++
				}
			case !blockName(d.Name()) || !d.Type().IsRegular():
				// not a file of this layout: not ours to delete
			default:
				f, ok := s.keep(path, buf)
				if ok {
					kept = append(kept, f)
				} else if s.io.remove(path) == nil {
					s.ds.DroppedAtOpen++
				}
			}
		}
	}
	if err := s.scanSpares(); err != nil {
		return ioError(err)
	}
	slices.SortFunc(kept, func(a, b found) int { return cmp.Compare(a.mtime, b.mtime) })
	for _, f := range kept {
		s.index[f.e.k] = f.e
		s.order.pushFront(f.e)
		s.st.Blocks++
		s.st.Bytes += f.e.size
		s.st.Restored++
	}
	return nil
}

// blockName reports whether name has the form of a block file: 16 hex digits of namespace
// hash, a dash, 64 hex digits of key.
func blockName(name string) bool {
	if len(name) != 16+1+64 || name[16] != '-' {
		return false
	}
	_, err1 := hex.DecodeString(name[:16])
	_, err2 := hex.DecodeString(name[17:])
	return err1 == nil && err2 == nil
}

// keep reads a block file's header and reports whether the file is one this store serves: this
// model's fingerprint, this block size, the file's size that of the whole record (not torn), and
// the name the header's namespace and key give. The data's checksum is checked later, by Get.
func (s *Store) keep(path string, buf []byte) (found, bool) {
	st, err := os.Stat(path)
	if err != nil {
		return found{}, false
	}
	n, err := s.io.read(path, buf)
	if err != nil {
		return found{}, false
	}
	h, err := tier.ParseHeader(buf[:n])
	if err != nil && n == len(buf) && h.Size > n && h.Size <= 128+tier.MaxSalt {
		// a long salt: read the whole header
		big := alignedBuf(roundUp(h.Size))
		if n, err = s.io.read(path, big); err != nil {
			return found{}, false
		}
		h, err = tier.ParseHeader(big[:n])
	}
	switch {
	case err != nil, h.Fingerprint != s.fp, h.DataLen != uint64(s.blockBytes):
		return found{}, false
	case st.Size() != int64(recordSize(h.NS, s.blockBytes)):
		return found{}, false
	case path != s.blockPath(h.NS, h.Key):
		return found{}, false
	}
	e := &entry{k: ikey{h.NS, h.Key}, path: path, size: uint64(st.Size())}
	return found{e: e, mtime: st.ModTime().UnixNano()}, true
}
