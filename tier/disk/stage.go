package disk

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// hugePage is the size of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
const hugePage = 2 << 20

// stage is a buffer the store moves records through on their way to and from the disk: a Put
// encodes its records into one and writes them from it; a Get reads records into one and
// checks them there before copying them out.
//
// Its memory is mapped apart from the Go heap, aligned to a huge page and advised
// (MADV_HUGEPAGE) to be backed by huge pages: direct I/O to and from a few huge pages is much
// faster than to and from many scattered 4 KiB pages, which the kernel pins and hands to the
// device one by one. Where the kernel grants no huge page the memory works all the same; where
// the mapping fails, the stage is Go memory.
type stage struct {
	buf     []byte // at least the bytes asked for, aligned to 4096
	mapping []byte // the mapped region buf lies in, or nil for Go memory
}

// newStage returns a stage of at least n bytes. Its owner frees it with free.
func newStage(n int) *stage {
	size := (n + hugePage - 1) &^ (hugePage - 1)
	m, err := unix.Mmap(-1, 0, size+hugePage, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return &stage{buf: alignedBuf(n)}
	}
	off := int(uintptr(unsafe.Pointer(unsafe.SliceData(m))) & (hugePage - 1))
	if off != 0 {
		off = hugePage - off
	}
	buf := m[off : off+size : off+size]
	_ = unix.Madvise(buf, unix.MADV_HUGEPAGE) // a hint: EINVAL where THP is compiled out
	return &stage{buf: buf, mapping: m}
}

// free unmaps the stage's memory. Nothing may use it after.
func (g *stage) free() {
	if g != nil && g.mapping != nil {
		_ = unix.Munmap(g.mapping)
		g.mapping, g.buf = nil, nil
	}
}
