package disk

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Mode is how a store moves bytes to and from its files.
type Mode int

// The I/O modes. ModeAuto, the zero Mode, asks for ModeDirect and falls back to ModeBuffered
// where the filesystem refuses O_DIRECT (tmpfs, some FUSE and network filesystems).
const (
	ModeAuto Mode = iota
	// ModeDirect opens every file with O_DIRECT: the bytes bypass the page cache both ways.
	ModeDirect
	// ModeBuffered writes through the page cache, then fdatasync and posix_fadvise(DONTNEED)
	// drop the pages again; reads drop theirs the same way.
	ModeBuffered
)

// String names the mode.
func (m Mode) String() string {
	switch m {
	case ModeAuto:
		return "auto"
	case ModeDirect:
		return "direct"
	case ModeBuffered:
		return "buffered"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// align is the alignment O_DIRECT wants of buffers, offsets and lengths. 4096 covers every
// logical block size Linux filesystems use.
const align = 4096

func roundUp(n int) int { return (n + align - 1) &^ (align - 1) }

// alignedBuf returns a zeroed buffer of n bytes whose start is aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+align)
	off := int(uintptr(unsafe.Pointer(&b[0])) & (align - 1))
	if off != 0 {
		off = align - off
	}
	return b[off : off+n : off+n]
}

// fileIO is the store's seam to the filesystem: every segment the store opens, writes, reads,
// truncates or removes goes through it, so a test can fail any call. path names the file an fd
// was opened from. open opens a segment for reading and writing, creating it where create is
// set; write writes rec at off; read fills buf from off and returns the bytes read (fewer at the
// file's end).
type fileIO interface {
	open(path string, create bool) (int, error)
	write(fd int, path string, rec []byte, off int64) error
	read(fd int, path string, buf []byte, off int64) (int, error)
	truncate(fd int, path string, size int64) error
	rename(from, to string) error
	close(fd int) error
	remove(path string) error
}

// osIO is the real filesystem in one Mode (ModeDirect or ModeBuffered).
type osIO struct{ direct bool }

func (o osIO) flags() int {
	if o.direct {
		return unix.O_DIRECT | unix.O_CLOEXEC
	}
	return unix.O_CLOEXEC
}

func (o osIO) open(path string, create bool) (int, error) {
	flags := unix.O_RDWR | o.flags()
	if create {
		flags |= unix.O_CREAT | unix.O_EXCL
	}
	fd, err := unix.Open(path, flags, 0o644)
	if err != nil {
		return -1, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return fd, nil
}

func (o osIO) write(fd int, path string, rec []byte, at int64) error {
	for off := 0; off < len(rec); {
		n, err := unix.Pwrite(fd, rec[off:], at+int64(off))
		if err == unix.EINTR {
			continue
		}
		if err == nil && n == 0 {
			err = unix.EIO
		}
		if err != nil {
			return &fs.PathError{Op: "write", Path: path, Err: err}
		}
		off += n
	}
	if o.direct {
		return nil
	}
	// The page cache holds dirty pages until they are written back; only clean pages can be
	// dropped.
	if err := unix.Fdatasync(fd); err != nil {
		return &fs.PathError{Op: "fdatasync", Path: path, Err: err}
	}
	_ = unix.Fadvise(fd, at, int64(len(rec)), unix.FADV_DONTNEED)
	return nil
}

func (o osIO) read(fd int, path string, buf []byte, at int64) (int, error) {
	off := 0
	for off < len(buf) {
		n, err := unix.Pread(fd, buf[off:], at+int64(off))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return off, &fs.PathError{Op: "read", Path: path, Err: err}
		}
		if n == 0 {
			break
		}
		off += n
	}
	if !o.direct {
		_ = unix.Fadvise(fd, at, int64(len(buf)), unix.FADV_DONTNEED)
	}
	return off, nil
}

func (osIO) truncate(fd int, path string, size int64) error {
	if err := unix.Ftruncate(fd, size); err != nil {
		return &fs.PathError{Op: "truncate", Path: path, Err: err}
	}
	return nil
}

// rename is rename(2). os.Rename would first stat the target, a system call more.
func (osIO) rename(from, to string) error {
	if err := unix.Rename(from, to); err != nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	return nil
}

func (osIO) close(fd int) error { return unix.Close(fd) }

func (osIO) remove(path string) error {
	err := os.Remove(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// probeDirect reports whether the filesystem under dir takes O_DIRECT writes and reads of
// aligned buffers. A refusal is EINVAL; any other error is returned.
func probeDirect(dir string) (bool, error) {
	path := dir + "/probe.tmp"
	_ = os.Remove(path)
	buf := alignedBuf(align)
	o := osIO{direct: true}
	fd, err := o.open(path, true)
	if err == nil {
		err = o.write(fd, path, buf, 0)
		if err == nil {
			_, err = o.read(fd, path, buf, 0)
		}
		_ = unix.Close(fd)
	}
	_ = os.Remove(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EINVAL):
		return false, nil
	}
	return false, err
}
