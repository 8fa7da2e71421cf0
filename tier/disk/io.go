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

// fileIO is the store's seam to the filesystem: every file the store writes, reads or removes
// goes through it, so a test can fail any call. write makes a whole file, or overwrites an
// existing file of the same size in place; read fills buf from a file's start and returns the
// bytes read (fewer at its end).
type fileIO interface {
	write(path string, rec []byte, overwrite bool) error
	read(path string, buf []byte) (int, error)
	rename(from, to string) error
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

func (o osIO) write(path string, rec []byte, overwrite bool) error {
	flags := unix.O_WRONLY | unix.O_CREAT | unix.O_TRUNC
	if overwrite {
		flags = unix.O_WRONLY
	}
	fd, err := unix.Open(path, flags|o.flags(), 0o644)
	if err != nil {
		return &fs.PathError{Op: "create", Path: path, Err: err}
	}
	err = o.writeFD(fd, rec)
	if cerr := unix.Close(fd); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return &fs.PathError{Op: "write", Path: path, Err: err}
	}
	return nil
}

func (o osIO) writeFD(fd int, rec []byte) error {
	for off := 0; off < len(rec); {
		n, err := unix.Pwrite(fd, rec[off:], int64(off))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.EIO
		}
		off += n
	}
	if o.direct {
		return nil
	}
	// The page cache holds dirty pages until they are written back; only clean pages can be
	// dropped.
	if err := unix.Fdatasync(fd); err != nil {
		return err
	}
	return unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED)
}

func (o osIO) read(path string, buf []byte) (int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|o.flags(), 0)
	if err != nil {
		return 0, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	off := 0
	for off < len(buf) {
		n, err := unix.Pread(fd, buf[off:], int64(off))
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
		if o.direct && n%align != 0 {
			break // a short O_DIRECT read is the file's end
		}
	}
	if !o.direct {
		_ = unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED)
	}
	return off, nil
}

// rename is rename(2). os.Rename would first stat the target, a system call more per block.
func (osIO) rename(from, to string) error {
	if err := unix.Rename(from, to); err != nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	return nil
}

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
	path := dir + "/probe" + tmpSuffix
	buf := alignedBuf(align)
	err := osIO{direct: true}.write(path, buf, false)
	if err == nil {
		_, err = osIO{direct: true}.read(path, buf)
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
